"""The reference cell matches the official per-modality code, and its hand-written VJP matches autograd."""
import pytest
import torch
import torch.nn.functional as F

from deqfuse.reference import cell_forward, cell_vjp, gn_backward, gn_forward
from conftest import make_inputs, make_params, rel_err


def official_cell(z, x, xf, p, groups=4):
    """Literal transcription of DEQ_fusion.py's SimpleResidualBlock / DEQFusionBlock loops."""
    n = x.shape[1]
    outs = []
    for i in range(n):
        out = F.relu(F.group_norm(z[:, i] @ p.w1[i].T + p.b1[i], groups, p.gn1_w[i], p.gn1_b[i]))
        out = out @ p.w2[i].T + p.b2[i] + x[:, i]
        out = F.group_norm(out, groups, p.gn2_w[i], p.gn2_b[i]) + z[:, i]
        outs.append(F.group_norm(F.relu(out), groups, p.gn3_w[i], p.gn3_b[i]))
    zf = z[:, n]
    extracted = [zf * ((o + zf) @ p.wg.T + p.bg) for o in outs]  # gate(inj_feat + x), per modality
    fused = torch.stack(extracted, 0).sum(0) @ p.wf.T + p.bf + xf
    outs.append(F.group_norm(F.relu(fused), groups, p.gnf_w, p.gnf_b))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("B,N,D", [(1, 2, 8), (3, 3, 12), (37, 5, 20)])
def test_cell_matches_official_loop(B, N, D):
    p = make_params(N, D)
    z, x, xf = make_inputs(B, N, D)
    assert rel_err(cell_forward(z, x, xf, p), official_cell(z, x, xf, p)) < 1e-12


@pytest.mark.parametrize("B,N,D", [(1, 2, 8), (5, 3, 12), (9, 4, 36)])
def test_cell_vjp_matches_autograd(B, N, D):
    p = make_params(N, D)
    z, x, xf = make_inputs(B, N, D)
    z.requires_grad_(True)
    out, saved = cell_forward(z, x, xf, p, save=True)
    gbar = torch.randn_like(out)
    ref = torch.autograd.grad(out, z, gbar)[0]
    saved = {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in saved.items()}
    assert rel_err(cell_vjp(gbar, saved, p), ref) < 1e-10


def test_groupnorm_matches_torch_and_autograd():
    y = torch.randn(6, 3, 16, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    out, saved = gn_forward(y, w, b, 4)
    ref = torch.stack([F.group_norm(y[:, i], 4, w[i], b[i]) for i in range(3)], 1)
    assert rel_err(out, ref) < 1e-13
    d = torch.randn_like(out)
    (g_ref,) = torch.autograd.grad(ref, y, d)
    assert rel_err(gn_backward(d, w, tuple(t.detach() for t in saved), 4), g_ref) < 1e-12
