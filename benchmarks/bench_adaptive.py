"""Adaptive compute in the DEQ solves, side by side in one run: fixed iterations vs early exit vs early
exit + compaction (the default) vs torchdeq 0.1.0 on the same cell, tolerance and iteration caps.

  python benchmarks/bench_adaptive.py [--out DIR] [--threads 2] [--reps 5] [--quick] [--model PATH]

Workloads (CPU here; on a GPU the same code runs eager):
  main-job  the main job's DEQ model, trained here with `python -m deqfuse train`'s recipe (UCI digits,
            six views, D=64, f/b_max_iter=30, tol 1e-3 rel, seed 0; --model caches the weights):
            eval = the fusion layer on the encoders' features of the 600 test samples; train step =
            forward + implicit backward of the classification loss on one 128-sample training batch.
  random    DEQFusion(512, 3) at its default init, B=256 Gaussian features, f/b_max_iter 55/56,
            tol 1e-3 rel (the setting of issue 10); train step loss = cross-entropy of a fixed random
            linear read-out against random labels (not |out|^2: the fused output is a GroupNorm output,
            whose norm does not depend on its input, so that loss has a zero adjoint).
Columns: ms (median of --reps), rows = cell rows the solver evaluated (forward, and + adjoint rows =
VJP rows in training), need = sum over samples of the steps each needed (the per-sample minimum),
rows/need, steps run, max |out - out_fixed|, speed-up vs torchdeq. Also a sweep of the compaction
threshold (the default DEQFUSE's DEFAULT_COMPACT comes from it). Writes adaptive.csv to --out.
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deqfuse import DEQFusion  # noqa: E402
from deqfuse.reference.cell import fuse_inputs  # noqa: E402
from deqfuse.solvers import DEFAULT_CHECK_EVERY, DEFAULT_COMPACT  # noqa: E402

VARIANTS = {  # solver_kw of each deqfuse variant
    "fixed iterations": dict(check_every=0, compact=0),
    "early exit": dict(compact=0),
    "early exit + compaction (default)": {},
}
ROWS = []


def timed(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def record(work, mode, variant, ms, **kw):
    row = dict(work=work, mode=mode, variant=variant, ms=round(ms, 2), **kw)
    ROWS.append(row)
    extras = "  ".join(f"{k}={v}" for k, v in kw.items())
    print(f"  {work:<9} {mode:<6} {variant:<36} {ms:9.1f} ms  {extras}", flush=True)


class _Counter:
    rows = 0


def _torchdeq(max_f, max_b, tol, m):
    """torchdeq's DEQ with its Anderson solver wrapped to count the rows of every function call."""
    from torchdeq import get_deq
    from torchdeq.solver import get_solver, register_solver
    anderson = get_solver("anderson")

    def counted(func, x0, **kw):
        def f(z):
            _Counter.rows += z.shape[0]
            return func(z)
        return anderson(f, x0, **{**kw, "m": m})
    register_solver("anderson_counted", counted)
    return get_deq(ift=True, f_solver="anderson_counted", b_solver="anderson_counted", f_max_iter=max_f,
                   b_max_iter=max_b, f_tol=tol, b_tol=tol, f_stop_mode="rel", b_stop_mode="rel")


def layer_like(src: DEQFusion, **solver_kw):
    kw = dict(f_max_iter=src.f_kw["max_iter"], b_max_iter=src.b_kw["max_iter"], f_tol=src.f_kw["tol"],
              b_tol=src.b_kw["tol"], stop_mode=src.f_kw["stop_mode"], on_nonconvergence="ignore",
              solver_kw=dict(m=src.f_kw.get("m", 5), **solver_kw))
    ly = DEQFusion(src.dim, src.n, **kw)
    ly.load_state_dict(src.state_dict())
    return ly


def compare(work, src: DEQFusion, eval_feats, train_feats, loss_fn, reps, thresholds=()):
    """Eval forward and training step of every variant on the layer src (its weights and limits)."""
    src = src.float()
    out = {}
    B = eval_feats[0].shape[0]
    for name, kw in list(VARIANTS.items()) + [(f"compact={t}", dict(compact=t)) for t in thresholds]:
        ly = layer_like(src, **kw).eval()
        with torch.no_grad():
            ms = timed(lambda: ly(eval_feats), reps)
            z = ly(eval_feats)
        st = ly.info.forward_stats
        need = int(torch.where(st.converged, st.nstep, st.steps).sum())
        ref = out.setdefault("eval_fixed", z)
        out.setdefault("eval_fixed_converged", st.converged)
        out[name] = ms
        record(work, "eval", name, ms, rows=st.rows, need=need, rows_per_need=round(st.rows / need, 3),
               steps=st.steps, converged=f"{int(st.converged.sum())}/{B}", max_diff=f"{(z - ref).abs().max():.1e}")
        ly.train()

        def step():
            ly.zero_grad(set_to_none=True)
            loss_fn(ly(train_feats)).backward()
        ms = timed(step, reps)
        fs, bs = ly.info.forward_stats, ly.info.backward_stats[0]
        need = sum(int(torch.where(s.converged, s.nstep, s.steps).sum()) for s in (fs, bs))
        record(work, "train", name, ms, rows=fs.rows + bs.rows, need=need,
               rows_per_need=round((fs.rows + bs.rows) / need, 3), steps=f"{fs.steps}+{bs.steps}")
        out[f"train {name}"] = ms
    try:
        deq = _torchdeq(src.f_kw["max_iter"], src.b_kw["max_iter"], src.f_kw["tol"], src.f_kw.get("m", 5))
    except ImportError as e:
        print("  torchdeq unavailable:", e)
        return out
    N, D = src.n, src.dim
    ly = layer_like(src)

    def tdq(feats):
        x = torch.stack(feats, 1)
        xf = fuse_inputs(x, ly.weights, ly.bias)
        zs, _ = deq(lambda z: ly.cell(z, x, xf, "reference"), torch.zeros(x.shape[0], N + 1, D))
        return zs[-1][:, N]
    deq.eval()
    with torch.no_grad():
        ms = timed(lambda: tdq(eval_feats), reps)
        _Counter.rows = 0
        z = tdq(eval_feats)
    ok = out["eval_fixed_converged"]  # compare where the fixed solve converged (else: two best iterates)
    record(work, "eval", "torchdeq 0.1.0", ms, rows=_Counter.rows,
           max_diff=f"{(z - out['eval_fixed'])[ok].abs().max():.1e} on {int(ok.sum())} converged")
    out["torchdeq"] = ms
    deq.train()

    def tstep():
        ly.zero_grad(set_to_none=True)
        loss_fn(tdq(train_feats)).backward()
    ms = timed(tstep, reps)
    _Counter.rows = 0
    tstep()
    record(work, "train", "torchdeq 0.1.0", ms, rows=_Counter.rows)
    out["train torchdeq"] = ms
    for name in VARIANTS:
        for mode, key in (("eval", name), ("train", f"train {name}")):
            base = out["torchdeq" if mode == "eval" else "train torchdeq"]
            record(work, mode, f"x vs torchdeq: {name}", 0.0, speedup=round(base / out[key], 2))
    return out


def main_job_model(path=None, epochs=25):
    from deqfuse.data import load_uci_multifeature, split_standardize
    from deqfuse.train import FusionClassifier, train_one
    data = split_standardize(*load_uci_multifeature(), seed=0)
    if path and os.path.exists(path):
        model = FusionClassifier("deq", data["dims"], 64, 10, f_max_iter=30, b_max_iter=30)
        model.load_state_dict(torch.load(path))
        print(f"  main-job model loaded from {path}")
    else:
        t0 = time.perf_counter()
        res, model = train_one("deq", data, D=64, epochs=epochs, seed=0, progress=False,
                               deq_kw=dict(f_max_iter=30, b_max_iter=30), return_model=True)
        print(f"  main-job model trained in {time.perf_counter() - t0:.1f} s, test accuracy {res['accuracy']:.4f}")
        if path:
            torch.save(model.state_dict(), path)
    model.eval()
    with torch.no_grad():
        te = [h.detach() for h in model.enc(data["test"][0])]
        idx = torch.arange(128)
        tr = [h.detach() for h in model.enc([v[idx] for v in data["train"][0]])]
    y = data["train"][1][:128]
    head = model.head
    return model.fusion, te, tr, (lambda out: F.cross_entropy(head(out), y))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller random workload, 2 epochs of training")
    ap.add_argument("--model", default=None, help="cache file of the trained main-job model")
    ap.add_argument("--work", default="main-job,random")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"threads={torch.get_num_threads()}  DEFAULT_CHECK_EVERY={DEFAULT_CHECK_EVERY}  "
          f"DEFAULT_COMPACT={DEFAULT_COMPACT}")
    works = a.work.split(",")
    if "main-job" in works:
        layer, te, tr, loss = main_job_model(a.model, epochs=2 if a.quick else 25)
        compare("main-job", layer, te, tr, loss, a.reps, thresholds=(0.5, 0.9))
    if "random" in works:
        torch.manual_seed(0)
        B, D = (64, 64) if a.quick else (256, 512)
        layer = DEQFusion(D, 3, on_nonconvergence="ignore")
        feats = [torch.randn(B, D) for _ in range(3)]
        P, y = torch.randn(D, 10) / D ** 0.5, torch.randint(0, 10, (B,))
        compare("random", layer, feats, feats, lambda out: F.cross_entropy(out @ P, y), a.reps,
                thresholds=(0.5, 0.9))
    os.makedirs(a.out, exist_ok=True)
    keys = sorted({k for r in ROWS for k in r}, key=lambda k: list(ROWS[0]).index(k) if k in ROWS[0] else 99)
    with open(os.path.join(a.out, "adaptive.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(ROWS)
    return ROWS


if __name__ == "__main__":
    main()
