"""Turn sweep.csv (benchmarks/sweep.py) into a PNG and a markdown table for the README.

  python benchmarks/sweep_report.py SWEEP_CSV OUT_PNG [OUT_MD]
PNG: one panel per measure, speed-up of our best variant over the baseline (reference eager; torchdeq
for the training step where it was measured) against B, one line per (D, N), fp32 solid / bf16 dashed.
"""
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deqfuse.benchmarking import read_results  # noqa: E402

OURS = {"cell_fwd": ("triton/cublas", "triton/fused"), "step": ("triton", "cuda"),
        "solve_fwd": ("auto", "auto+graph", "auto+graph, fused cell"),
        "train_step": ("auto", "auto+graph", "auto+graph, fused cell")}
BASE = {"cell_fwd": "reference", "step": "reference", "solve_fwd": "reference", "train_step": "torchdeq"}


def load(src):
    """{(measure, B, D, N, dtype): {variant: ms}} of the rows that were timed (long results format)."""
    pts = defaultdict(dict)
    for r in read_results(src):
        if r["metric"] == "ms" and isinstance(r["value"], float):
            pts[(r["op"], r["B"], r["D"], r["N"], r["dtype"])][r["variant"]] = r["value"]
    return pts


def best(v, names):
    got = [(v[n], n) for n in names if n in v]
    return min(got) if got else (None, None)


def plot(pts, dst):
    measures = list(OURS)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6))
    for ax, meas in zip(axes, measures):
        lines = defaultdict(list)
        for (m, B, D, N, dt), v in sorted(pts.items()):
            if m != meas:
                continue
            ours, _ = best(v, OURS[m])
            base = v.get(BASE[m]) or v.get("reference")
            if ours and base:
                lines[(D, N, dt)].append((B, base / ours))
        for (D, N, dt), xy in sorted(lines.items()):
            xs, ys = zip(*sorted(xy))
            ax.plot(xs, ys, "-" if dt == "fp32" else "--", marker="o", ms=3, label=f"D={D} N={N} {dt}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1, color="#888", lw=0.8)
        ax.set_title(f"{meas}: best ours vs {BASE[meas]}", fontsize=9)
        ax.set_xlabel("batch B", fontsize=8)
        ax.set_ylabel("speed-up (x)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def table(pts):
    """Markdown: per point, the training step (ours best vs torchdeq and reference) and the kernels."""
    keys = sorted({k[1:] for k in pts}, key=lambda k: (k[3], k[2], k[1], k[0]))
    out = ["| dtype | N | D | B | train step: ours (variant) | torchdeq | x | reference | x | cell fwd ours / compile (ms) | step ours / compile (ms) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: f"{x:.3g}" if x else "—"  # noqa: E731
    for B, D, N, dt in keys:
        tr = pts.get(("train_step", B, D, N, dt), {})
        ours, name = best(tr, OURS["train_step"])
        tdq, ref = tr.get("torchdeq"), tr.get("reference")
        cell = pts.get(("cell_fwd", B, D, N, dt), {})
        step = pts.get(("step", B, D, N, dt), {})
        out.append(f"| {dt} | {N} | {D} | {B} | {fmt(ours)} ({name or '—'}) | {fmt(tdq)} | "
                   f"{fmt(tdq / ours) if tdq and ours else '—'} | {fmt(ref)} | {fmt(ref / ours) if ref and ours else '—'} | "
                   f"{fmt(best(cell, OURS['cell_fwd'])[0])} / {fmt(cell.get('torch.compile(reference)'))} | "
                   f"{fmt(best(step, OURS['step'])[0])} / {fmt(step.get('torch.compile(reference)'))} |")
    return "\n".join(out)


def main(src, png, md=None):
    pts = load(src)
    plot(pts, png)
    t = table(pts)
    if md:
        open(md, "w").write(t + "\n")
    print(t)


if __name__ == "__main__":
    main(*sys.argv[1:4])
