// Python module deqfuse._C: importing it registers the torch.ops.deqfuse.* operators (schemas in the
// TORCH_LIBRARY blocks of the .cpp files; fake kernels for torch.compile in deqfuse/ops.py):
//   anderson_step (CPU, CUDA), cell_forward / cell_vjp / cell_backward / cell_jac_backward (CPU),
//   anderson_cell_solve / anderson_vjp_solve (CPU: a whole Anderson solve of the cell or its adjoint),
//   group_by_choice / gather_rows_multi / scatter_rows (CPU, CUDA).
#include <torch/extension.h>

#include <iterator>

#include "cpu/cpu_blas.h"
#include "cpu/plan.h"

namespace deqfuse {
double cell_gemm_floor_seconds(const at::Tensor& z, const std::vector<at::Tensor>& params, int64_t reps, bool blas);
std::string cell_plan(int64_t D, int64_t G, bool dbl, int64_t B);

PlanForce& plan_force() {
  static PlanForce f;
  return f;
}

namespace {
// name -> the PlanForce value (0: "auto", else 1 + its index in names); an unknown name is an error naming the
// argument.
template <size_t K>
int plan_choice(const char* arg, const std::string& v, const char* const (&names)[K]) {
  if (v == "auto") return 0;
  std::string list = "'auto'";
  for (size_t i = 0; i < K; ++i) {
    if (v == names[i]) return (int)i + 1;
    list += std::string(", '") + names[i] + "'";
  }
  TORCH_CHECK_VALUE(false, "set_cpu_plan: ", arg, " must be one of ", list, ", got '", v, "'");
}
template <size_t K>
const char* plan_choice_name(int v, const char* const (&names)[K]) { return v == 0 ? "auto" : names[v - 1]; }
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
  m.def("blas_backend", []() { return std::string(deqfuse::blas_backend()); },
        "the BLAS the C++ CPU cell ops call where the plan has no tile GEMM: torch's sgemm_/dgemm_ or the at::mm "
        "fallback");
  m.def("cpu_plan_choices",
        []() {
          auto names = [](const auto& a) { return std::vector<std::string>(std::begin(a), std::end(a)); };
          return pybind11::dict(pybind11::arg("gemm") = names(deqfuse::kGemmNames),
                                pybind11::arg("rows") = names(deqfuse::kRowsNames),
                                pybind11::arg("layout") = names(deqfuse::kLayoutNames));
        },
        "the names each part of the C++ CPU kernel plan may take (besides 'auto')");
  m.def("set_cpu_plan",
        [](const std::string& gemm, const std::string& rows, const std::string& layout, int64_t chunk) {
          TORCH_CHECK_VALUE(chunk >= 0, "set_cpu_plan: chunk must be >= 0 (0: by cache size), got ", chunk);
          auto& f = deqfuse::plan_force();
          f.gemm = deqfuse::plan_choice("gemm", gemm, deqfuse::kGemmNames);
          f.rows = deqfuse::plan_choice("rows", rows, deqfuse::kRowsNames);
          f.layout = deqfuse::plan_choice("layout", layout, deqfuse::kLayoutNames);
          f.chunk = chunk;
        },
        pybind11::arg("gemm") = "auto", pybind11::arg("rows") = "auto", pybind11::arg("layout") = "auto",
        pybind11::arg("chunk") = 0,
        "force parts of the C++ CPU kernel plan for the whole process ('auto' / 0: the plan's own choice; a "
        "choice the CPU or the shape does not allow falls back to it): use deqfuse.force_cpu_plan");
  m.def("get_cpu_plan",
        []() {
          const auto& f = deqfuse::plan_force();
          return pybind11::dict(pybind11::arg("gemm") = deqfuse::plan_choice_name(f.gemm, deqfuse::kGemmNames),
                                pybind11::arg("rows") = deqfuse::plan_choice_name(f.rows, deqfuse::kRowsNames),
                                pybind11::arg("layout") = deqfuse::plan_choice_name(f.layout, deqfuse::kLayoutNames),
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
