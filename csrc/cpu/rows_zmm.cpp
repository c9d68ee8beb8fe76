// The cell's row kernels (plan.h: RowKernels) compiled for x86-64-v4: AVX-512, 512-bit vectors: RowIsa::kZmm.
#define DEQFUSE_ROWS_ISA 0  // cell_cpu_kernels.h switches its target
#include "cell_cpu_kernels.h"

namespace deqfuse {
const RowKernels<float> kRowsZmmF = {&forward_block_body<float>, &vjp_block_body<float>};
const RowKernels<double> kRowsZmmD = {&forward_block_body<double>, &vjp_block_body<double>};
}  // namespace deqfuse
