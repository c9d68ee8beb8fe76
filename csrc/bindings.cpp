// Python module deqfuse._C: importing it registers the torch.ops.deqfuse.* operators (schemas in the
// TORCH_LIBRARY blocks of the .cpp files; fake kernels for torch.compile in deqfuse/ops.py):
//   anderson_step (CPU, CUDA), cell_forward / cell_vjp / cell_backward / cell_jac_backward (CPU),
//   anderson_cell_solve / anderson_vjp_solve (CPU: a whole Anderson solve of the cell or its adjoint),
//   group_by_choice / gather_rows_multi / scatter_rows (CPU, CUDA).
#include <torch/extension.h>

#include "cpu_blas.h"
#include "gemm_small.h"

namespace deqfuse {
double cell_gemm_floor_seconds(const at::Tensor& z, const std::vector<at::Tensor>& params, int64_t reps, bool blas);
std::string cell_plan(int64_t D, int64_t G, bool dbl, int64_t B);

PlanForce& plan_force() {
  static PlanForce f;
  return f;
}

namespace {
// name -> the PlanForce value (0: "auto"); an unknown name is an error naming the argument.
int plan_choice(const char* arg, const std::string& v, std::initializer_list<const char*> names) {
  if (v == "auto") return 0;
  int i = 1;
  std::string list = "'auto'";
  for (const char* n : names) {
    if (v == n) return i;
    ++i;
    list += std::string(", '") + n + "'";
  }
  TORCH_CHECK_VALUE(false, "set_cpu_plan: ", arg, " must be one of ", list, ", got '", v, "'");
}
const char* plan_name(int v, std::initializer_list<const char*> names) {
  return v == 0 ? "auto" : names.begin()[v - 1];
}
}  // namespace
}  // namespace deqfuse

#ifndef DEQFUSE_SOURCES_SHA  // setup.py: deqfuse/_env.py's sources_sha of the tree this was built from
#define DEQFUSE_SOURCES_SHA 0ULL
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deqfuse compiled ops: torch.ops.deqfuse.{anderson_step, cell_forward, cell_vjp, cell_backward, "
            "cell_jac_backward, anderson_cell_solve, anderson_vjp_solve, group_by_choice, gather_rows_multi, scatter_rows}";
  m.def("sources_sha", []() {
    char s[20];
    std::snprintf(s, sizeof s, "%015llx", (unsigned long long)DEQFUSE_SOURCES_SHA);
    return std::string(s);
  }, "the fingerprint of the csrc/ sources this extension was built from (deqfuse/_env.py: sources_sha)");
  m.def("has_cuda", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("blas_backend",
        []() {
          std::string s;
          for (int64_t D : {16, 24, 64, 128}) {
            s += (s.empty() ? "D=" : ", D=") + std::to_string(D) + ": " +
                 deqfuse::small_gemm_name(deqfuse::small_gemm_for(D));
          }
          return "float32 tiles by width (" + s + "), else " + std::string(deqfuse::blas_backend());
        },
        "which GEMMs the C++ CPU cell ops run: a tile kernel (gemm_small.h: AVX-512 or AVX2 + FMA) where it "
        "applies, else torch's BLAS (sgemm_/dgemm_) or the at::mm fallback");
  // The names below list each choice in its PlanForce order (cpu_simd.h; gemm: 1 + SmallGemm).
  m.def("set_cpu_plan",
        [](const std::string& gemm, const std::string& rows, const std::string& layout, int64_t chunk) {
          TORCH_CHECK_VALUE(chunk >= 0, "set_cpu_plan: chunk must be >= 0 (0: by cache size), got ", chunk);
          auto& f = deqfuse::plan_force();
          f.gemm = deqfuse::plan_choice("gemm", gemm, {"blas", "avx2", "avx512"});
          f.rows = deqfuse::plan_choice("rows", rows, {"zmm", "ymm"});
          f.layout = deqfuse::plan_choice("layout", layout, {"rows", "fm"});
          f.chunk = chunk;
        },
        pybind11::arg("gemm") = "auto", pybind11::arg("rows") = "auto", pybind11::arg("layout") = "auto",
        pybind11::arg("chunk") = 0,
        "force parts of the C++ CPU kernel plan for the whole process ('auto' / 0: the plan's own choice; a "
        "choice the CPU or the shape does not allow falls back to it): use deqfuse.force_cpu_plan");
  m.def("get_cpu_plan",
        []() {
          const auto& f = deqfuse::plan_force();
          return pybind11::dict(pybind11::arg("gemm") = deqfuse::plan_name(f.gemm, {"blas", "avx2", "avx512"}),
                                pybind11::arg("rows") = deqfuse::plan_name(f.rows, {"zmm", "ymm"}),
                                pybind11::arg("layout") = deqfuse::plan_name(f.layout, {"rows", "fm"}),
                                pybind11::arg("chunk") = f.chunk.load());
        },
        "the forced parts of the C++ CPU kernel plan (set_cpu_plan's arguments)");
  m.def("cell_plan", &deqfuse::cell_plan, pybind11::arg("D"), pybind11::arg("G"), pybind11::arg("dbl"),
        pybind11::arg("B") = 0,
        "the kernel plan of the C++ CPU cell ops and whole solves at width D in G groups, float64 (dbl) or float32, "
        "for a batch of B rows (0: a large batch) on this CPU with what set_cpu_plan forces now: 'gemm=... rows=... layout=...' (deqfuse.cpu_plan)");
  m.def("cell_gemm_floor_seconds", &deqfuse::cell_gemm_floor_seconds, pybind11::arg("z"), pybind11::arg("params"),
        pybind11::arg("reps"), pybind11::arg("blas") = false,
        "benchmarks: wall seconds per cell evaluation of its 2N + 2 GEMMs alone (z [B, (N+1) D], the 16 CellParams "
        "tensors), in the C++ ops' row blocks, threads and GEMM kernels (blas=True: torch's BLAS instead of the "
        "tile kernel); the floor of one solver iteration's cell work, without dispatch");
}
