// The cell's row kernels (plan.h: RowKernels) compiled for the build's baseline instruction set: RowIsa::kBase.
#include "cell_cpu_kernels.h"

namespace deqfuse {
const RowKernels<float> kRowsBaseF = {&forward_block_body<float>, &vjp_block_body<float>};
const RowKernels<double> kRowsBaseD = {&forward_block_body<double>, &vjp_block_body<double>};
}  // namespace deqfuse
