"""Adaptive compute in the DEQ solves, side by side in one run: fixed iterations vs early exit vs early
exit + compaction (the default) vs torchdeq 0.1.0 on the same cell, tolerance and iteration caps.

  python benchmarks/bench_adaptive.py [--out DIR] [--threads 2] [--reps 5] [--quick] [--model PATH]

Workloads (CPU here; on a GPU the same code runs eager):
  main-job  the main job's DEQ model, trained here with `python -m deqfuse train`'s recipe (UCI digits,
            six views, D=64, f/b_max_iter=30, seed 0; --model caches the weights):
            eval = the fusion layer on the encoders' features of the 600 test samples; train step =
            forward + implicit backward of the classification loss on one 128-sample training batch.
  random    DEQFusion(512, 3) at its default init, B=256 Gaussian features, f/b_max_iter 55/56
            (the setting of issue 10); train step loss = cross-entropy of a fixed random
            linear read-out against random labels (not |out|^2: the fused output is a GroupNorm output,
            whose norm does not depend on its input, so that loss has a zero adjoint).
Tolerances: the layer's defaults (1e-4 rel since fe3baab; runs before it used 1e-3).
On the CPU with the extension, "early exit" and the default both run the C++ whole solve
(csrc/solve_cpu.cpp: converged samples skipped row by row, so `compact` has nothing left to do);
"fixed iterations" (check_every=0) runs the per-iteration loop.
Columns: ms (median of --reps), rows = cell rows the solver evaluated (forward, and + adjoint rows =
VJP rows in training), need = sum over samples of the steps each needed (the per-sample minimum),
rows/need, steps run, max |out - out_fixed|, speed-up vs torchdeq. --sweep adds compaction thresholds
and check intervals (where DEFAULT_COMPACT / DEFAULT_CHECK_EVERY come from). Writes adaptive.csv.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deqfuse import DEQFusion  # noqa: E402
from deqfuse.benchmarking import Results, interleaved  # noqa: E402
from deqfuse.reference.cell import fuse_inputs  # noqa: E402
from deqfuse.solvers import DEFAULT_CHECK_EVERY, DEFAULT_COMPACT  # noqa: E402

VARIANTS = {  # solver_kw of each deqfuse variant
    "fixed iterations": dict(check_every=0, compact=0),
    "early exit": dict(compact=0),
    "early exit + compaction (default)": {},
}
SWEEP = [dict(compact=0.25), dict(compact=0.75), dict(compact=0.9), dict(check_every=2), dict(check_every=4),
         dict(check_every=8)]


RES = Results(echo=False)


def record(work, mode, variant, ms, shape=None, **metrics):
    """One variant's time (and work metrics) in the long results format: op deq_forward (eval) or
    deq_train_step, the workload in the note."""
    op = "deq_forward" if mode == "eval" else "deq_train_step"
    fields = dict(shape or {}, note=work)
    if ms is not None:
        RES.add(op, variant, "ms", ms, "ms", **fields)
    for k, v in metrics.items():
        RES.add(op, variant, k, v, "", **fields)
    extras = "  ".join(f"{k}={v}" for k, v in metrics.items())
    print(f"  {work:<9} {mode:<6} {variant:<36} {ms if ms is not None else float('nan'):9.1f} ms  {extras}", flush=True)


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


def compare(work, src: DEQFusion, eval_feats, train_feats, loss_fn, reps, sweep=()):
    """Eval forward and training step of every variant on the layer src (its weights and limits),
    each mode timed round-robin over the variants (and torchdeq) in one run. sweep: extra solver_kw
    variants (the compaction threshold and the check interval the defaults are chosen from)."""
    src = src.float()
    N, D, B = src.n, src.dim, eval_feats[0].shape[0]
    variants = list(VARIANTS.items()) + [(", ".join(f"{k}={v}" for k, v in kw.items()), kw) for kw in sweep]
    layers = {name: layer_like(src, **kw) for name, kw in variants}
    ev, tr = {}, {}
    for name, ly in layers.items():
        ev[name] = lambda ly=ly: ly.eval()(eval_feats)

        def step(ly=ly):
            ly.train().zero_grad(set_to_none=True)
            loss_fn(ly(train_feats)).backward()
        tr[name] = step
    deq = None
    try:
        deq = _torchdeq(src.f_kw["max_iter"], src.b_kw["max_iter"], src.f_kw["tol"], src.f_kw.get("m", 5))
    except ImportError as e:
        print("  torchdeq unavailable:", e)
    if deq is not None:
        ly_t = layer_like(src)

        def tdq(feats):
            x = torch.stack(feats, 1)
            xf = fuse_inputs(x, ly_t.weights, ly_t.bias)
            zs, _ = deq(lambda z: ly_t.cell(z, x, xf, "reference"), torch.zeros(x.shape[0], N + 1, D))
            return zs[-1][:, N]
        ev["torchdeq 0.1.0"] = lambda: deq.eval() and tdq(eval_feats)

        def tstep():
            deq.train()
            ly_t.zero_grad(set_to_none=True)
            loss_fn(tdq(train_feats)).backward()
        tr["torchdeq 0.1.0"] = tstep
    with torch.no_grad():
        ms_ev = interleaved(ev, reps)
    ms_tr = interleaved(tr, reps)
    shape = dict(B=B, D=D, N=N, dtype=torch.float32)
    # work done, from one more call of each
    ref = None
    for name, ly in layers.items():
        with torch.no_grad():
            z = ly.eval()(eval_feats)
        st = ly.info.forward_stats
        if ref is None:
            ref, ok = z, st.converged
        need = int(torch.where(st.converged, st.nstep, st.steps).sum())
        record(work, "eval", name, ms_ev[name], shape, rows=st.rows, need=need, rows_per_need=round(st.rows / need, 3),
               steps=st.steps, converged=f"{int(st.converged.sum())}/{B}", max_diff=f"{(z - ref).abs().max():.1e}")
        tr[name]()
        fs, bs = ly.info.forward_stats, ly.info.backward_stats
        need = sum(int(torch.where(s.converged, s.nstep, s.steps).sum()) for s in (fs, bs))
        record(work, "train", name, ms_tr[name], dict(shape, B=train_feats[0].shape[0]), rows=fs.rows + bs.rows, need=need,
               rows_per_need=round((fs.rows + bs.rows) / need, 3), steps=f"{fs.steps}+{bs.steps}")
    if deq is None:
        return
    _Counter.rows = 0
    with torch.no_grad():
        z = ev["torchdeq 0.1.0"]()
    # compare where the fixed-iteration solve converged (elsewhere two solvers' best iterates differ)
    record(work, "eval", "torchdeq 0.1.0", ms_ev["torchdeq 0.1.0"], shape, rows=_Counter.rows,
           max_diff=f"{(z - ref)[ok].abs().max():.1e} on {int(ok.sum())} converged")
    _Counter.rows = 0
    tr["torchdeq 0.1.0"]()
    record(work, "train", "torchdeq 0.1.0", ms_tr["torchdeq 0.1.0"], dict(shape, B=train_feats[0].shape[0]),
           rows=_Counter.rows)
    for name in layers:
        record(work, "eval", name, None, shape, speedup_vs_torchdeq=round(ms_ev["torchdeq 0.1.0"] / ms_ev[name], 2))
        record(work, "train", name, None, dict(shape, B=train_feats[0].shape[0]),
               speedup_vs_torchdeq=round(ms_tr["torchdeq 0.1.0"] / ms_tr[name], 2))


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
    ap.add_argument("--sweep", action="store_true", help="also time compaction thresholds and check intervals")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    RES.meta["device"] = f"cpu ({a.threads} threads)"
    print(f"threads={torch.get_num_threads()}  DEFAULT_CHECK_EVERY={DEFAULT_CHECK_EVERY}  "
          f"DEFAULT_COMPACT={DEFAULT_COMPACT}")
    works = a.work.split(",")
    if "main-job" in works:
        layer, te, tr, loss = main_job_model(a.model, epochs=2 if a.quick else 25)
        compare("main-job", layer, te, tr, loss, a.reps, SWEEP if a.sweep else ())
    if "random" in works:
        torch.manual_seed(0)
        B, D = (64, 64) if a.quick else (256, 512)
        layer = DEQFusion(D, 3, on_nonconvergence="ignore")
        feats = [torch.randn(B, D) for _ in range(3)]
        P, y = torch.randn(D, 10) / D ** 0.5, torch.randint(0, 10, (B,))
        compare("random", layer, feats, feats, lambda out: F.cross_entropy(out @ P, y), a.reps,
                SWEEP if a.sweep else ())
    RES.write_csv(os.path.join(a.out, "adaptive.csv"))
    return RES.rows


if __name__ == "__main__":
    main()
