"""torch.compile over the compiled ops (fake kernels) and the layer's eval solve."""
import pytest
import torch

import deqfuse
from deqfuse import DEQFusion
from deqfuse.solvers import AndersonState
from conftest import rel_err

ext, why = deqfuse.extension_status()
pytestmark = pytest.mark.skipif(ext is None, reason=f"extension unavailable: {why}")


def test_fake_kernel_lets_compile_trace_the_mutating_step():
    """torch.compile traces through the in-place op (fake kernel registered) with no graph break."""
    x = torch.randn(3, 16)
    fx = torch.tanh(x)

    def step(st_x, fx, X, G, GG, bx, br, cv, ns, a, r):
        torch.ops.deqfuse.anderson_step(st_x, fx, X, G, GG, bx, br, cv, ns, a, r, 0, 1.0, 1e-4, 1e-6, True)
        return st_x * 1

    st = AndersonState(x, 3, 1)
    args = (st.x, fx, st.X, st.G, st.GG, st.best_x, st.best_res, st.converged, st.nstep, st.abs_trace[0], st.rel_trace[0])
    assert torch._dynamo.explain(step)(*args).graph_break_count == 0


def test_torch_compile_traces_the_whole_eval_solve_in_one_graph():
    """Fake kernels + a constant backend choice: dynamo sees the layer's forward solve as one graph with
    the compiled cell and step in it (no graph break), and the compiled layer gives the eager result."""
    torch.manual_seed(0)
    layer = DEQFusion(16, 3, backend="cuda", f_max_iter=6, on_nonconvergence="ignore").eval()
    feats = [torch.randn(4, 16) for _ in range(3)]
    with torch.no_grad():
        ex = torch._dynamo.explain(layer)(feats)
        assert ex.graph_count == 1 and ex.graph_break_count == 0
        ops = [str(op) for g in ex.ops_per_graph for op in g]
        assert any("anderson_step" in o for o in ops) and any("cell_forward" in o for o in ops)
        torch._dynamo.reset()
        out = torch.compile(layer, backend="aot_eager")(feats)
        assert rel_err(out, layer(feats)) < 1e-5
