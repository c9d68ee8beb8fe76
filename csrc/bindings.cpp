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
std::string cell_rows_kernel(int64_t D, int64_t G);
std::string cell_solve_layout(int64_t D, int64_t G);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deqfuse compiled ops: torch.ops.deqfuse.{anderson_step, cell_forward, cell_vjp, cell_backward, "
            "cell_jac_backward, anderson_cell_solve, anderson_vjp_solve, group_by_choice, gather_rows_multi, scatter_rows}";
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
  m.def("cell_gemm_kernel", [](int64_t D) { return std::string(deqfuse::small_gemm_name(deqfuse::small_gemm_for(D))); },
        pybind11::arg("D"),
        "the kernel of the C++ CPU cell ops' float32 D x D GEMMs on this CPU: 'avx512', 'avx2' or 'blas' "
        "(DEQFUSE_CPU_GEMM forces one where the CPU allows; float64 always takes the BLAS)");
  m.def("cell_rows_kernel", &deqfuse::cell_rows_kernel, pybind11::arg("D"), pybind11::arg("G"),
        "the variant of the C++ CPU cell ops' float32 row passes (bias, GroupNorm, ReLU, residual, gate) for "
        "width D in G groups on this CPU: 'zmm' (512-bit, Intel CPUs with AVX-512, where it gives the same floats) "
        "or 'ymm' (AVX2 + FMA, or the baseline ISA); DEQFUSE_CPU_ROWS=zmm|ymm forces one where the CPU allows");
  m.def("cell_solve_layout", &deqfuse::cell_solve_layout, pybind11::arg("D"), pybind11::arg("G"),
        "the layout of the whole solves (anderson_cell_solve, anderson_vjp_solve) in float32 at width D in G groups on "
        "this CPU: 'fm' (feature-major "
        "chunks, samples in SIMD lanes: Intel CPUs with AVX-512, tile GEMMs, GroupNorm group width 16 or 8 with G % 4 "
        "== 0; the same floats) or 'rows'; DEQFUSE_SOLVE_LAYOUT=rows|fm (read per call) forces one where it applies");
  m.def("cell_gemm_floor_seconds", &deqfuse::cell_gemm_floor_seconds, pybind11::arg("z"), pybind11::arg("params"),
        pybind11::arg("reps"), pybind11::arg("blas") = false,
        "benchmarks: wall seconds per cell evaluation of its 2N + 2 GEMMs alone (z [B, (N+1) D], the 16 CellParams "
        "tensors), in the C++ ops' row blocks, threads and GEMM kernels (blas=True: torch's BLAS instead of the "
        "tile kernel); the floor of one solver iteration's cell work, without dispatch");
}
