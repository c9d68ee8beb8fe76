"""How accurate is the training gradient of DEQ fusion at a given solver tolerance, and what does the
accuracy cost? (issue 16: choose the default tolerances from measured gradient error against cost.)

  python benchmarks/grad_accuracy.py [--data brca] [--method deq+jac] [--epochs 100] [--out DIR]

A DEQ model is trained with the evaluation recipe (`deqfuse.evaluate`, seed 0), then on one training
batch (128 samples) the gradient of the classification loss w.r.t. every parameter is computed
  - reference: float64, forward and adjoint solved to 1e-12 (abs) in up to 400 steps;
  - float32 at f_tol = b_tol in {1e-2 .. 1e-6} (relative, deqfuse's solver: per sample, early exit,
    compaction), and with the official code's settings (DEQFusion.official: whole-batch stopping,
    forward abs 1e-3, adjoint rel 1e-3);
reported: relative error of the whole gradient vector and of the output vs the reference, rows the
solves evaluated, and wall time (median of 5).
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deqfuse import DEQFusion  # noqa: E402
from deqfuse.benchmarking import Results, time_ms  # noqa: E402
from deqfuse.data import split_indices, standardize  # noqa: E402
from deqfuse.evaluate import HParams, fit, load  # noqa: E402


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def with_solver(model, **deq_kw):
    """A copy of model whose DEQ fusion layer is rebuilt with these settings (same weights)."""
    m = copy.deepcopy(model)
    old = m.fusion
    same = dict(in_dims=old.in_dims, input_norm=old.input_norm, init=old.init, on_nonconvergence="ignore")
    new = (DEQFusion.official(old.dim, old.n, **same) if deq_kw.pop("official", False) else
           DEQFusion(old.dim, old.n, **same, **deq_kw))
    new.load_state_dict(old.state_dict())
    m.fusion = new.to(next(old.parameters()).dtype)
    m.jac_weight = 0.0
    return m


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="brca")
    ap.add_argument("--method", default="deq+jac")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    views, labels = load(a.data)
    data = standardize(views, labels, split_indices(labels, 0))
    res0, model = fit(a.method, data, HParams(epochs=a.epochs), 0, return_model=True)
    print(f"trained {a.method} on {a.data}: val acc {res0['val']['accuracy']:.4f}, test acc {res0['test']['accuracy']:.4f}")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the same function for every gradient below
    x, y = [v[:128] for v in data["train"][0]], data["train"][1][:128]
    ref_model = with_solver(model, f_max_iter=400, b_max_iter=400, f_tol=1e-12, b_tol=1e-12, stop_mode="abs",
                            b_stop_mode="abs").double()
    out_ref, g_ref = grads(ref_model, [v.double() for v in x], y)
    st = ref_model.fusion.info
    print(f"reference (float64, 1e-12 abs): forward converged {int(st.forward_stats.converged.sum())}/128 in "
          f"{st.forward_stats.steps} steps, adjoint {int(st.backward_stats.converged.sum())}/128")
    res = Results()
    variants = [(f"deqfuse rel {t:g}", dict(f_max_iter=100, b_max_iter=100, f_tol=t, b_tol=t)) for t in
                (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)]
    variants.append(("official (batch abs 1e-3 / rel 1e-3)", dict(official=True)))
    print(f"{'settings':<40} {'grad rel err':>12} {'out rel err':>12} {'rows fwd+adj':>13} {'ms':>8}")
    for name, kw in variants:
        m = with_solver(model, **kw)
        out, g = grads(m, x, y)
        info = m.fusion.info
        rows = info.forward_stats.rows + info.backward_stats.rows
        ms = time_ms(lambda: grads(m, x, y), reps=5, warmup=1)
        ge = float((g.double() - g_ref).norm() / g_ref.norm())
        oe = float((out.double() - out_ref).norm() / out_ref.norm())
        print(f"{name:<40} {ge:12.2e} {oe:12.2e} {rows:13d} {ms:8.2f}")
        for metric, v, unit in (("grad_rel_err", ge, ""), ("out_rel_err", oe, ""), ("rows", rows, "rows"), ("ms", ms, "ms")):
            res.add("deq_training_gradient", name, metric, v, unit, B=128, D=m.fusion.dim, N=m.fusion.n,
                    dtype=torch.float32, note=f"{a.data} {a.method} trained {a.epochs} epochs")
    res.write_csv(os.path.join(a.out, "grad_accuracy.csv"))


if __name__ == "__main__":
    main()
