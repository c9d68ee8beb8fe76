"""Reproduction of the official code: a literal transcription of jinhong-ni/DEQFusion's DEQ_fusion.py
module and of its solver's `anderson` (float64, CPU), against DEQFusion.official(...) with
load_official_state_dict: the same fixed point, step count and training gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

from deqfuse import DEQFusion
from deqfuse.solvers import anderson_official
from conftest import rel_err


# ------------------------------------------------ transcription of the official code (DEQ_fusion.py)
def list2vec(z1_list):
    bsz = z1_list[0].size(0)
    return torch.cat([elem.reshape(bsz, -1) for elem in z1_list], dim=1)


def vec2list(z1, cutoffs):
    bsz = z1.shape[0]
    z1_list = []
    start_idx, end_idx = 0, cutoffs[0]
    for i in range(len(cutoffs)):
        z1_list.append(z1[:, start_idx:end_idx].view(bsz, cutoffs[i]))
        if i < len(cutoffs) - 1:
            start_idx = end_idx
            end_idx += cutoffs[i + 1]
    return z1_list


class SimpleResidualBlock(nn.Module):
    def __init__(self, out_dim):
        super().__init__()
        self.conv1 = nn.Linear(out_dim, out_dim)
        self.conv2 = nn.Linear(out_dim, out_dim)
        self.gn1 = nn.GroupNorm(4, out_dim, affine=True)
        self.gn2 = nn.GroupNorm(4, out_dim, affine=True)
        self.gn3 = nn.GroupNorm(4, out_dim, affine=True)

    def forward(self, x, injection_feature):
        residual = x
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.conv2(out) + injection_feature
        out = self.gn2(out)
        out += residual
        return self.gn3(F.relu(out))


class DEQFusionBlock(nn.Module):
    def __init__(self, num_out_dims):
        super().__init__()
        self.out_dim = num_out_dims[-1]
        self.gate = nn.Linear(num_out_dims[0], self.out_dim)
        self.fuse = nn.Linear(self.out_dim, self.out_dim)
        self.gn3 = nn.GroupNorm(4, self.out_dim, affine=True)

    def forward(self, x, injection_features, residual_feature):
        extracted = [torch.mul(x, self.gate(inj + x)) for inj in injection_features]
        out = self.fuse(torch.stack(extracted, dim=0).sum(dim=0)) + residual_feature
        return self.gn3(F.relu(out))


class DEQFusionLayer(nn.Module):
    def __init__(self, num_out_dims):
        super().__init__()
        self.num_branches = len(num_out_dims)
        self.branches = nn.ModuleList([SimpleResidualBlock(num_out_dims[i]) for i in range(self.num_branches - 1)]
                                      + [DEQFusionBlock(num_out_dims)])

    def forward(self, x, injection):
        outs = [self.branches[i](x[i], injection[i]) for i in range(self.num_branches - 1)]
        outs.append(self.branches[-1](x[-1], outs, injection[-1]))
        return outs


def official_anderson(f, x0, m=6, lam=1e-4, threshold=50, eps=1e-3, stop_mode="rel", beta=1.0):
    """solver.py's anderson (torch.solve -> torch.linalg.solve, the traces' bookkeeping kept)."""
    bsz, L = x0.shape
    X = torch.zeros(bsz, m, L, dtype=x0.dtype)
    Fm = torch.zeros(bsz, m, L, dtype=x0.dtype)
    X[:, 0], Fm[:, 0] = x0.reshape(bsz, -1), f(x0).reshape(bsz, -1)
    X[:, 1], Fm[:, 1] = Fm[:, 0], f(Fm[:, 0].reshape_as(x0)).reshape(bsz, -1)
    H = torch.zeros(bsz, m + 1, m + 1, dtype=x0.dtype)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = torch.zeros(bsz, m + 1, 1, dtype=x0.dtype)
    y[:, 0] = 1
    lowest = 1e8
    for k in range(2, threshold):
        n = min(k, m)
        G = Fm[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=x0.dtype)[None]
        alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], y[:, :n + 1])[:, 1:n + 1, 0]
        X[:, k % m] = beta * (alpha[:, None] @ Fm[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        Fm[:, k % m] = f(X[:, k % m].reshape_as(x0)).reshape(bsz, -1)
        gx = (Fm[:, k % m] - X[:, k % m]).view_as(x0)
        abs_diff = gx.norm().item()
        rel_diff = abs_diff / (1e-5 + Fm[:, k % m].norm().item())
        diff = abs_diff if stop_mode == "abs" else rel_diff
        if diff < lowest:
            lowest_xest, lowest, lowest_step = X[:, k % m].view_as(x0).clone().detach(), diff, k
        if diff < eps:
            break
    return dict(result=lowest_xest, nstep=lowest_step)


class OfficialDEQFusion(nn.Module):
    """DEQ_fusion.DEQFusion (forward solve abs, adjoint rel, from zeros), float64 and CPU."""

    def __init__(self, dim, n, f_thres=55, b_thres=56, stop_mode="abs"):
        super().__init__()
        self.f_thres, self.b_thres, self.stop_mode = f_thres, b_thres, stop_mode
        self.func_ = DEQFusionLayer([dim] * (n + 1))
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in range(n)])
        self.bias = nn.Parameter(torch.zeros(1))
        self.hook = None

    def forward(self, features):
        fusion_feature = torch.stack([self.weights[i] * f for i, f in enumerate(features)], dim=0).sum(dim=0) + self.bias
        x_list = list(features) + [fusion_feature]
        cutoffs = [x.shape[1] for x in x_list]
        z1 = torch.zeros(features[0].shape[0], sum(cutoffs), dtype=features[0].dtype)
        func = lambda z: list2vec(self.func_(vec2list(z, cutoffs), x_list))  # noqa: E731
        with torch.no_grad():
            result = official_anderson(func, z1, threshold=self.f_thres, stop_mode=self.stop_mode)
            z1 = result["result"]
        new_z1 = z1
        if self.training:
            new_z1 = func(z1.requires_grad_())

            def backward_hook(grad):
                if self.hook is not None:
                    self.hook.remove()
                return official_anderson(lambda y: autograd.grad(new_z1, z1, y, retain_graph=True)[0] + grad,
                                         torch.zeros_like(grad), threshold=self.b_thres)["result"]
            self.hook = new_z1.register_hook(backward_hook)
        return vec2list(new_z1, cutoffs)[-1], result


def official_and_ours(dim=16, n=3, seed=0):
    torch.manual_seed(seed)
    off = OfficialDEQFusion(dim, n).double()
    with torch.no_grad():  # GroupNorm affine parameters off their 1/0 init, weights away from 1
        for p in off.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = DEQFusion.official(dim, n, on_nonconvergence="ignore").double()
    ours.load_official_state_dict(off.state_dict())
    return off, ours


# ----------------------------------------------------------------------------------------- tests
def test_loaded_weights_give_the_official_cell():
    off, ours = official_and_ours()
    x = [torch.randn(5, 16, dtype=torch.float64) for _ in range(3)]
    z = [torch.randn(5, 16, dtype=torch.float64) for _ in range(4)]
    xf = sum(w * f for w, f in zip(off.weights, x)) + off.bias
    ref = list2vec(off.func_(z, x + [xf]))
    got = ours.cell(torch.stack(z, 1), torch.stack(x, 1), xf, "reference").reshape(5, -1)
    assert rel_err(got, ref) < 1e-12


def test_official_preset_reproduces_the_official_solve_and_gradients():
    off, ours = official_and_ours()
    feats = [torch.randn(6, 16, dtype=torch.float64) for _ in range(3)]
    off.eval(), ours.eval()
    with torch.no_grad():
        ref, res = off(feats)
        out, info = ours(feats, return_info=True)
    assert rel_err(out, ref) < 1e-10 and int(info.forward_stats.nstep[0]) == res["nstep"] + 1
    off.train(), ours.train()
    r = torch.randn(6, 16, dtype=torch.float64)
    xs = [f.clone().requires_grad_() for f in feats]
    (off(xs)[0] * r).sum().backward()
    g_off = [p.grad.clone() for p in off.func_.parameters()] + [x.grad.clone() for x in xs]
    xs = [f.clone().requires_grad_() for f in feats]
    (ours(xs) * r).sum().backward()
    c = ours.cell
    N = 3
    g_ours = []
    for i in range(N):  # the official parameter order: branches i: conv1, conv2, gn1, gn2, gn3 (w, b)
        g_ours += [c.w1.grad[i], c.b1.grad[i], c.w2.grad[i], c.b2.grad[i], c.gn1_w.grad[i], c.gn1_b.grad[i],
                   c.gn2_w.grad[i], c.gn2_b.grad[i], c.gn3_w.grad[i], c.gn3_b.grad[i]]
    g_ours += [c.wg.grad, c.bg.grad, c.wf.grad, c.bf.grad, c.gnf_w.grad, c.gnf_b.grad] + [x.grad for x in xs]
    for a, b in zip(g_ours, g_off):
        assert rel_err(a, b) < 1e-7


def test_anderson_official_is_the_transcription():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(5, 12, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ A.T + b)  # noqa: E731
    for stop_mode, eps, conv in (("abs", 1e-6, True), ("rel", 1e-6, True), ("abs", 1e-12, False)):
        ref = official_anderson(f, torch.zeros(5, 12, dtype=torch.float64), threshold=40, eps=eps, stop_mode=stop_mode)
        z, st = anderson_official(f, torch.zeros(5, 12, dtype=torch.float64), max_iter=40, tol=eps, stop_mode=stop_mode)
        assert torch.equal(z, ref["result"]) and int(st.nstep[0]) == ref["nstep"] + 1
        assert bool(st.converged.all()) == conv  # (the absolute Tikhonov term stalls it short of 1e-12)


def test_loader_finds_the_prefix_and_checks_shapes():
    off, _ = official_and_ours()
    sd = {"deq_fusion." + k: v for k, v in off.state_dict().items()}
    sd["classifier.weight"] = torch.zeros(3)
    ours = DEQFusion.official(16, 3).double().load_official_state_dict(sd)
    assert torch.equal(ours.cell.w2[1], off.func_.branches[1].conv2.weight)
    with pytest.raises(ValueError, match=r"this layer needs \[8, 8\]"):
        DEQFusion.official(8, 3).double().load_official_state_dict(sd)
    with pytest.raises(ValueError, match="expected one official DEQFusion"):
        DEQFusion.official(16, 3).load_official_state_dict({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="cuda_graph=True needs a graph-capturable solver"):
        DEQFusion.official(16, 3, cuda_graph=True)
