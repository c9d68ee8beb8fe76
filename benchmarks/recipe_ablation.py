"""What each recipe change does to DEQ fusion, on validation data only (issue 16, item 0).

  python benchmarks/recipe_ablation.py [--data brca] [--seeds 3] [--epochs 100] [--out DIR]

Starting from the evaluation recipe (`deqfuse.evaluate.HParams`: width 64, Adam lr 1e-3, 30 + 30 solver
iterations, tolerance 1e-3 rel, no Jacobian loss), one change at a time: the Jacobian regulariser at
the weights the official BRCA script and our tuning grid use, the official learning rate 1e-4, a tighter
solver tolerance, a wider fusion. Per variant and seed the model is trained with `evaluate.fit`
(best epoch on val) and only its validation scores are reported (accuracy, macro F1, the val sum the
evaluation selects on), plus the solver's mean steps per test sample (a cost, read for no decision). Rows (long format, deqfuse/benchmarking.py) go to recipe_ablation.csv in --out.
"""
import argparse
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deqfuse.benchmarking import Results  # noqa: E402
from deqfuse.data import split_indices, standardize  # noqa: E402
from deqfuse.evaluate import HParams, fit, load  # noqa: E402

VARIANTS = [  # (name, method, HParams overrides)
    ("recipe (lr 1e-3, tol 1e-3, no Jacobian loss)", "deq", {}),
    ("+ Jacobian loss, weight 1", "deq+jac", dict(jac_weight=1.0)),
    ("+ Jacobian loss, weight 5", "deq+jac", dict(jac_weight=5.0)),
    ("+ Jacobian loss, weight 20 (official)", "deq+jac", dict(jac_weight=20.0)),
    ("lr 1e-4 (official)", "deq", dict(lr=1e-4)),
    ("tolerance 1e-4", "deq", dict(f_tol=1e-4)),
    ("width 128", "deq", dict(dim=128)),
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="brca")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    views, labels = load(a.data)
    splits = [standardize(views, labels, split_indices(labels, s)) for s in range(a.seeds)]
    res = Results()
    print(f"{'variant':<46} {'val acc':>15} {'val macro F1':>15} {'val sum':>7} {'steps':>6}")
    for name, method, over in VARIANTS:
        hp = HParams(**{**asdict(HParams()), "epochs": a.epochs, **over})
        runs = [fit(method, splits[s], hp, s) for s in range(a.seeds)]
        acc = np.array([r["val"]["accuracy"] for r in runs])
        mf1 = np.array([r["val"]["macro_f1"] for r in runs])
        tot = np.array([sum(r["val"].values()) for r in runs])
        steps = np.mean([np.mean(r["solver_steps"]) for r in runs if "solver_steps" in r] or [np.nan])
        print(f"{name:<46} {acc.mean():.4f}±{acc.std(ddof=1):.4f} {mf1.mean():.4f}±{mf1.std(ddof=1):.4f} "
              f"{tot.mean():7.3f} {steps:6.1f}", flush=True)
        for metric, v in (("val_accuracy", acc.mean()), ("val_accuracy_std", acc.std(ddof=1)),
                          ("val_macro_f1", mf1.mean()), ("val_sum", tot.mean()), ("solver_steps", steps)):
            res.add("recipe_ablation", name, metric, float(v), "", D=hp.dim, dtype=torch.float32,
                    note=f"{a.data} {method} seeds 0-{a.seeds - 1} epochs {a.epochs}")
    res.write_csv(os.path.join(a.out, "recipe_ablation.csv"))


if __name__ == "__main__":
    main()
