"""The main job: train small per-view encoders + a fusion layer + classifier on the UCI multiple-features
digits and compare fusion methods (concatenation, late fusion, DEQ fusion, DynMM, weight-tied unrolled).

    python -m deqfuse train [--epochs 25] [--dim 64] [--models concat,late,deq,dynmm,unrolled] [--out runs]
Prints accuracy / macro-F1 per method (and DynMM's compute saving), writes results.json, results.md
and convergence.png (DEQ solver residual vs iteration on the test set) into --out.
"""
import hashlib
import json
import os
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import VIEWS, load_uci_multifeature, split_standardize
from .dynamic import ConcatGate, DynamicFusion, GumbelSchedule, SubsetExpert
from .layers import DEQFusion

METHODS = ("concat", "late", "deq", "dynmm", "unrolled")
BATCH, LR = 128, 2e-3  # train_one's minibatch and Adam learning rate


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


def dynmm_gate_epochs(epochs: int) -> int:
    """Epochs of DynMM's second stage (the gate) after `epochs` of the first (the experts)."""
    return max(5, epochs // 2)


class _Experts(nn.Module):
    """DynMM's first stage as a module (for DDP): every expert of a DynamicFusion on every sample -> their
    outputs (each trained on its own loss; the gate and the resource loss wait)."""

    def __init__(self, dyn):
        super().__init__()
        self.experts, self.encoders = dyn.experts, dyn.encoders
        object.__setattr__(self, "dyn", dyn)  # not a submodule: DDP sees the experts' parameters only

    def forward(self, xs):
        return self.dyn.expert_outputs(xs)


def build_dynmm(dims, D, classes, lambda_cost=0.0, target=0.3):
    """Two experts as in DynMM: a cheap unimodal one (the pixel view) and a full concatenation fusion; saving
    against the full one."""
    pix = VIEWS.index("pix")
    experts = [SubsetExpert([pix], _ViewsToLogits([dims[pix]], D // 2, classes, "concat")),
               SubsetExpert(list(range(len(dims))), _ViewsToLogits(dims, D, classes, "concat"))]
    # a small gate over the concatenated views; the resource weight follows the dual update toward the
    # saving target (target 0: a fixed lambda_cost)
    return DynamicFusion(experts, ConcatGate(dims, 2, 8), tau=1.0, lambda_cost=lambda_cost, target_saving=target or None)


def f1_scores(pred: torch.Tensor, y: torch.Tensor, classes: int):
    """(macro F1, support-weighted F1) of predicted labels pred against y (both [n] int)."""
    f1s, support = [], []
    for c in range(classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        support.append(int((y == c).sum()))
    macro = sum(f1s) / classes
    weighted = sum(f * s for f, s in zip(f1s, support)) / max(1, sum(support))
    return macro, weighted


def macro_f1(pred, y, classes):
    return f1_scores(pred, y, classes)[0]


def adam(params, **kw) -> torch.optim.Adam:
    """torch.optim.Adam(params, **kw), fused (one multi-tensor kernel per step) where this torch and the
    parameters' device support it, else the default implementation. The same update rule; on the CPU the
    default is a per-tensor loop of small ops: for the DEQ models here (30-odd small tensors) fused is
    ~3.5x faster per step (0.96 -> 0.28 ms, 2 threads)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device / dtype fused Adam lacks
        return torch.optim.Adam(params, **kw)


def train_epoch(net: nn.Module, opt, xs: List[torch.Tensor], y: torch.Tensor, batch: int,
                extra_loss: Optional[Callable[[], torch.Tensor]] = None, min_rows: int = 1) -> float:
    """See _epoch (cross-entropy of net's logits)."""
    return _epoch(net, opt, xs, y, batch, extra_loss, min_rows)


def _sum_ce(out, y):
    """Cross-entropy summed over the rows, of one output or averaged over a list of them (each expert's)."""
    if isinstance(out, (list, tuple)):
        return sum(F.cross_entropy(o, y, reduction="sum") for o in out) / len(out)
    return F.cross_entropy(out, y, reduction="sum")


def _epoch(net: nn.Module, opt, xs: List[torch.Tensor], y: torch.Tensor, batch: int,
           extra_loss: Optional[Callable[[], torch.Tensor]] = None, min_rows: int = 1) -> float:
    """One epoch of minibatch training (net in train mode; the permutation draws from torch's global
    RNG); returns the mean cross-entropy over the epoch's samples, summed across ranks.

    Data parallel (deqfuse.distributed): each global minibatch of `batch` rows is split across the
    ranks; the local loss is the sum over the local rows times world / (global rows), so DDP's gradient
    average equals the gradient of the global batch's mean loss whatever the split (unequal shards
    included). extra_loss() (e.g. DynMM's resource loss, the Jacobian regulariser) is each rank's
    value on its shard, averaged by DDP. Global minibatches with fewer than min_rows rows per rank are
    skipped (the same decision on every rank)."""
    from . import distributed as ddp
    world = ddp.world_size()
    net.train()
    perm = torch.randperm(y.shape[0])
    total = 0.0
    for i in range(0, y.shape[0], batch):
        glob = perm[i:i + batch]
        if glob.numel() < min_rows * world:
            continue
        idx = ddp.shard(glob)
        ce = _sum_ce(net([v[idx] for v in xs]), y[idx])
        loss = ce * (world / glob.numel()) + (extra_loss() if extra_loss is not None else 0.0)
        opt.zero_grad()
        with ddp.collective("the gradient all-reduce (DDP backward)"):
            loss.backward()
        opt.step()
        total += float(ce.detach())
    return ddp.sum_across_ranks(total) / y.shape[0]


# ------------------------------------------------------------------------------------------ checkpoints
CHECKPOINT_FORMAT = "deqfuse.train checkpoint 1"
_CHECKPOINT_KEYS = ("format", "config", "epoch", "train_seconds", "model", "optimizer", "rng", "sha256")


class CheckpointError(ValueError):
    """A checkpoint (path) that cannot be resumed: unreadable, refused by the weights-only load, not a
    deqfuse training checkpoint, corrupt, or from another configuration (then diffs: [(train_config key,
    the checkpoint's value, this run's)]; for epochs the epochs done)."""

    def __init__(self, path: str, msg: str, diffs=()):
        super().__init__(f"checkpoint {path}{msg}")
        self.path, self.diffs = path, list(diffs)


def train_config(method: str, D: int = 64, seed: int = 0, epochs: int = 25, deq_kw=None, dynmm_lambda: float = 0.0,
                 batch: int = BATCH, lr: float = LR, dynmm_target: float = 0.3) -> dict:
    """What a method's training run depends on, stored in its checkpoint and compared on resume: the
    options the method uses (DynMM's resource weight for dynmm, deq_kw for deq / unrolled) and the data
    (run's: the digits). Plain values."""
    cfg = dict(method=method, data="digits", seed=seed, dim=D, batch=batch, lr=lr, epochs=epochs)
    if method == "dynmm":  # epochs: both stages (the experts', then the gate's)
        cfg.update(epochs=epochs + dynmm_gate_epochs(epochs), dynmm_lambda=dynmm_lambda, dynmm_target=dynmm_target)
    if method in ("deq", "unrolled"):
        cfg.update(sorted((deq_kw or {}).items()))
    return cfg


def _digest(entries: dict) -> str:
    """sha256 over a checkpoint's entries: tensors by dtype, shape and bytes; dicts, lists and tuples by
    structure (in order); anything else by repr."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(f"D{len(o)};".encode())
            for k, v in o.items():
                feed(k)
                feed(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)};".encode())
            for v in o:
                feed(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())
    feed(entries)
    return h.hexdigest()


def save_checkpoint(path: str, config: dict, epoch: int, train_seconds: float, model: nn.Module, opt) -> None:
    """Atomically (a temporary file renamed over path): the model, optimiser, epochs done (epoch + 1),
    RNG state, config and a sha256 of all of it; only tensors, plain containers, numbers and strings."""
    ck = dict(format=CHECKPOINT_FORMAT, config=config, epoch=epoch, train_seconds=train_seconds,
              model=model.state_dict(), optimizer=opt.state_dict(), rng=torch.get_rng_state())
    ck["sha256"] = _digest(ck)
    tmp = path + ".tmp"
    torch.save(ck, tmp)
    os.replace(tmp, path)  # an interruption never leaves half a checkpoint


def load_checkpoint(path: str, config: Optional[dict] = None, force: bool = False) -> dict:
    """The checkpoint save_checkpoint wrote at path, or CheckpointError naming path. Read with
    torch.load(weights_only=True): a pickle of anything but tensors, plain containers, numbers and strings
    (one that would run code) is refused unread; its sha256 must match. config (this run's train_config):
    every entry but epochs must equal the stored one, and epochs must be at least the epochs done
    (raising it continues the run), unless force."""
    try:
        with warnings.catch_warnings():  # (torch warns about the pickle protocol of files it did not write)
            warnings.simplefilter("ignore", UserWarning)
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not torch.save's format, or refused by the weights-only unpickler
        msg = str(e)
        if "WeightsUnpickler error:" in msg:
            detail = next((ln.strip() for ln in msg.split("WeightsUnpickler error:", 1)[1].splitlines()
                           if ln.strip()), "")
            why = (f"refused by the weights-only load, nothing in it ran (not a pickle of tensors, plain containers, "
                   f"numbers and strings only: {detail.split('. ')[0]})")
        else:
            why = f"not readable ({type(e).__name__}: {(msg.strip().splitlines() or ['empty or truncated'])[0]})"
        raise CheckpointError(path, f": {why}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or set(ck) != set(_CHECKPOINT_KEYS):
        raise CheckpointError(path, f": not a deqfuse training checkpoint of this version ({CHECKPOINT_FORMAT!r}); "
                                    f"delete it, or train without --resume")
    if _digest({k: v for k, v in ck.items() if k != "sha256"}) != ck["sha256"]:
        raise CheckpointError(path, ": corrupt (its contents do not match their sha256)")
    if config is not None and not force:
        saved, done = ck["config"], ck["epoch"] + 1
        diffs = [(k, saved.get(k), config.get(k)) for k in dict.fromkeys([*saved, *config])
                 if k != "epochs" and saved.get(k) != config.get(k)]
        if config["epochs"] < done:
            diffs.append(("epochs", done, config["epochs"]))
        if diffs:
            raise CheckpointError(path, " is from another configuration: " + ", ".join(
                f"{done} epochs done, epochs={new} now (epochs may be raised on resume, not lowered)" if k == "epochs"
                else f"{k}={old!r} in the checkpoint, {k}={new!r} now" for k, old, new in diffs), diffs)
    return ck


def train_one(method, data, D=64, epochs=25, batch=BATCH, lr=LR, seed=0, progress=True, deq_kw=None,
              dynmm_lambda=0.0, return_model=False, checkpoint=None, stop_after=None, resume_force=False,
              dynmm_target=0.3):
    """Train one method; returns its result dict (and the trained model if return_model).

    checkpoint: a file path: the model, optimiser, epoch, RNG state and train_config are saved there after
    every epoch (save_checkpoint), and a training run finds them there and resumes (giving the result an
    uninterrupted run gives; load_checkpoint's checks, the configuration's skipped if resume_force).
    stop_after: end after that many epochs in total (an interruption, for tests); returns None.
    Under torchrun (deqfuse.distributed) each global batch is split across the ranks and the gradients
    averaged (DDP); the evaluation and the checkpoint are rank 0's."""
    from . import distributed as ddp
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte), dims = data["train"], data["test"], data["dims"]
    classes = int(ytr.max()) + 1
    deq_kw = deq_kw or {}
    config = train_config(method, D, seed, epochs, deq_kw, dynmm_lambda, batch, lr, dynmm_target)
    model = (build_dynmm(dims, D, classes, dynmm_lambda, dynmm_target) if method == "dynmm" else
             FusionClassifier(method, dims, D, classes, **deq_kw))
    opt = adam(model.parameters(), lr=lr)
    sched = GumbelSchedule(1.0, 0.85, 0.1)
    start, train_s = 0, 0.0
    if checkpoint and os.path.exists(checkpoint):
        ck = load_checkpoint(checkpoint, config, force=resume_force)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        start, train_s = ck["epoch"] + 1, ck["train_seconds"]
    # DynMM, the paper's recipe: stage 1 trains each expert on every sample (its own loss; the gate waits),
    # stage 2 freezes them and trains the gate with the resource loss for gate_epochs more
    total = epochs + (dynmm_gate_epochs(epochs) if method == "dynmm" else 0)
    stage = None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    show = progress and tqdm is not None and ddp.is_main()
    bar = tqdm(range(start, total), desc=f"{method:>8}", leave=True) if show else range(start, total)
    for ep in bar:
        t0 = time.perf_counter()
        extra = None
        if method != "dynmm":
            if stage is None:
                net, stage = ddp.wrap(model), "all"
        elif ep < epochs:
            if stage != "experts":
                model.gate.requires_grad_(False)
                net, stage = ddp.wrap(_Experts(model)), "experts"
        else:
            if stage != "gate":
                model.gate.requires_grad_(True)
                model.freeze_experts()
                net, stage = ddp.wrap(model), "gate"
            model.tau, extra = sched(ep - epochs), model.resource_loss
        loss = _epoch(net, opt, xtr, ytr, batch, extra)
        train_s += time.perf_counter() - t0
        if show:
            bar.set_postfix(loss=f"{loss:.3f}")
        if checkpoint and ddp.is_main():
            save_checkpoint(checkpoint, config, ep, train_s, model, opt)
        if stop_after is not None and ep + 1 >= stop_after:
            return None
    if method == "dynmm" and model.target is not None:
        model.calibrate(xtr)  # the inference cost shift with which the gate's choices meet the target
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


def plot_residual_band(ax, rel_trace):
    """Median and 10-90% band over samples of the relative residual per iteration on ax (rel_trace:
    [T, B] nested lists, NaN once a sample froze, so the band covers the samples still iterating)."""
    t = torch.tensor(rel_trace, dtype=torch.float64)
    q = torch.nanquantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=1)
    it = range(1, t.shape[0] + 1)
    ax.fill_between(it, q[0], q[2], alpha=0.3, label="10-90% of samples still iterating")
    ax.plot(it, q[1], label="median (converged samples freeze and drop out)")
    ax.set(yscale="log", xlabel="Anderson iteration")


def plot_convergence(rel_trace, path):
    """Median and 10-90% band of the per-sample relative residual vs iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    plot_residual_band(ax, rel_trace)
    ax.set(ylabel="relative residual |f(z)-z|/|f(z)|", title="DEQ fusion solve, UCI multiple features (test set)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkpoint_path(out: str, method: str) -> str:
    return os.path.join(out, "checkpoints", f"{method}.pt")


def run(methods=METHODS, epochs=25, D=64, out="runs", seed=0, progress=True, deq_kw=None,
        dynmm_lambda=0.0, resume=False, resume_force=False, dynmm_target=0.3) -> List[Dict]:
    """Train and compare the methods; rank 0 writes results.md / results.json / convergence.png.
    resume: continue from checkpoint_path(out, method) where a run stopped (each method checkpoints after
    every epoch); every checkpoint it will read is checked first (load_checkpoint: CheckpointError before
    any method trains); resume_force: resume from another configuration."""
    from . import distributed as ddp
    if resume:
        for m in methods:
            if os.path.exists(checkpoint_path(out, m)):
                load_checkpoint(checkpoint_path(out, m),
                                train_config(m, D, seed, epochs, deq_kw, dynmm_lambda, dynmm_target=dynmm_target),
                                force=resume_force)
    ddp.init_from_env()
    views, labels = load_uci_multifeature()
    data = split_standardize(views, labels, seed=seed)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    results = []
    for m in methods:
        ck = checkpoint_path(out, m)
        if not resume and os.path.exists(ck) and ddp.is_main():
            os.remove(ck)  # a fresh run
        ddp.barrier()  # no rank looks for a checkpoint before rank 0 has removed a stale one
        results.append(train_one(m, data, D=D, epochs=epochs, seed=seed, progress=progress, deq_kw=deq_kw,
                                 dynmm_lambda=dynmm_lambda, checkpoint=ck, resume_force=resume_force,
                                 dynmm_target=dynmm_target))
    if not ddp.is_main():
        return results
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
