"""Plain-PyTorch reference of the DEQ fusion cell f(z, x) and of its vector-Jacobian product.

This is the math every kernel is checked against (float64 in the tests). Notation, per sample:
  z = [z_1..z_N, z_f] : [B, N+1, D] (state), x = [x_1..x_N] : [B, N, D], x_f : [B, D]
  modality i : a1 = W1_i z_i + b1_i ; h = ReLU(GN1_i(a1)) ; a2 = W2_i h + b2_i + x_i
               u = GN2_i(a2) + z_i ; z_i+ = GN3_i(ReLU(u))
  fusion     : s = sum_i z_i+ + N z_f ; ga = W_g s + N b_g      (= sum_i alpha_i, shared gate)
               a3 = W_f (z_f * ga) + b_f + x_f ; z_f+ = GN_f(ReLU(a3))
The gate is one shared Linear, so sum_i z_f * (W_g(z_i+ + z_f) + b_g) = z_f * ga: one GEMM, not N.
"""
from typing import NamedTuple

import torch

from .groupnorm import gn_backward, gn_forward


class CellParams(NamedTuple):
    """Weights of an N-modality cell at width D (Linear convention: y = x @ W.T + b)."""
    w1: torch.Tensor   # [N, D, D]
    b1: torch.Tensor   # [N, D]
    w2: torch.Tensor   # [N, D, D]
    b2: torch.Tensor   # [N, D]
    gn1_w: torch.Tensor  # [N, D]  (and the same for every GN below)
    gn1_b: torch.Tensor
    gn2_w: torch.Tensor
    gn2_b: torch.Tensor
    gn3_w: torch.Tensor
    gn3_b: torch.Tensor
    wg: torch.Tensor   # [D, D] shared gate
    bg: torch.Tensor   # [D]
    wf: torch.Tensor   # [D, D]
    bf: torch.Tensor   # [D]
    gnf_w: torch.Tensor  # [D]
    gnf_b: torch.Tensor


def stacked_linear(v, w, b):
    """Per-modality Linear. v: [B, N, D], w: [N, D, D], b: [N, D] -> [B, N, D]."""
    return torch.einsum("bnk,ndk->bnd", v, w) + b


def fuse_inputs(x, weights, bias):
    """x_f = sum_i w_i x_i + b. x: [B, N, D], weights: [N], bias: [1] -> [B, D]. Elementwise on purpose:
    torch.autocast leaves it in x's dtype (an einsum would round the fused input to bf16/fp16)."""
    w = weights if weights.dtype == x.dtype else weights.to(x.dtype)  # (a .to call costs ~2 us)
    return (x * w.view(1, -1, 1)).sum(1) + bias


def cell_forward(z, x, xf, p: CellParams, groups: int = 4, save: bool = False):
    """f(z, x). z: [B, N+1, D], x: [B, N, D], xf: [B, D] -> [B, N+1, D].

    With save=True also returns the tensors that cell_vjp needs (so the adjoint solve replays no graph).
    """
    n = x.shape[1]
    zm, zf = z[:, :n], z[:, n]
    a1 = stacked_linear(zm, p.w1, p.b1)
    g1, s1 = gn_forward(a1, p.gn1_w, p.gn1_b, groups)
    h = torch.relu(g1)
    a2 = stacked_linear(h, p.w2, p.b2) + x
    g2, s2 = gn_forward(a2, p.gn2_w, p.gn2_b, groups)
    u = g2 + zm
    r = torch.relu(u)
    zm_new, s3 = gn_forward(r, p.gn3_w, p.gn3_b, groups)
    s = zm_new.sum(1) + n * zf
    ga = s @ p.wg.T + n * p.bg
    a3 = (zf * ga) @ p.wf.T + p.bf + xf
    zf_new, sf = gn_forward(torch.relu(a3), p.gnf_w, p.gnf_b, groups)
    out = torch.cat([zm_new, zf_new.unsqueeze(1)], 1)
    if not save:
        return out
    return out, dict(s1=s1, g1=g1, s2=s2, u=u, s3=s3, zf=zf, ga=ga, a3=a3, sf=sf)


def cell_vjp(gbar, saved, p: CellParams, groups: int = 4):
    """J^T gbar with J = df/dz at the point cell_forward(save=True) saw. gbar: [B, N+1, D] -> same."""
    n = gbar.shape[1] - 1
    # fusion branch
    da3 = gn_backward(gbar[:, n], p.gnf_w, saved["sf"], groups) * (saved["a3"] > 0)
    dq = da3 @ p.wf                     # d(z_f * ga)
    dga = dq * saved["zf"]
    ds = dga @ p.wg                     # d(s)
    dzf = dq * saved["ga"] + n * ds
    # modality branches: z_i+ feeds z_i+'s own output and s
    dzm_new = gbar[:, :n] + ds.unsqueeze(1)
    du = gn_backward(dzm_new, p.gn3_w, saved["s3"], groups) * (saved["u"] > 0)
    da2 = gn_backward(du, p.gn2_w, saved["s2"], groups)
    dh = torch.einsum("bnd,ndk->bnk", da2, p.w2) * (saved["g1"] > 0)
    da1 = gn_backward(dh, p.gn1_w, saved["s1"], groups)
    dzm = du + torch.einsum("bnd,ndk->bnk", da1, p.w1)
    return torch.cat([dzm, dzf.unsqueeze(1)], 1)


def cell_jac_backward(v, wbar, z, x, xf, p: CellParams, groups: int = 4):
    """The gradients of <wbar, J^T v> w.r.t. (z, x, xf, the 16 parameters), J = df/dz at (z, x): what the
    Jacobian loss ||J^T v||^2 needs (its gradient is this with wbar = 2 J^T v times the loss's cotangent).
    Autograd through cell_vjp of a differentiable cell_forward(save=True); the ReLU masks are constants,
    as autograd differentiates them. v, wbar, z: [B, N+1, D] -> (dz, dx, dxf, CellParams of gradients)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (z, x, xf, *p)]
        zz, xx, xxf, *pp = leaves
        _, saved = cell_forward(zz, xx, xxf, CellParams(*pp), groups, save=True)
        w = cell_vjp(v, saved, CellParams(*pp), groups)
        grads = torch.autograd.grad((w * wbar).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return grads[0], grads[1], grads[2], CellParams(*grads[3:])
