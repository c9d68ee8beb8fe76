"""DEQFusion in a user's two-tower model, default arguments only (CPU).

    python benchmarks/bench_two_tower.py [--seeds 10] [--steps 300] [--variants deq,phantom,jac,unrolled,concat]

Model: TokenEncoder (Transformer over token ids, width 48, outputs x10) and ConvEncoder (conv net over
32x32 images, width 32, outputs x0.1), fused by DEQFusion(64, 2, in_dims=[48, 32]) -> Linear(64, 10); the
label needs both towers (benchmarks/two_tower.py). AdamW (lr 1e-3, weight decay 0.01 through
deqfuse.param_groups), batch 64, `--steps` steps, one fresh model per seed and variant. Variants: deq (all
defaults), phantom (grad='phantom'), jac (jac_reg=1, loss + info.jac_loss), unrolled
(grad='unrolled', unrolled_steps=6: the weight-tied network without a solve), concat (the towers'
outputs concatenated -> MLP; no DEQ). Per seed and variant: test accuracy (2,000 held samples), the
fraction of test rows whose forward solve converged at the default tolerance and their mean solver steps,
and the mean training-step time (steps 20..end; every variant of a seed runs in this process, one after
another, so the times compare). Ratios to 'unrolled' are printed beside the times.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deqfuse  # noqa: E402
from deqfuse import DEQFusion  # noqa: E402
from two_tower import CLASSES_BOTH, ConvEncoder, TokenEncoder, make_data  # noqa: E402

VARIANTS = {"deq": {}, "phantom": dict(grad="phantom"), "jac": dict(jac_reg=1),
            "unrolled": dict(grad="unrolled", unrolled_steps=6), "concat": None}


class TwoTower(nn.Module):
    def __init__(self, deq_kw, dim=64):
        super().__init__()
        self.tok, self.img = TokenEncoder(scale=10.0), ConvEncoder(scale=0.1)
        if deq_kw is None:
            self.fuse = None
            self.head = nn.Sequential(nn.Linear(48 + 32, dim), nn.ReLU(), nn.Linear(dim, CLASSES_BOTH))
        else:
            self.fuse = DEQFusion(dim, 2, in_dims=[48, 32], **deq_kw)
            self.head = nn.Linear(dim, CLASSES_BOTH)

    def forward(self, tokens, image):
        a, b = self.tok(tokens), self.img(image)
        if self.fuse is None:
            return self.head(torch.cat([a, b], 1)), None
        z, info = self.fuse([a, b], return_info=True)
        return self.head(z), info


def run(variant, seed, train, test, steps, batch=64):
    torch.manual_seed(seed)
    model = TwoTower(VARIANTS[variant])
    opt = torch.optim.AdamW(deqfuse.param_groups(model, 0.01), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    n, times = train["y"].shape[0], []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        t0 = time.perf_counter()
        logits, info = model(train["tokens"][idx], train["image"][idx])
        loss = F.cross_entropy(logits, train["y"][idx])
        if variant == "jac":
            loss = loss + info.jac_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 20:
            times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        logits, info = model(test["tokens"], test["image"])
    res = dict(acc=float((logits.argmax(1) == test["y"]).float().mean()), ms=1e3 * statistics.mean(times))
    if info is not None and info.forward_stats is not None:
        s = info.forward_stats.summary()
        res.update(conv=s["converged_frac"], steps=s["mean_nstep"])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants or a.seeds < 1 or a.steps < 21:
        ap.error(f"--variants from {list(VARIANTS)} (got {bad or variants}), --seeds >= 1, --steps >= 21")
    if a.threads:
        torch.set_num_threads(a.threads)
    train, test = make_data(4096, 10_000), make_data(2000, 20_000)
    rows = {v: [] for v in variants}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps, batch 64")
    print("seed  " + "  ".join(f"{v:>26}" for v in variants))
    for seed in range(a.seeds):
        cells = []
        for v in variants:
            r = run(v, seed, train, test, a.steps)
            rows[v].append(r)
            conv = f" conv {r['conv']:.2f} st {r['steps']:4.1f}" if "conv" in r else " " * 17
            cells.append(f"{r['acc']:.3f}{conv} {r['ms']:5.1f}ms")
        print(f"{seed:4d}  " + "  ".join(f"{c:>26}" for c in cells), flush=True)
    print("\nvariant    acc>=0.98  acc mean (min)     converged mean (min)  steps  ms/step  vs unrolled")
    base = statistics.median(r["ms"] for r in rows["unrolled"]) if "unrolled" in rows else None
    for v in variants:
        rs = rows[v]
        accs = [r["acc"] for r in rs]
        conv = [r["conv"] for r in rs if "conv" in r]
        ms = statistics.median(r["ms"] for r in rs)
        cv = f"{statistics.mean(conv):.3f} ({min(conv):.3f})" if conv else "-"
        st = f"{statistics.mean(r['steps'] for r in rs):5.1f}" if conv else "    -"
        ratio = f"{ms / base:.2f}x" if base else "-"
        print(f"{v:9s}  {sum(x >= 0.98 for x in accs):3d}/{len(accs):<3d}   {statistics.mean(accs):.3f} ({min(accs):.3f})"
              f"      {cv:20s}  {st}  {ms:7.1f}  {ratio}")


if __name__ == "__main__":
    main()
