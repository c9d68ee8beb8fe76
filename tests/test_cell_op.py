"""The compiled C++ CPU cell ops (torch.ops.deqfuse.cell_forward / cell_vjp / cell_backward) against the
plain-PyTorch reference (deqfuse/reference/cell.py): float64 to round-off, float32 within the table, every
output and gradient, odd sizes, N = 1..5, every GroupNorm width the kernels specialise, batch sizes around
the row-block boundaries, thread counts; argument errors; autograd wrapper; the layer on this path."""
import pytest
import torch

import deqfuse
from deqfuse import DEQFusion
from deqfuse.cell import cell_path, ext_cell_with_grad
from deqfuse.reference.cell import CellParams, cell_forward, cell_vjp
from conftest import contractive_layer, make_inputs, make_params, rel_err

pytestmark = pytest.mark.skipif(deqfuse.extension_status()[0] is None, reason="compiled extension not built")

# relative error of the C++ op against the float64 reference, per dtype
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
# group width 2 (D / groups): GroupNorm of two values is ill-conditioned (yhat = +-1, the backward
# divides by a tiny spread), so its gradients get a looser bound in either dtype
TOL_NARROW_GROUPS = {torch.float64: 1e-10, torch.float32: 2e-2}

SHAPES = [  # (N, B, D, groups): N = 1..5, odd B and D, group widths 2/4/6/8/16/32/64 and a generic one
    (1, 1, 8, 4), (2, 5, 12, 4), (3, 37, 20, 4), (5, 7, 36, 6), (4, 3, 16, 1), (2, 65, 64, 4),
    (3, 130, 40, 2), (1, 129, 128, 2), (2, 63, 256, 4), (2, 9, 60, 3)]


def ops_params(p):
    return list(p)


def reference_grads(z, x, xf, p, groups, gout):
    leaves = [t.clone().requires_grad_() for t in (z, x, xf, *p)]
    out = cell_forward(*leaves[:3], CellParams(*leaves[3:]), groups)
    out.backward(gout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("N,B,D,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_vjp_backward_match_reference(N, B, D, groups, dtype):
    p64 = make_params(N, D)
    z64, x64, xf64 = make_inputs(B, N, D)
    g64 = torch.randn(B, N + 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out_r, saved_r = cell_forward(z64, x64, xf64, p64, groups, save=True)
    vjp_r = cell_vjp(g64, saved_r, p64, groups)
    _, grads_r = reference_grads(z64, x64, xf64, p64, groups, g64)
    p = [t.to(dtype) for t in p64]
    z, x, xf, g = (t.to(dtype) for t in (z64, x64, xf64, g64))
    tol = TOL[dtype]
    vtol = TOL_NARROW_GROUPS[dtype] if D // groups <= 2 else tol
    out_n, none = torch.ops.deqfuse.cell_forward(z, x, xf, p, groups, False)
    out, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, groups, True)
    assert none == [] and len(saved) == 13
    assert rel_err(out_n, out_r) < tol and torch.equal(out_n, out)
    assert rel_err(torch.ops.deqfuse.cell_vjp(g, saved, p, groups), vjp_r) < vtol
    add = torch.randn_like(g)
    assert rel_err(torch.ops.deqfuse.cell_vjp(g, saved, p, groups, add), vjp_r + add.double()) < vtol
    dz, dx, dxf, dp = torch.ops.deqfuse.cell_backward(g, z, saved, p, groups)
    for name, a, r in zip(["z", "x", "xf"] + list(CellParams._fields), [dz, dx, dxf, *dp], grads_r):
        assert a.shape == r.shape and a.dtype == dtype, name
        assert rel_err(a, r) < vtol, name


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_threads_or_blocking(threads):
    """Rows are split into blocks per thread count; every row's result stays the same (float64)."""
    N, B, D = 2, 203, 32
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, True)
        v = torch.ops.deqfuse.cell_vjp(z, saved, list(p), 4)
    finally:
        torch.set_num_threads(old)
    ref, saved_r = cell_forward(z, x, xf, p, 4, save=True)
    assert rel_err(out, ref) < 1e-13 and rel_err(v, cell_vjp(z, saved_r, p, 4)) < 1e-12
    # a sub-batch (another blocking) gives the same rows
    sub = torch.arange(5, 180, 3)
    out_s = torch.ops.deqfuse.cell_forward(z[sub], x[sub], xf[sub], list(p), 4, False)[0]
    assert rel_err(out_s, out[sub]) < 1e-13


def test_rows_are_independent_and_nan_stays_in_its_row():
    """NaN propagates like the reference (ReLU keeps NaN, as torch.relu does) and only within its row."""
    N, B, D = 2, 9, 16
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    z[4, 1, 3] = float("nan")
    out = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, False)[0]
    ref = cell_forward(z, x, xf, p, 4)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[4]).any()
    keep = [b for b in range(B) if b != 4]
    assert torch.isfinite(out[keep]).all()


def test_non_contiguous_inputs():
    N, B, D = 3, 6, 12
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)   # same values, other strides
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    w1t = p.w1.transpose(1, 2).contiguous().transpose(1, 2)
    pt = list(p._replace(w1=w1t))
    assert not zt.is_contiguous() and not w1t.is_contiguous()
    assert rel_err(torch.ops.deqfuse.cell_forward(zt, xt, xf, pt, 4, False)[0], cell_forward(z, x, xf, p, 4)) < 1e-13


@pytest.mark.parametrize("bad,match", [
    (lambda z, x, xf, p: (z[:, :1], x, xf, p, 4), r"z must hold N >= 1"),
    (lambda z, x, xf, p: (z, x[:, :1], xf, p, 4), r"x must have shape \[5, 2, 12\]"),
    (lambda z, x, xf, p: (z, x, xf.float(), p, 4), r"xf must have z's dtype"),
    (lambda z, x, xf, p: (z, x, xf, p[:15], 4), r"params must hold the 16"),
    (lambda z, x, xf, p: (z, x, xf, p[:3] + [p[3][:, :5]] + p[4:], 4), r"params\[3\] \(b2\) must have shape \[2, 12\]"),
    (lambda z, x, xf, p: (z, x, xf, p, 5), r"groups \(5\) must divide D \(12\)"),
    (lambda z, x, xf, p: (z.bfloat16(), x, xf, p, 4), r"z must be float32 or float64"),
])
def test_forward_errors_name_the_argument(bad, match):
    p, (z, x, xf) = make_params(2, 12), make_inputs(5, 2, 12)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deqfuse.cell_forward(*bad(z, x, xf, list(p)), False)


def test_vjp_and_backward_errors_name_the_argument():
    p, (z, x, xf) = make_params(2, 12), make_inputs(5, 2, 12)
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, True)
    with pytest.raises(RuntimeError, match="saved must hold the 13"):
        torch.ops.deqfuse.cell_vjp(z, saved[:12], list(p), 4)
    with pytest.raises(RuntimeError, match=r"saved\[5\] must have shape \[2, 5, 12\]"):
        torch.ops.deqfuse.cell_vjp(z, saved[:5] + [saved[5][:, :4]] + saved[6:], list(p), 4)
    with pytest.raises(RuntimeError, match="add must be a CPU tensor of gbar's shape"):
        torch.ops.deqfuse.cell_vjp(z, saved, list(p), 4, z[:2])
    with pytest.raises(RuntimeError, match="cell_backward: z .* must be a CPU tensor of gbar's shape"):
        torch.ops.deqfuse.cell_backward(z, z[:2], saved, list(p), 4)


def test_ops_are_not_differentiable_through_autograd_but_the_wrapper_is():
    p = [t.requires_grad_() for t in make_params(2, 8)]
    z, x, xf = make_inputs(3, 2, 8)
    out, _ = torch.ops.deqfuse.cell_forward(z, x, xf, p, 4, False)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()
    # the autograd wrapper: gradcheck against finite differences (float64), every input
    zr, xr, xfr = (t.clone().requires_grad_() for t in (z, x, xf))
    pr = [t.detach().clone().requires_grad_() for t in p]
    assert torch.autograd.gradcheck(lambda z, x, xf, *q: ext_cell_with_grad(z, x, xf, list(q), 4)[0],
                                    (zr, xr, xfr, *pr), atol=1e-7, rtol=1e-6)
    fz, _ = ext_cell_with_grad(zr, xr, xfr, pr, 4)
    g = torch.autograd.grad(fz.square().sum(), zr, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        g.sum().backward()


def test_cell_path_choice():
    z = torch.zeros(2, 3, 8)
    assert cell_path("auto", z) == "ext" and cell_path("cuda", z.double()) == "ext"
    assert cell_path("auto", z.bfloat16()) == "reference"  # the C++ op is float32/float64 only
    assert cell_path("reference", z) == "reference"


@pytest.mark.parametrize("grad", ["implicit", "phantom", "unrolled"])
def test_layer_on_the_cpp_path_matches_the_reference_path(grad):
    """DEQFusion with backend='auto' (C++ cell forward, VJP and backward on the CPU) gives the outputs
    and every gradient of backend='reference' (float64, fixed iterations)."""
    kw = dict(f_max_iter=40, b_max_iter=40, f_tol=1e-12, b_tol=1e-12, stop_mode="abs", grad=grad,
              on_nonconvergence="ignore")
    layers = [contractive_layer(DEQFusion(12, 3, backend=b, **kw).double()) for b in ("auto", "reference")]
    feats = [torch.randn(7, 12, dtype=torch.float64) for _ in range(3)]
    res = []
    for ly in layers:
        xs = [t.clone().requires_grad_() for t in feats]
        out = ly(xs)
        (out * torch.linspace(-1, 1, 12, dtype=torch.float64)).sum().backward()
        res.append([out.detach()] + [q.grad for q in ly.parameters()] + [t.grad for t in xs])
    for a, b in zip(*res):
        assert rel_err(a, b) < 1e-10


def test_jacobian_regulariser_keeps_the_double_differentiable_path():
    torch.manual_seed(0)
    ly = DEQFusion(8, 2, jac_reg=1, f_max_iter=8, b_max_iter=8, on_nonconvergence="ignore").double()
    out, info = ly([torch.randn(3, 8, dtype=torch.float64) for _ in range(2)], return_info=True)
    (out.sum() + info.jac_loss).backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in ly.parameters())
