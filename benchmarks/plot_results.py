"""Plot a results.csv of bench_gpu.py: ms per variant, one panel per section (ours green).

  python benchmarks/plot_results.py RESULTS_CSV OUT_PNG
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    rows = [r for r in csv.DictReader(open(src)) if float(r["ms"]) > 0]
    sections = defaultdict(list)
    for r in rows:
        if r["section"] != "copy":
            sections[r["section"]].append((r["variant"], float(r["ms"])))
    n = len(sections)
    fig, axes = plt.subplots((n + 1) // 2, 2, figsize=(13, 2.4 * ((n + 1) // 2)))
    for ax, (sec, vals) in zip(axes.flat, sections.items()):
        names, ms = zip(*vals)
        ax.barh(range(len(ms)), ms, color=["#888" if "reference" in v or "torchdeq" in v else "#2a7" for v in names])
        ax.set_yticks(range(len(ms)), names, fontsize=7)
        ax.set_xlim(0, max(ms) * 1.15)
        for i, v in enumerate(ms):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.set_title(sec, fontsize=8)
        ax.set_xlabel("ms (median)", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
