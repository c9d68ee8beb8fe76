"""Small driver of every CUDA op path for `compute-sanitizer --tool memcheck` (benchmarks/gpu_check.sh)."""
import torch

import deqfuse
from deqfuse.solvers import AndersonState

ext, why = deqfuse.extension_status()
assert ext is not None and ext.has_cuda(), why
for B, L, m, hist in [(3, 37, 3, None), (2, 40000, 6, None), (5, 100, 4, torch.bfloat16), (3, 64, 8, None)]:
    x0 = torch.randn(B, L, device="cuda")
    st = AndersonState(x0, m, 8, hist)
    for k in range(8):
        st.step(torch.ops.deqfuse.anderson_step, torch.tanh(st.x + 0.5), k, 1.0, 1e-4, 1e-6, True)
for B, E in [(5, 3), (3000, 7)]:
    choice = torch.randint(0, E, (B,), device="cuda")
    order, counts = torch.ops.deqfuse.group_by_choice(choice, E)
    srcs = [torch.randn(B, d, device="cuda") for d in (3, 64, 5)] + [torch.randn(B, 3, device="cuda").half()]
    outs = torch.ops.deqfuse.gather_rows_multi(srcs, order)
    torch.ops.deqfuse.scatter_rows(outs[1], order, torch.empty_like(srcs[1]))
torch.cuda.synchronize()
print("sanitize_ops: all CUDA op paths ran")
