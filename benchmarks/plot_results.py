"""Plot a results CSV (the long format of deqfuse/benchmarking.py, e.g. bench_gpu.py's results.csv): ms
per variant, one panel per (op, shape, dtype), ours green, the references and torchdeq grey.

  python benchmarks/plot_results.py RESULTS_CSV OUT_PNG
"""
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deqfuse.benchmarking import read_results  # noqa: E402


def main(src, dst):
    panels = defaultdict(list)
    for r in read_results(src):
        if r["metric"] == "ms" and isinstance(r["value"], float) and r["value"] > 0 and r["op"] != "copy":
            shape = " ".join(f"{k}={r[k]}" for k in ("B", "D", "N") if r[k] is not None)
            panels[f"{r['op']} {shape} {r['dtype']} {r['note']}".strip()].append((r["variant"], r["value"]))
    n = len(panels)
    if n == 0:
        raise SystemExit(f"{src}: no timings to plot")
    fig, axes = plt.subplots((n + 1) // 2, 2, figsize=(13, 2.4 * ((n + 1) // 2)), squeeze=False)
    for ax, (title, vals) in zip(axes.flat, panels.items()):
        names, ms = zip(*vals)
        ax.barh(range(len(ms)), ms, color=["#888" if "reference" in v or "torchdeq" in v else "#2a7" for v in names])
        ax.set_yticks(range(len(ms)), names, fontsize=7)
        ax.set_xlim(0, max(ms) * 1.15)
        for i, v in enumerate(ms):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("ms (median)", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
