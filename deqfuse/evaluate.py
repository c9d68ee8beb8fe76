"""`python -m deqfuse eval`: fusion methods compared on a multimodal data set over several seeds, with
model selection on validation data only, and the compute each method spends.

    python -m deqfuse eval --data brca --seeds 5 [--methods all|name,...] [--epochs 100] [--dim 64] [--tune]
                           [--lambdas 0,0.3,1,3] [--memory] [--out runs_eval]
    python -m deqfuse eval --data FILE.npz | FILE.csv --view-prefixes P0,P1,... [--label-col label] ...

--data: a built-in data set (DATASETS) or your own .npz / .csv file (data.load_views_file); labels may be
any integers and are mapped to classes 0..C-1 in increasing order (printed, and in results.json).

Per seed: a stratified train / val / test split (60/20/20, `data.split_indices`), per-view standardisation
fitted on the training part; every method trains on the same split with the same backbone (per view:
Linear -> LayerNorm -> ReLU -> Dropout to width D) and the same optimiser (Adam, minibatches); after
each epoch it is scored on val (accuracy + weighted F1 + macro F1) and the best epoch's weights are kept;
test metrics are read once, at that checkpoint. --tune also selects, per seed and method, the hidden
width and learning rate (and deq+jac's regulariser weight) on val (TUNE_GRID). Reported: mean +- std over seeds of test accuracy,
weighted F1, macro F1; MACs per sample of the eval forward (torch.utils.flop_counter, which deqfuse's
compiled ops report to: GEMM MACs of what actually ran, e.g. only the solver iterations and rows a DEQ
used, only the experts DynMM chose, its gate); inference wall time on the test set; the DEQ's solver iterations per sample.

Methods: single:<i> (one view), concat, late (mean of per-view heads), deq (implicit gradient), deq+jac
(plus the Jacobian regulariser), unrolled:<k> (the weight-tied cell applied k times, full backprop: the
paper's ablation), dynmm (DynMM, modality level: a cheap single-view expert and a full concatenation
expert), dynmm+deq (the full expert is a DEQ fusion). --lambdas sweeps DynMM's resource weight (accuracy
against realised MACs); --memory measures the training graph's saved-tensor bytes of DEQ against the
unrolled network as depth grows.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .dynamic import ConcatGate, DynamicFusion, GumbelSchedule, SubsetExpert, count_macs
from .layers import DEQFusion
from .train import adam, f1_scores, plot_residual_band, train_epoch

DATASETS = ("brca", "digits")


@dataclass
class HParams:
    """Training recipe (the same for every method; chosen on validation data, see RESULTS.md)."""
    dim: int = 64
    epochs: int = 100
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.3
    f_max_iter: int = 30
    b_max_iter: int = 30
    f_tol: float = 1e-3              # forward and adjoint tolerance (rel) of the DEQ methods
    jac_weight: float = 20.0         # deq+jac: loss + jac_weight * ||J||_F^2 / dim (Hutchinson, 1 sample);
                                     # 20 (the official BRCA value) was best on val: benchmarks/recipe_ablation.py
    dynmm_lambda: float = 0.3
    dynmm_cheap: str = "auto"        # index of the cheap expert's view, or 'auto' (see pick_cheap_view)
    gate_hidden: int = 8             # DynMM's gate: Linear(sum d_v, gate_hidden) -> ReLU -> Linear(., 2)


def load(name: str, label_col: Optional[str] = None, view_prefixes: Optional[List[str]] = None):
    """(views [n, d_v] float32 arrays, labels [n] int64): a built-in data set (DATASETS), else the file
    `name` (data.load_views_file, with the .csv's label_col and view_prefixes; DataError if unusable)."""
    from .data import load_brca, load_uci_multifeature, load_views_file
    if name in DATASETS:
        return load_brca() if name == "brca" else load_uci_multifeature()
    return load_views_file(name, label_col, view_prefixes)


# ------------------------------------------------------------------------------------------- models
class Encoder(nn.Module):
    """One view [B, d] -> [B, D]: Linear -> LayerNorm -> ReLU -> Dropout."""

    def __init__(self, d_in: int, D: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, D), nn.LayerNorm(D), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class FusionNet(nn.Module):
    """Encoders of the given views + a fusion + a linear classifier. views: which of the data's views it
    reads (an expert of DynMM reads a subset); method: single | concat | late | deq | deq+jac | unrolled:<k>."""

    def __init__(self, method: str, dims: List[int], views: List[int], classes: int, hp: HParams):
        super().__init__()
        self.method, self.views = method, list(views)
        D, n = hp.dim, len(views)
        self.enc = nn.ModuleList(Encoder(dims[v], D, hp.dropout) for v in views)
        self.jac_weight = 0.0
        if method in ("single", "concat"):
            self.head = nn.Linear(n * D, classes)
        elif method == "late":
            self.heads = nn.ModuleList(nn.Linear(D, classes) for _ in views)
        elif method in ("deq", "deq+jac") or method.startswith("unrolled:"):
            kw = dict(f_max_iter=hp.f_max_iter, b_max_iter=hp.b_max_iter, f_tol=hp.f_tol, b_tol=hp.f_tol,
                      on_nonconvergence="ignore")
            if method.startswith("unrolled:"):
                kw.update(grad="unrolled", unrolled_steps=int(method.split(":")[1]))
            if method == "deq+jac":
                kw.update(jac_reg=1)
                self.jac_weight = hp.jac_weight
            self.fusion = DEQFusion(D, n, **kw)
            self.head = nn.Linear(D, classes)
        else:
            raise ValueError(f"unknown fusion method {method!r}")

    def forward(self, feats):
        h = [e(feats[v]) for e, v in zip(self.enc, self.views)]
        if self.method == "late":
            return torch.stack([hd(x) for hd, x in zip(self.heads, h)], 0).mean(0)
        if hasattr(self, "fusion"):
            return self.head(self.fusion(h))
        return self.head(torch.cat(h, 1) if len(h) > 1 else h[0])

    def extra_loss(self):
        if self.jac_weight and self.training and self.fusion.info is not None:
            return self.jac_weight * self.fusion.info.jac_loss
        return 0.0


def pick_cheap_view(dims: List[int], single_val: Optional[Dict[int, float]] = None) -> int:
    """DynMM's cheap expert: among the views whose single-view validation accuracy is within 2 points of
    the best single view, the one with the fewest input features (the cheapest encoder); without
    single-view results, simply the view with the fewest features."""
    if single_val:
        best = max(single_val.values())
        good = [v for v, a in single_val.items() if a >= best - 0.02]
        return min(good, key=lambda v: dims[v])
    return int(np.argmin(dims))


def build(method: str, dims: List[int], classes: int, hp: HParams, cheap: int = 0) -> nn.Module:
    allv = list(range(len(dims)))
    if method.startswith("single:"):
        return FusionNet("single", dims, [int(method.split(":")[1])], classes, hp)
    if method in ("dynmm", "dynmm+deq"):
        full = "deq" if method == "dynmm+deq" else "concat"
        experts = [SubsetExpert([cheap], FusionNet("single", [dims[cheap]], [0], classes, hp)),
                   SubsetExpert(allv, FusionNet(full, dims, allv, classes, hp))]
        return DynamicFusion(experts, ConcatGate(dims, 2, hp.gate_hidden), tau=1.0, lambda_cost=hp.dynmm_lambda)
    return FusionNet(method, dims, allv, classes, hp)


# ------------------------------------------------------------------------------------------ metrics
def scores(model: nn.Module, x, y, classes: int) -> Dict[str, float]:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    macro, weighted = f1_scores(pred, y, classes)
    return dict(accuracy=float((pred == y).float().mean()), weighted_f1=weighted, macro_f1=macro)


def macs_per_sample(model: nn.Module, x) -> float:
    """MACs per sample of the eval forward on x (torch.utils.flop_counter: deqfuse's compiled ops report
    theirs, so on any backend): only what ran (solver rows and iterations, chosen experts, the gate)."""
    return count_macs(model, (x,))


def infer_ms(model: nn.Module, x, reps: int = 5) -> float:
    from .benchmarking import time_ms
    model.eval()
    with torch.no_grad():
        return time_ms(lambda: model(x), reps=reps, warmup=1)


# ---------------------------------------------------------------------------------------- training
def fit(method: str, data: dict, hp: HParams, seed: int, cheap: int = 0, progress=None, return_model: bool = False):
    """Train one method on data's train part, select the epoch on val, report test at that epoch
    (and return the model at that epoch too if return_model)."""
    from . import distributed as ddp
    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    classes, dims = data["classes"], data["dims"]
    model = build(method, dims, classes, hp, cheap)
    opt = adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    sched = GumbelSchedule(1.0, 0.9, 0.1)
    net = ddp.wrap(model)  # DDP under torchrun (every rank then sees identical models and scores)
    extra = model.resource_loss if isinstance(model, DynamicFusion) else model.extra_loss
    best, best_state, best_epoch = -1.0, None, -1
    t0 = time.perf_counter()
    for ep in range(hp.epochs):
        if isinstance(model, DynamicFusion):
            model.tau = sched(ep)
        train_epoch(net, opt, xtr, ytr, hp.batch, extra, min_rows=2)
        val = scores(model, xva, yva, classes)
        key = val["accuracy"] + val["weighted_f1"] + val["macro_f1"]
        if key > best:
            best, best_state, best_epoch = key, copy.deepcopy(model.state_dict()), ep
        if progress is not None:
            progress.set_postfix_str(f"{method} seed {seed} epoch {ep + 1}/{hp.epochs} val acc {val['accuracy']:.3f}")
    train_s = time.perf_counter() - t0
    model.load_state_dict(best_state)
    res = dict(method=method, seed=seed, best_epoch=best_epoch, train_seconds=round(train_s, 2),
               val=scores(model, xva, yva, classes), test=scores(model, xte, yte, classes),
               macs_per_sample=macs_per_sample(model, xte), infer_ms=infer_ms(model, xte),
               params=sum(p.numel() for p in model.parameters()))
    model.eval()
    with torch.no_grad():
        model(xte)
    deq = next((m for m in model.modules() if isinstance(m, DEQFusion)), None)
    if isinstance(model, DynamicFusion):
        info = model.info
        res.update(cheap_view=cheap, expert_counts=info.counts,
                   mac_saving_vs_full_expert=1 - info.realized_macs / info.full_macs)
    if deq is not None and deq.grad != "unrolled" and deq.info is not None and deq.info.forward_stats is not None:
        st = deq.info.forward_stats
        res.update(solver_converged=int(st.converged.sum()), solver_batch=int(st.converged.numel()),
                   solver_steps=st.nstep.tolist(), solver_rel_trace=st.rel_trace.tolist())
    return (res, model) if return_model else res


# ------------------------------------------------------------------------------------ memory study
def training_graph_bytes(method: str, dims: List[int], classes: int, hp: HParams, batch: int = 64) -> int:
    """Bytes of the tensors autograd saves for the backward of one training forward (deduplicated by
    storage): the training memory that grows with depth for the unrolled network and not for the DEQ."""
    torch.manual_seed(0)
    model = build(method, dims, classes, hp).train()
    x = [torch.randn(batch, d) for d in dims]
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    # (the implicit adjoint's closure holds z*, the inputs and the cell's saved tensors: the same storages)
    return sum(seen.values())


# --------------------------------------------------------------------------------------- reporting
def summarize(results: List[dict]) -> List[dict]:
    """Per method: mean and std over seeds of the test metrics, and the compute columns."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method]
        row = dict(method=method, seeds=len(rs))
        for k in ("accuracy", "weighted_f1", "macro_f1"):
            vals = np.array([r["test"][k] for r in rs])
            row[k], row[k + "_std"] = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        row["val_score"] = float(np.mean([sum(r["val"].values()) for r in rs]))  # what selection saw
        for k in ("macs_per_sample", "infer_ms", "train_seconds", "params"):
            row[k] = float(np.mean([r[k] for r in rs]))
        if "solver_steps" in rs[0]:
            steps = np.concatenate([r["solver_steps"] for r in rs])
            row["solver_mean_steps"] = float(steps.mean())
            row["solver_converged"] = f"{sum(r['solver_converged'] for r in rs)}/{sum(r['solver_batch'] for r in rs)}"
        if "mac_saving_vs_full_expert" in rs[0]:
            row["mac_saving_vs_full_expert"] = float(np.mean([r["mac_saving_vs_full_expert"] for r in rs]))
        rows.append(row)
    return rows


def markdown(rows: List[dict]) -> str:
    out = ["| method | accuracy | weighted F1 | macro F1 | val (acc+wF1+mF1) | MACs / sample | inference (ms, test set) | notes |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = []
        if "solver_mean_steps" in r:
            note.append(f"solver: mean {r['solver_mean_steps']:.1f} steps, converged {r['solver_converged']}")
        if "mac_saving_vs_full_expert" in r:
            note.append(f"saves {100 * r['mac_saving_vs_full_expert']:.0f}% of the full expert's MACs (gate included)")
        out.append(f"| {r['method']} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} | {r['weighted_f1']:.4f} ± "
                   f"{r['weighted_f1_std']:.4f} | {r['macro_f1']:.4f} ± {r['macro_f1_std']:.4f} | {r['val_score']:.3f} | "
                   f"{r['macs_per_sample'] / 1e3:.1f} k | {r['infer_ms']:.2f} | {'; '.join(note)} |")
    return "\n".join(out)


def plot_accuracy_vs_macs(rows: List[dict], sweep: List[dict], path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["method"].startswith("dynmm"):
            continue
        ax.errorbar(r["macs_per_sample"] / 1e3, r["accuracy"], yerr=r["accuracy_std"], fmt="o", ms=4, capsize=2)
        ax.annotate(r["method"], (r["macs_per_sample"] / 1e3, r["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if sweep:
        for full in dict.fromkeys(s["method"] for s in sweep):
            pts = sorted((s["macs_per_sample"] / 1e3, s["accuracy"], s["lambda"]) for s in sweep if s["method"] == full)
            xs, ys, ls = zip(*pts)
            ax.plot(xs, ys, "-s", ms=4, label=f"{full}, resource weight sweep")
            for x, y, lam in pts:
                ax.annotate(f"λ={lam:g}", (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
        ax.legend(fontsize=7)
    ax.set(xlabel="GEMM MACs per sample (thousands)", ylabel="test accuracy (mean ± std over seeds)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(mem: Dict[str, int], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    depths = sorted(int(k.split(":")[1]) for k in mem if k.startswith("unrolled:"))
    ax.plot(depths, [mem[f"unrolled:{d}"] / 2 ** 20 for d in depths], "-o", ms=4, label="weight-tied unrolled, depth k")
    ax.axhline(mem["deq"] / 2 ** 20, color="C1", label="DEQ fusion (implicit gradient, any iteration count)")
    ax.set(xscale="log", xlabel="depth k (cell applications)", ylabel="MiB saved for backward (batch 64)",
           title="Training memory of the fusion")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_solver(results: List[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    deq = [r for r in results if r["method"] == "deq" and "solver_steps" in r]
    if not deq:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = np.concatenate([r["solver_steps"] for r in deq])
    a1.hist(steps, bins=range(1, int(steps.max()) + 2), color="C0")
    a1.set(xlabel="solver steps to the returned iterate (test samples, all seeds)", ylabel="samples")
    plot_residual_band(a2, deq[0]["solver_rel_trace"])  # seed 0
    a2.set(ylabel="relative residual (samples still iterating)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --tune: per seed and method, the configuration with the best validation score is kept (test read once)
TUNE_GRID = dict(dim=(64, 128), lr=(1e-3, 3e-4))
TUNE_JAC = (1.0, 5.0, 20.0)  # deq+jac also tunes the Jacobian-regulariser weight


def configs(method: str, hp: HParams, tune: bool) -> List[HParams]:
    if not tune:
        return [hp]
    out = [HParams(**{**asdict(hp), "dim": d, "lr": lr}) for d in TUNE_GRID["dim"] for lr in TUNE_GRID["lr"]]
    if method == "deq+jac":
        out = [HParams(**{**asdict(c), "jac_weight": j}) for c in out for j in TUNE_JAC]
    return out


def fit_selected(method: str, data: dict, hp: HParams, seed: int, cheap: int, tune: bool, progress=None) -> dict:
    """fit() for each configuration of the grid; the one with the best validation score is reported."""
    best = None
    for cfg in configs(method, hp, tune):
        r = fit(method, data, cfg, seed, cheap, progress)
        key = sum(r["val"].values())
        if best is None or key > best[0]:
            best = (key, r, cfg)
    r = best[1]
    if tune:
        r["config"] = dict(dim=best[2].dim, lr=best[2].lr, jac_weight=best[2].jac_weight if method == "deq+jac" else None)
    return r


ALL_METHODS = ("single", "concat", "late", "deq", "deq+jac", "unrolled:1", "unrolled:4", "unrolled:16", "dynmm",
               "dynmm+deq")


def expand_methods(spec: str, n_views: int) -> List[str]:
    names = list(ALL_METHODS) if spec == "all" else [m for m in spec.split(",") if m]
    out = []
    for m in names:
        out += [f"single:{i}" for i in range(n_views)] if m == "single" else [m]
    for m in out:
        ok = m in ALL_METHODS or (m.startswith("single:") and m[7:].isdigit() and int(m[7:]) < n_views) or \
            (m.startswith("unrolled:") and m[9:].isdigit() and int(m[9:]) >= 1)
        if not ok:
            raise ValueError(f"--methods: unknown method {m!r} (choose from {', '.join(ALL_METHODS)}, single:<i>, unrolled:<k>)")
    return out


def run(data_name: str = "brca", seeds: int = 5, methods: str = "all", hp: Optional[HParams] = None,
        out: str = "runs_eval", lambdas: Optional[List[float]] = None, memory: bool = False,
        progress: bool = True, tune: bool = False, file_kw: Optional[dict] = None) -> dict:
    """data_name: a built-in data set or a data file (load; file_kw: its label_col / view_prefixes)."""
    from . import distributed as ddp
    from .data import split_indices, standardize
    hp = hp or HParams()
    ddp.init_from_env()  # under torchrun: every rank trains each job data-parallel; rank 0 reports
    main = ddp.is_main()
    progress = progress and main
    views, labels = load(data_name, **(file_kw or {}))
    label_values, labels = np.unique(labels, return_inverse=True)  # classes 0..C-1 in label order
    labels = labels.astype(np.int64)
    if main and not np.array_equal(label_values, np.arange(len(label_values))):
        print(f"labels mapped to classes 0..{len(label_values) - 1}: "
              + ", ".join(f"{v} -> {c}" for c, v in enumerate(label_values.tolist())))
    names = expand_methods(methods, len(views))
    if main:
        os.makedirs(out, exist_ok=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(s, m, c) for s in range(seeds) for m in names for c in configs(m, hp, tune)]
    jobs += [(s, "sweep", lam) for s in range(seeds) for lam in (lambdas or [])]
    bar = tqdm(total=len(jobs), desc=f"eval {data_name}", disable=not progress or tqdm is None) if tqdm else None
    results, sweep_raw = [], []
    for seed in range(seeds):
        data = standardize(views, labels, split_indices(labels, seed))
        single_val = {}
        for m in names:
            cheap = int(hp.dynmm_cheap) if hp.dynmm_cheap != "auto" else pick_cheap_view(data["dims"], single_val)
            r = fit_selected(m, data, hp, seed, cheap, tune, bar)
            if m.startswith("single:"):
                single_val[int(m.split(":")[1])] = r["val"]["accuracy"]
            results.append(r)
            if bar is not None:
                bar.update(len(configs(m, hp, tune)))
        for lam in lambdas or []:
            cheap = int(hp.dynmm_cheap) if hp.dynmm_cheap != "auto" else pick_cheap_view(data["dims"], single_val)
            r = fit("dynmm", data, HParams(**{**asdict(hp), "dynmm_lambda": lam}), seed, cheap, bar)
            r["lambda"] = lam
            sweep_raw.append(r)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rows = summarize(results)
    sweep = []
    for lam in lambdas or []:
        rs = [r for r in sweep_raw if r["lambda"] == lam]
        sweep.append(dict(method="dynmm", **{"lambda": lam}, accuracy=float(np.mean([r["test"]["accuracy"] for r in rs])),
                          accuracy_std=float(np.std([r["test"]["accuracy"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                          macro_f1=float(np.mean([r["test"]["macro_f1"] for r in rs])),
                          macs_per_sample=float(np.mean([r["macs_per_sample"] for r in rs])),
                          mac_saving_vs_full_expert=float(np.mean([r["mac_saving_vs_full_expert"] for r in rs]))))
    if not main:
        return dict(summary=rows, sweep=sweep, memory={}, runs=results)
    table = markdown(rows)
    print(table)
    mem = {}
    if memory:
        data = standardize(views, labels, split_indices(labels, 0))
        for m in ["deq"] + [f"unrolled:{k}" for k in (1, 2, 4, 8, 16, 32)]:
            mem[m] = training_graph_bytes(m, data["dims"], data["classes"], hp)
        plot_memory(mem, os.path.join(out, "memory.png"))
        print("training graph MiB:", {k: round(v / 2 ** 20, 2) for k, v in mem.items()})
    plot_accuracy_vs_macs(rows, sweep, os.path.join(out, "accuracy_vs_macs.png"),
                          f"{os.path.basename(data_name)}: {seeds} seeds")
    plot_solver(results, os.path.join(out, "solver.png"))
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("solver_rel_trace",)} for r in results + sweep_raw]
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(dict(data=data_name, label_values=label_values.tolist(), seeds=seeds, hparams=asdict(hp),
                       tuned=tune,
                       tune_grid=dict(TUNE_GRID, jac_weight=TUNE_JAC) if tune else None, summary=rows, lambda_sweep=sweep,
                       memory_bytes=mem, runs=slim), fh, indent=1)
    return dict(summary=rows, sweep=sweep, memory=mem, runs=results)
