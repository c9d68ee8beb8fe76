"""Implicit differentiation: float64 gradcheck, agreement with unrolled autograd, phantom, Jacobian reg."""
import pytest
import torch

from deqfuse import DEQFusion, anderson, implicit_grad, jacobian_reg, phantom_grad
from deqfuse.implicit import autograd_vjp
from conftest import contractive_layer, rel_err


def tanh_deq(x, W, solver="anderson"):
    """z* = tanh(W z* + x) with the implicit gradient attached. x: [B, L], W: [L, L]."""
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    with torch.no_grad():
        z_star, st = anderson(f, torch.zeros_like(x), max_iter=100, tol=1e-13, stop_mode="abs")
    assert st.all_converged
    z_star = z_star.detach().requires_grad_()
    fz = f(z_star)
    return implicit_grad(fz, autograd_vjp(fz, z_star), solver, max_iter=100, tol=1e-13, stop_mode="abs")


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_gradcheck_implicit_backward(solver):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    W = (0.4 * torch.randn(4, 4, dtype=torch.float64, generator=g) / 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, W: tanh_deq(x, W, solver), (x, W), atol=1e-7, rtol=1e-6)


def unrolled_fixed_point(layer, feats, steps):
    """Backprop through `steps` plain applications of the cell (ground truth for a contractive cell)."""
    layer.grad, layer.unrolled_steps = "unrolled", steps
    return layer(feats)


def test_layer_implicit_grads_match_unrolled_autograd():
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(12, 3, f_max_iter=200, b_max_iter=200, f_tol=1e-13, b_tol=1e-13,
                                       stop_mode="abs").double())
    feats = [torch.randn(5, 12, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.randn(5, 12, dtype=torch.float64)
    layer.train()
    (layer(feats) * w).sum().backward()
    assert layer.info.forward_stats.all_converged and layer.info.backward_stats.all_converged
    got = [p.grad.clone() for p in layer.parameters()] + [f.grad.clone() for f in feats]
    layer.zero_grad()
    for f in feats:
        f.grad = None
    (unrolled_fixed_point(layer, feats, 120) * w).sum().backward()
    ref = [p.grad for p in layer.parameters()] + [f.grad for f in feats]
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-8


def test_layer_eval_returns_fixed_point_and_train_output_agrees():
    torch.manual_seed(1)
    layer = contractive_layer(DEQFusion(12, 2, f_tol=1e-12, stop_mode="abs", f_max_iter=200).double())
    feats = [torch.randn(4, 12, dtype=torch.float64) for _ in range(2)]
    layer.eval()
    z_eval = layer(feats)
    layer.train()
    z_train = layer(feats)
    assert rel_err(z_train, z_eval) < 1e-10
    assert z_eval.shape == (4, 12)


def test_phantom_grad_close_to_implicit():
    torch.manual_seed(2)
    layer = contractive_layer(DEQFusion(12, 2, f_tol=1e-12, b_tol=1e-12, stop_mode="abs", f_max_iter=200,
                                       b_max_iter=200).double())
    feats = [torch.randn(6, 12, dtype=torch.float64) for _ in range(2)]
    layer(feats).square().sum().backward()
    assert layer.info.forward_stats.all_converged
    g_imp = torch.cat([p.grad.flatten() for p in layer.parameters()])
    layer.zero_grad()
    layer.grad, layer.phantom_steps, layer.phantom_lam = "phantom", 40, 1.0
    layer(feats).square().sum().backward()
    g_ph = torch.cat([p.grad.flatten() for p in layer.parameters()])
    cos = torch.nn.functional.cosine_similarity(g_imp, g_ph, dim=0)
    assert cos > 0.999


def test_jacobian_reg_matches_exact_frobenius():
    torch.manual_seed(3)
    A = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4000, 5, dtype=torch.float64, requires_grad=True)
    est = jacobian_reg(z @ A.T, z, n_samples=1)
    exact = A.square().sum() / 5  # ||J||_F^2 / numel per sample, averaged
    assert abs(float(est.detach()) - float(exact.detach())) / float(exact.detach()) < 0.05
    est.backward()  # differentiable (create_graph): d/dA of ~||A||_F^2 / 5 is ~2A / 5
    assert rel_err(A.grad, 2 * A.detach() / 5) < 0.1


def test_layer_jac_loss_and_backward_stats():
    torch.manual_seed(4)
    layer = DEQFusion(16, 3, jac_reg=1, on_nonconvergence="ignore")
    feats = [torch.randn(3, 16) for _ in range(3)]
    out, info = layer(feats, return_info=True)
    assert info.jac_loss > 0
    (out.sum() + info.jac_loss).backward()
    assert info.backward_stats is not None and layer.cell.w1.grad.abs().sum() > 0


def test_phantom_rejects_zero_steps():
    with pytest.raises(ValueError, match="phantom"):
        phantom_grad(lambda z: z, torch.zeros(1, 2), steps=0)
