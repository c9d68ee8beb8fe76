// The cell's row kernels (plan.h: RowKernels) compiled for x86-64-v3: AVX2 + FMA, 256-bit vectors: RowIsa::kYmm.
#define DEQFUSE_ROWS_ISA 1  // cell_cpu_kernels.h switches its target
#include "cell_cpu_kernels.h"

namespace deqfuse {
const RowKernels<float> kRowsYmmF = {&forward_block_body<float>, &vjp_block_body<float>};
const RowKernels<double> kRowsYmmD = {&forward_block_body<double>, &vjp_block_body<double>};
}  // namespace deqfuse
