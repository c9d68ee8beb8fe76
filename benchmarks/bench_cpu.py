"""pytest-benchmark suite on the CPU (runs once as plain tests in CI, where benchmarks are disabled;
`python -m pytest benchmarks/bench_cpu.py --benchmark-enable` to time them)."""
import pytest
import torch

import deqfuse
from deqfuse import DEQFusion
from deqfuse.bench import step_args
from deqfuse.reference import anderson_step_ref

B, L, M = 128, 1024, 6


STEPS = {"reference": anderson_step_ref}
if deqfuse.extension_status()[0] is not None:
    STEPS["cpp"] = torch.ops.deqfuse.anderson_step


@pytest.mark.parametrize("impl", sorted(STEPS))
def test_bench_anderson_step(benchmark, impl):
    args = step_args(B, L, M)
    benchmark(STEPS[impl], *args)
    assert torch.isfinite(args[0]).all()


@pytest.mark.parametrize("grad", ["implicit", "phantom"])
def test_bench_deq_train_step(benchmark, grad):
    torch.manual_seed(0)
    layer = DEQFusion(64, 3, grad=grad, f_max_iter=15, b_max_iter=15, on_nonconvergence="ignore")
    feats = [torch.randn(64, 64) for _ in range(3)]

    def step():
        layer.zero_grad()
        layer(feats).square().mean().backward()
    benchmark(step)
    assert layer.cell.w1.grad is not None
