// Python module deqfuse._C: importing it registers the torch.ops.deqfuse.* operators.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deqfuse compiled ops (torch.ops.deqfuse.anderson_step, torch.ops.deqfuse.modality_epilogue)";
  m.def("has_cuda", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
