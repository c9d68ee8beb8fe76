"""The main job: train small per-view encoders + a fusion layer + classifier on the UCI multiple-features
digits and compare fusion methods (concatenation, late fusion, DEQ fusion, DynMM, weight-tied unrolled).

    python -m deqfuse train [--epochs 25] [--dim 64] [--models concat,late,deq,dynmm,unrolled] [--out runs]
Prints accuracy / macro-F1 per method (and DynMM's compute saving), writes results.json, results.md
and convergence.png (DEQ solver residual vs iteration on the test set) into --out.
"""
import json
import os
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .data import VIEWS, load_uci_multifeature, split_standardize
from .dynamic import DynamicFusion, GumbelSchedule, SubsetExpert
from .layers import DEQFusion

METHODS = ("concat", "late", "deq", "dynmm", "unrolled")


class Encoders(nn.Module):
    """One Linear + LayerNorm + ReLU per view: list of [B, d_v] -> list of [B, D]."""

    def __init__(self, dims, D):
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(d, D), nn.LayerNorm(D), nn.ReLU()) for d in dims)

    def forward(self, views):
        return [e(v) for e, v in zip(self.enc, views)]


class FusionClassifier(nn.Module):
    def __init__(self, method: str, dims: List[int], D: int, classes: int, **deq_kw):
        super().__init__()
        self.method, self.enc = method, Encoders(dims, D)
        n = len(dims)
        if method == "concat":
            self.head = nn.Linear(n * D, classes)
        elif method == "late":
            self.heads = nn.ModuleList(nn.Linear(D, classes) for _ in dims)
        elif method in ("deq", "unrolled"):
            kw = dict(deq_kw, grad="unrolled") if method == "unrolled" else deq_kw
            self.fusion = DEQFusion(D, n, on_nonconvergence="ignore", **kw)
            self.head = nn.Linear(D, classes)
        else:
            raise ValueError(f"method must be one of {METHODS[:3] + METHODS[4:]}, got {method!r}")

    def forward(self, views):
        h = self.enc(views)
        if self.method == "concat":
            return self.head(torch.cat(h, 1))
        if self.method == "late":
            return torch.stack([hd(x) for hd, x in zip(self.heads, h)], 0).mean(0)
        return self.head(self.fusion(h))


class _ViewsToLogits(nn.Module):
    """Expert for DynMM: its own encoders over a subset of views + a head."""

    def __init__(self, dims, D, classes, method):
        super().__init__()
        self.net = FusionClassifier(method, dims, D, classes)

    def forward(self, feats):
        return self.net(feats)


def build_dynmm(dims, D, classes, lambda_cost=0.3):
    """Two experts as in DynMM: a cheap unimodal one (the pixel view) and a full concatenation fusion."""
    pix = VIEWS.index("pix")
    experts = [SubsetExpert([pix], _ViewsToLogits([dims[pix]], D // 2, classes, "concat")),
               SubsetExpert(list(range(len(dims))), _ViewsToLogits(dims, D, classes, "concat"))]
    return DynamicFusion(experts, dims, gate_hidden=32, tau=1.0, lambda_cost=lambda_cost)


def macro_f1(pred, y, classes):
    f1s = []
    for c in range(classes):
        tp = ((pred == c) & (y == c)).sum().item()
        fp = ((pred == c) & (y != c)).sum().item()
        fn = ((pred != c) & (y == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / classes


def train_one(method, data, D=64, epochs=25, batch=128, lr=2e-3, seed=0, progress=True, deq_kw=None,
              dynmm_lambda=0.3, return_model=False):
    """Train one method; returns its result dict (and the trained model if return_model)."""
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte), dims = data["train"], data["test"], data["dims"]
    classes = int(ytr.max()) + 1
    deq_kw = deq_kw or {}
    model = build_dynmm(dims, D, classes, dynmm_lambda) if method == "dynmm" else FusionClassifier(method, dims, D, classes, **deq_kw)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = GumbelSchedule(1.0, 0.85, 0.1)
    n = ytr.shape[0]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(range(epochs), desc=f"{method:>8}", disable=not progress or tqdm is None, leave=True) if tqdm else range(epochs)
    t0 = time.perf_counter()
    for ep in bar:
        model.train()
        if method == "dynmm":
            model.tau = sched(ep)
        perm = torch.randperm(n)
        total = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            logits = model([v[idx] for v in xtr])
            loss = F.cross_entropy(logits, ytr[idx])
            if method == "dynmm":
                loss = loss + model.resource_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if tqdm is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / n:.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = model(xte).argmax(1)
    res = dict(method=method, accuracy=(pred == yte).float().mean().item(), macro_f1=macro_f1(pred, yte, classes),
               train_seconds=round(train_s, 1), params=sum(p.numel() for p in model.parameters()))
    if method == "dynmm":
        info = model.info
        res.update(compute_saving=1 - info.realized_macs / info.full_macs, expert_counts=info.counts)
    if method == "deq":
        st = model.fusion.info.forward_stats
        res.update(solver_converged=f"{int(st.converged.sum())}/{st.converged.numel()}",
                   solver_mean_steps=round(float(st.nstep.float().mean()), 1),
                   rel_trace=st.rel_trace.tolist())
    return (res, model) if return_model else res


def plot_convergence(rel_trace, path):
    """Median and 10-90% band of the per-sample relative residual vs iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = torch.tensor(rel_trace, dtype=torch.float64)            # [T, B], NaN after a sample froze
    q = torch.nanquantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=1)
    it = range(1, t.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.fill_between(it, q[0], q[2], alpha=0.3, label="10-90% of samples still iterating")
    ax.plot(it, q[1], label="median (converged samples freeze and drop out)")
    ax.set(yscale="log", xlabel="Anderson iteration", ylabel="relative residual |f(z)-z|/|f(z)|",
           title="DEQ fusion solve, UCI multiple features (test set)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(methods=METHODS, epochs=25, D=64, out="runs", seed=0, progress=True, deq_kw=None,
        dynmm_lambda=0.3) -> List[Dict]:
    views, labels = load_uci_multifeature()
    data = split_standardize(views, labels, seed=seed)
    os.makedirs(out, exist_ok=True)
    results = [train_one(m, data, D=D, epochs=epochs, seed=seed, progress=progress, deq_kw=deq_kw,
                         dynmm_lambda=dynmm_lambda) for m in methods]
    lines = ["| method | accuracy | macro-F1 | notes |", "|---|---|---|---|"]
    for r in results:
        note = ""
        if r["method"] == "dynmm":
            note = f"compute saving {100 * r['compute_saving']:.1f}% (expert counts {r['expert_counts']})"
        if r["method"] == "deq":
            note = f"solver converged {r['solver_converged']}, mean steps {r['solver_mean_steps']}"
        lines.append(f"| {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {note} |")
    table = "\n".join(lines)
    print(table)
    deq = [r for r in results if r["method"] == "deq"]
    if deq:
        plot_convergence(deq[0]["rel_trace"], os.path.join(out, "convergence.png"))
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump([{k: v for k, v in r.items() if k != "rel_trace"} for r in results], fh, indent=1)
    return results
