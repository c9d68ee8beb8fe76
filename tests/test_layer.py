"""DEQFusion layer: shapes, input validation, non-convergence reporting, fused-input weights."""
import pytest
import torch

from deqfuse import DEQFusion, FusionCell


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return DEQFusion(16, 3, on_nonconvergence="ignore")


def feats(B=4, D=16, N=3, **kw):
    return [torch.randn(B, D, **kw) for _ in range(N)]


def test_shapes_and_info(layer):
    out, info = layer(feats(), return_info=True)
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    assert info.forward_stats.abs_trace.shape[1] == 4


@pytest.mark.parametrize("bad,match", [
    (lambda: feats(N=2), "3 tensors"),
    (lambda: feats(D=12), r"features\[0\] must have shape"),
    (lambda: feats()[:2] + [torch.randn(5, 16)], r"features\[2\] has batch 5"),
    (lambda: feats()[:2] + [torch.randint(0, 3, (4, 16))], r"features\[2\] must be floating"),
    (lambda: [torch.full((4, 16), float("nan"))] + feats()[1:], r"features\[0\] has non-finite"),
    (lambda: torch.randn(4, 16), "list"),
    (lambda: feats(B=0), "batch size 0"),
])
def test_bad_inputs_raise(layer, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        layer(bad())


def test_bad_construction():
    with pytest.raises(ValueError, match="multiple of groups"):
        FusionCell(10, 2, groups=4)
    with pytest.raises(ValueError, match="grad"):
        DEQFusion(16, 2, grad="magic")
    with pytest.raises(ValueError, match="num_modalities"):
        FusionCell(16, 0)


def test_nonconvergence_warns():
    torch.manual_seed(0)
    layer = DEQFusion(16, 3, f_max_iter=2, f_tol=1e-12)
    with pytest.warns(RuntimeWarning, match="did not reach f_tol"):
        out = layer(feats())
    assert torch.isfinite(out).all()


def test_modality_weights_define_fused_input(layer):
    """x_f = sum_i w_i x_i + b enters only the fusion slot; scaling all w by 0 and b by c is visible."""
    f = feats()
    with torch.no_grad():
        layer.weights.zero_()
        layer.bias.fill_(0.5)
    a = layer(f)
    with torch.no_grad():
        layer.bias.fill_(-0.5)
    assert not torch.allclose(a, layer(f))


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_training_step_all_solvers(solver):
    torch.manual_seed(0)
    layer = DEQFusion(16, 2, solver=solver, on_nonconvergence="ignore", f_max_iter=10, b_max_iter=10)
    x = feats(N=2, requires_grad=True)
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert x[0].grad is not None
