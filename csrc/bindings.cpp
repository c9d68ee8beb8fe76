// Python module deqfuse._C: importing it registers the torch.ops.deqfuse.* operators (schemas in the
// TORCH_LIBRARY blocks of the .cpp files; fake kernels for torch.compile in deqfuse/ops.py):
//   anderson_step (CPU, CUDA), cell_forward / cell_vjp / cell_backward (CPU),
//   anderson_cell_solve / anderson_vjp_solve (CPU: a whole Anderson solve of the cell or its adjoint),
//   group_by_choice / gather_rows_multi / scatter_rows (CPU, CUDA).
#include <torch/extension.h>

#include "cpu_blas.h"
#include "gemm_avx512.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deqfuse compiled ops: torch.ops.deqfuse.{anderson_step, cell_forward, cell_vjp, cell_backward, "
            "anderson_cell_solve, anderson_vjp_solve, group_by_choice, gather_rows_multi, scatter_rows}";
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
#ifdef DEQFUSE_AVX512_GEMM
          if (deqfuse::cpu_has_avx512f()) s = "AVX-512 tiles (float32, D % 16 == 0, D <= 64), else ";
#endif
          return s + deqfuse::blas_backend();
        },
        "which GEMMs the C++ CPU cell ops run: the AVX-512 tiles (gemm_avx512.h) where they apply, else torch's "
        "BLAS (sgemm_/dgemm_) or the at::mm fallback");
}
