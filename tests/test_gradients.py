"""Gradients a user can reach, right or a clear error: second order (create_graph, hvp, hessian,
gradient penalties) on every backend and gradient mode, torch.func transforms, eval mode with grad on, the
adjoint's stopping rule against a tight solve, parameters changed between forward and backward."""
import pytest
import torch

from deqfuse import DEQFusion
from deqfuse.testing import contractive_layer, rel_err

BACKENDS = ["auto", "reference"]


def _layer(grad="implicit", backend="auto", **kw):
    torch.manual_seed(0)
    kw = dict(dict(f_tol=1e-12, b_tol=1e-12, f_max_iter=200, b_max_iter=200, stop_mode="abs"), **kw)
    if grad == "unrolled":
        kw = dict(unrolled_steps=60)
    # (D = 16 in 2 groups: GroupNorm groups of 8 keep second differences well conditioned)
    return contractive_layer(DEQFusion(16, 2, groups=2, grad=grad, backend=backend, **kw).double(), w_scale=0.3,
                             gn3_scale=0.3)


def _feats(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]


def _penalty(layer, xs):
    """|| d sum(y^3) / d xs ||^2: a second-order quantity."""
    y = layer(xs)
    gx = torch.autograd.grad(y.pow(3).sum(), xs, create_graph=True)
    return sum(g.square().sum() for g in gx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_through_implicit_is_a_clear_error(backend):
    layer = _layer("implicit", backend)
    with pytest.raises(RuntimeError, match=r"differentiable once.*grad='unrolled'"):
        _penalty(layer, _feats())
    ones = tuple(torch.ones(3, 16, dtype=torch.float64) for _ in range(2))
    for fn in (torch.autograd.functional.hvp, torch.autograd.functional.jvp):
        with pytest.raises(RuntimeError, match="differentiable once"):
            fn(lambda a, b: layer([a, b]).sum(), tuple(t.detach() for t in _feats()), ones)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_through_unrolled_is_right(backend):
    """The gradient of a gradient penalty w.r.t. the features and a parameter, against central finite
    differences (float64), on every backend: the C++ cell's backward recomputes by the reference path when
    asked for a graph."""
    layer = _layer("unrolled", backend)
    xs = _feats()
    p = layer.cell.w1
    gx0, gw = torch.autograd.grad(_penalty(layer, xs), [xs[0], p])
    direction = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wdir = torch.randn_like(p)
    eps = 1e-5
    base = [t.detach().clone() for t in xs]

    def at(dx=0.0, dw=0.0):
        with torch.no_grad():
            p.add_(dw * wdir)
        x0 = (base[0] + dx * direction).requires_grad_()
        out = float(_penalty(layer, [x0, base[1].clone().requires_grad_()]))
        with torch.no_grad():
            p.sub_(dw * wdir)
        return out
    fd_x = (at(dx=eps) - at(dx=-eps)) / (2 * eps)
    fd_w = (at(dw=eps) - at(dw=-eps)) / (2 * eps)
    assert abs(float((gx0 * direction).sum()) - fd_x) <= 1e-5 * max(1.0, abs(fd_x))
    assert abs(float((gw * wdir).sum()) - fd_w) <= 1e-5 * max(1.0, abs(fd_w))


def test_second_order_through_phantom_is_the_reference_autograd():
    """grad='phantom' differentiates its damped steps from the (constant) fixed point: an approximation by
    design, so its second order is checked against plain autograd of the same steps (backend='reference')."""
    got = []
    for backend in BACKENDS:
        layer = _layer("phantom", backend)
        xs = _feats()
        got.append(torch.autograd.grad(_penalty(layer, xs), [xs[0], layer.cell.w1, layer.cell.gn2_w]))
    for a, b in zip(*got):
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_and_hessian_on_unrolled_are_not_zeros(backend):
    layer = _layer("unrolled", backend)
    x = tuple(t.detach() for t in _feats(B=2))
    v = tuple(torch.ones_like(t) for t in x)
    f = lambda a, b: layer([a, b]).sum()  # noqa: E731
    _, jv = torch.autograd.functional.jvp(f, x, v)
    _, (vj0, vj1) = torch.autograd.functional.vjp(f, x)
    assert abs(float(jv) - float((vj0 * v[0]).sum() + (vj1 * v[1]).sum())) < 1e-10 and float(jv) != 0.0
    h = torch.autograd.functional.hessian(lambda a: layer([a, x[1]]).pow(2).sum(), x[0])
    assert h.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_are_a_clear_error(backend):
    layer = _layer("implicit", backend)
    x = [t.detach() for t in _feats()]
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        torch.func.grad(lambda a: layer([a, x[1]]).sum())(x[0])
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        torch.func.vmap(lambda a: layer([a[None], x[1][:1]]))(x[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["implicit", "phantom"])
def test_eval_mode_with_grad_on_keeps_the_gradient(backend, grad):
    """Saliency maps and adversarial inputs: model.eval() with autograd on gives the training-mode gradient."""
    layer = _layer(grad, backend)
    xs = _feats()
    w = torch.randn(3, 16, dtype=torch.float64)
    grads = []
    for mode in (True, False):
        layer.train(mode)
        xs = [t.detach().clone().requires_grad_() for t in xs]
        layer.zero_grad()
        (layer(xs) * w).sum().backward()
        grads.append([t.grad for t in xs] + [layer.cell.w1.grad])
    for a, b in zip(*grads):
        assert a is not None and rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_adjoint_gives_every_parameter_gradient_within_1e_2(backend):
    """Issue 37: a contractive cell (GroupNorm gains x0.2), D=64, B=37, float64, loss ||z||^2: at the default
    tolerances the feature gradient and every parameter tensor's gradient are within 1e-2 (relative) of a
    tight solve (the adjoint's residual is measured on the part of the gradient the cell contributes)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(37, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    grads = []
    for kw in (dict(), dict(f_tol=1e-13, b_tol=1e-13, f_max_iter=300, b_max_iter=300)):
        layer = contractive_layer(DEQFusion(64, 2, backend=backend, **kw).double(), gn3_scale=0.2)
        xs = [t.clone().requires_grad_() for t in feats]
        layer(xs).square().sum().backward()
        grads.append([("features", xs[0].grad)] + [(n, p.grad) for n, p in layer.named_parameters()])
        assert layer.info.backward_stats.all_converged
    for (name, a), (_, b) in zip(*grads):
        assert rel_err(a, b) < 1e-2, name


def test_parameter_changed_in_place_before_backward_is_an_error_on_every_backend():
    for backend in BACKENDS:
        layer = DEQFusion(8, 2, backend=backend)
        out = layer([torch.randn(3, 8), torch.randn(3, 8)])
        with torch.no_grad():
            layer.cell.w1.mul_(1.1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_default_adjoint_on_a_trained_cell_within_1e_2_per_parameter():
    """The same accuracy promise on a cell trained for a while (AdamW on a random regression task, with the
    Jacobian loss the README recommends, so every sample's fixed point stays reachable to 1e-13)."""
    torch.manual_seed(1)
    layer = DEQFusion(32, 2, in_dims=[12, 20], jac_reg=1).double()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(64, 20, generator=g, dtype=torch.float64)]
    target = torch.randn(64, 32, generator=g, dtype=torch.float64)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    for _ in range(60):
        loss = (layer(xs) - target).square().mean() + layer.info.jac_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tight = DEQFusion(32, 2, in_dims=[12, 20], f_tol=1e-13, b_tol=1e-13, f_max_iter=400, b_max_iter=400).double()
    tight.load_state_dict(layer.state_dict())
    grads = []
    for m in (layer, tight):
        m.zero_grad()
        x = [t.clone().requires_grad_() for t in xs]
        (m(x) - target).square().mean().backward()
        assert m.info.forward_stats.all_converged and m.info.backward_stats.all_converged
        grads.append([("features", x[0].grad)] + [(n, p.grad) for n, p in m.named_parameters()])
    for (name, a), (_, b) in zip(*grads):
        assert rel_err(a, b) < 1e-2, name


def test_meta_device_and_non_finite_parameters_are_clear_errors():
    meta = DEQFusion(8, 2).to("meta")
    with pytest.raises(RuntimeError, match="meta device"):
        meta([torch.randn(2, 8, device="meta")] * 2)
    layer = DEQFusion(8, 2)
    with torch.no_grad():
        layer.cell.w1[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameters \['cell.w1'\] hold NaN or Inf"):
        layer([torch.randn(3, 8), torch.randn(3, 8)])


def test_history_dtype_the_compiled_step_cannot_hold_names_the_option():
    layer = DEQFusion(8, 2, solver_kw=dict(history_dtype=torch.float64))
    with pytest.raises(ValueError, match=r"solver_kw\['history_dtype'\]"):
        layer([torch.randn(3, 8), torch.randn(3, 8)])
    DEQFusion(8, 2, solver_kw=dict(history_dtype=torch.bfloat16))([torch.randn(3, 8), torch.randn(3, 8)])
