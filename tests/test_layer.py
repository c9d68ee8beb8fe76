"""DEQFusion layer: shapes, input validation, non-convergence reporting, fused-input weights."""
import pytest
import torch

from deqfuse import DEQFusion, FusionCell
from conftest import contractive_layer, rel_err


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
    (lambda: feats()[:1] + [torch.full((4, 16), -float("inf"))] + feats()[2:], r"features\[1\] has non-finite"),
    (lambda: feats()[:2] + [torch.full((4, 16), -1e30)], r"features\[2\] has values up to 1e\+30"),
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


def test_modality_weights_define_fused_input():
    """x_f = sum_i w_i x_i + b enters the cell (and only as x_f): the layer's output equals the fixed
    point of the reference cell driven by that x_f, for non-trivial weights and bias."""
    from deqfuse.reference import cell_forward
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(16, 3, f_tol=1e-12, stop_mode="abs", f_max_iter=100).double()).eval()
    with torch.no_grad():
        layer.weights.copy_(torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64))
        layer.bias.fill_(0.3)
    f = [t.double() for t in feats()]
    out = layer(f)
    x = torch.stack(f, 1)
    xf = 0.5 * f[0] - 2.0 * f[1] + 0.3
    z = torch.zeros(4, 4, 16, dtype=torch.float64)
    for _ in range(100):  # plain Picard on the contractive cell: the fixed point the layer must return
        z = cell_forward(z, x, xf, layer.cell.params(), layer.cell.groups)
    assert rel_err(out, z[:, 3].detach()) < 1e-9
    with torch.no_grad():
        layer.weights[2] = 5.0  # features[2] enters x_f only through its weight
    assert rel_err(layer(f), out) > 1e-3


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_training_step_all_solvers(solver):
    """Each solver's training step gives the implicit gradient: equal (to the solve tolerance) to
    back-propagating through 200 unrolled cell applications of the same contractive layer."""
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(16, 2, solver=solver, f_max_iter=200, b_max_iter=200, f_tol=1e-12,
                                        b_tol=1e-12, stop_mode="abs").double())
    x = [t.double().requires_grad_() for t in feats(N=2)]
    r = torch.randn(4, 16, dtype=torch.float64)
    (layer(x) * r).sum().backward()
    got = [p.grad.clone() for p in layer.parameters()] + [t.grad.clone() for t in x]
    assert layer.info.forward_stats.all_converged and layer.info.backward_stats.all_converged
    layer.zero_grad()
    for t in x:
        t.grad = None
    layer.grad, layer.unrolled_steps = "unrolled", 200
    (layer(x) * r).sum().backward()
    ref = [p.grad for p in layer.parameters()] + [t.grad for t in x]
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-8


def test_parameters_swapped_by_functional_call_and_parametrizations_are_used():
    """The cell reads its parameters straight from _parameters for speed; functional_call and
    parametrizations move them out of it, and the layer must then use what they provide."""
    from torch.func import functional_call
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    layer = DEQFusion(16, 2, f_max_iter=30, b_max_iter=30, on_nonconvergence="ignore").double()
    f = [t.double() for t in feats(N=2)]
    other = DEQFusion(16, 2, f_max_iter=30, b_max_iter=30, on_nonconvergence="ignore").double()
    with torch.no_grad():
        other.cell.b1.add_(0.5)
    swapped = functional_call(layer, dict(other.named_parameters()), (f,))
    assert rel_err(swapped, other(f)) < 1e-12 and rel_err(swapped, layer(f)) > 1e-3

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w
    plain = layer(f)
    parametrize.register_parametrization(layer.cell, "b1", Double())
    with torch.no_grad():
        ref = DEQFusion(16, 2, f_max_iter=30, b_max_iter=30, on_nonconvergence="ignore").double()
        ref.load_state_dict({k.replace("parametrizations.b1.original", "b1"): v for k, v in layer.state_dict().items()})
        ref.cell.b1.mul_(2)
    assert rel_err(layer(f), ref(f)) < 1e-12 and rel_err(layer(f), plain) > 1e-3
