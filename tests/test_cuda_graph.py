"""The whole forward solve is CUDA-graph capturable (fixed max_iter, device-side flags)."""
import pytest
import torch

from deqfuse import DEQFusion
from conftest import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_forward_solve_captures_and_replays(backend):
    torch.manual_seed(0)
    layer = DEQFusion(64, 3, backend=backend, f_max_iter=12, on_nonconvergence="ignore").cuda().eval()
    feats = [torch.randn(37, 64, device="cuda") for _ in range(3)]
    with torch.no_grad():
        eager = layer(feats)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(feats)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = layer(feats)
        for f in feats:  # new inputs in the same buffers: the replay must follow them
            f.copy_(torch.randn_like(f))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, layer(feats)) < 1e-5
        assert rel_err(out, eager) > 1e-3


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_graphed_layer_matches_eager_through_optimizer_steps(backend):
    """cuda_graph=True gives the eager outputs and gradients, across optimizer steps and new inputs."""
    torch.manual_seed(0)
    kw = dict(backend=backend, f_max_iter=15, b_max_iter=15, on_nonconvergence="ignore")
    eager = DEQFusion(64, 3, **kw).cuda()
    graphed = DEQFusion(64, 3, cuda_graph=True, **kw).cuda()
    graphed.load_state_dict(eager.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed)]
    for step in range(3):
        feats = [torch.randn(37, 64, device="cuda") for _ in range(3)]
        outs, grads = [], []
        for m, opt in zip((eager, graphed), opts):
            opt.zero_grad()
            out = m(feats)
            out.square().mean().backward()
            outs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
            opt.step()
        assert rel_err(outs[1], outs[0]) < 1e-4, step
        assert rel_err(grads[1], grads[0]) < 1e-3, step
    assert len(graphed._graphs.cache) == 2  # one forward and one adjoint graph, captured once
