"""Small problems at full speed: time per solver iteration of an eval forward solve and of a training
step, side by side in one run, at the same fixed iteration counts (tol 1e-30: no sample stops early):

  deqfuse      this checkout, default backend (on the CPU: the C++ cell op + the C++ Anderson step)
  baseline     other checkouts of deqfuse (--baseline DIR, repeatable; each with its extension built in
               place), e.g. the revision before a change and the one the issue called "today's path"
  torchdeq     torchdeq 0.1.0's Anderson solver + IFT backward on the same cell (plain PyTorch)
  gemm floor   the 2N+2 GEMMs of one cell evaluation alone ([B, D] x [D, D] each), two ways:
                 mm:     torch.mm with out=, one call per GEMM (what the issue's first numbers used; each
                         call also pays the dispatcher, a few us at these sizes)
                 kernel: timed inside the extension (deqfuse._C.cell_gemm_floor_seconds): the same GEMMs
                         in the C++ ops' row blocks, threads and kernels (the AVX-512 or AVX2 tiles where
                         they apply, deqfuse.cpu_plan(D)'s gemm, else the BLAS), nothing else -- the
                         floor of one iteration's cell work

  python benchmarks/bench_small.py [--threads 2] [--B 32,128,512] [--D 32,64,256] [--N 2,3] [--iters 30]
                                   [--baseline /path/to/old/checkout ...] [--out DIR]
Also counts ATen ops per iteration of the eval solve (torch.profiler), the number issue 17 asks to keep
small. Writes small.csv to --out.
"""
import argparse
import json
import os
import subprocess
import sys

import torch


def _load_benchmarking():
    """deqfuse/benchmarking.py of this checkout, loaded by path: the subprocess that measures another
    checkout (--baseline) imports that checkout's deqfuse, so this module must not import ours."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deqfuse", "benchmarking.py")
    spec = importlib.util.spec_from_file_location("_deqfuse_benchmarking", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_bm = _load_benchmarking()
Results, time_ms = _bm.Results, _bm.time_ms

HERE = os.path.dirname(os.path.abspath(__file__))


def _median_ms(fn, reps, warmup=2):
    return time_ms(fn, "cpu", reps=reps, warmup=warmup)


def measure_deqfuse(B, D, N, iters, reps):
    """Per-iteration ms of deqfuse (whichever checkout is importable): eval solve and training step."""
    import warnings

    from deqfuse import DEQFusion
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    layer = DEQFusion(D, N, f_max_iter=iters, b_max_iter=iters, f_tol=1e-30, b_tol=1e-30,
                      on_nonconvergence="ignore")
    feats = [torch.randn(B, D) for _ in range(N)]
    P, y = torch.randn(D, 10), torch.randint(0, 10, (B,))
    layer.eval()
    with torch.no_grad():
        ev = _median_ms(lambda: layer(feats), reps) / iters
    layer.train()

    def step():
        layer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(layer(feats) @ P, y).backward()
    tr = _median_ms(step, reps) / (2 * iters)
    return dict(eval_it=ev, train_it=tr)


def aten_ops(B, D, N, iters=(10, 30)):
    """ATen ops of one eval forward at two iteration counts: (ops per forward at iters[0], ops per extra
    iteration = the difference / the extra iterations, deqfuse ops called)."""
    from torch.profiler import ProfilerActivity, profile

    from deqfuse import DEQFusion
    feats = [torch.randn(B, D) for _ in range(N)]
    counts, top = [], set()
    for it in iters:
        layer = DEQFusion(D, N, f_max_iter=it, f_tol=1e-30, on_nonconvergence="ignore").eval()
        with torch.no_grad():
            layer(feats)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                layer(feats)
        ops = [e for e in prof.key_averages() if e.key.startswith(("aten::", "deqfuse::"))]
        top |= {e.key for e in ops if not e.key.startswith("aten::")}
        counts.append(sum(e.count for e in ops if e.key.startswith("aten::")))
    return counts[0], (counts[1] - counts[0]) / (iters[1] - iters[0]), sorted(top)


def measure_torchdeq(B, D, N, iters, reps):
    from torchdeq import get_deq

    from deqfuse import DEQFusion
    from deqfuse.reference.cell import cell_forward, fuse_inputs
    torch.manual_seed(0)
    layer = DEQFusion(D, N)
    feats = [torch.randn(B, D) for _ in range(N)]
    P, y = torch.randn(D, 10), torch.randint(0, 10, (B,))
    deq = get_deq(ift=True, f_solver="anderson", b_solver="anderson", f_max_iter=iters, b_max_iter=iters,
                  f_tol=1e-30, b_tol=1e-30)

    def run():
        x = torch.stack(feats, 1)
        xf = fuse_inputs(x, layer.weights, layer.bias)
        p = layer.cell.params()
        zs, _ = deq(lambda z: cell_forward(z, x, xf, p, layer.cell.groups), torch.zeros(B, N + 1, D),
                    solver_kwargs=dict(m=5))
        return zs[-1][:, N]
    deq.eval()
    with torch.no_grad():
        ev = _median_ms(run, reps) / iters
    deq.train()

    def step():
        layer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(run() @ P, y).backward()
    tr = _median_ms(step, reps) / (2 * iters)
    return dict(eval_it=ev, train_it=tr)


def gemm_floor_ms(B, D, N, reps=200):
    X, out = torch.randn(B, D), torch.empty(B, D)
    Ws = [torch.randn(D, D).t() for _ in range(2 * N + 2)]
    return _median_ms(lambda: [torch.mm(X, w, out=out) for w in Ws], reps, warmup=20)


def kernel_floor_ms(B, D, N, reps=200, runs=7):
    """The 2N+2 GEMMs of one cell evaluation timed inside the extension (median of runs, each the mean of
    reps evaluations); NaN without the compiled extension."""
    import deqfuse
    from deqfuse import DEQFusion
    ext = deqfuse.extension_status()[0]
    if ext is None or not hasattr(ext, "cell_gemm_floor_seconds"):
        return float("nan")
    torch.manual_seed(0)
    p, z = list(DEQFusion(D, N).cell.params()), torch.randn(B, (N + 1) * D)
    ext.cell_gemm_floor_seconds(z, p, 20)
    return sorted(ext.cell_gemm_floor_seconds(z, p, reps) for _ in range(runs))[runs // 2] * 1e3


def _in_checkout(src, B, D, N, iters, reps, threads):
    """measure_deqfuse run in a subprocess that imports deqfuse from the checkout src."""
    code = (f"import sys, json, torch; sys.path.insert(0, {HERE!r}); torch.set_num_threads({threads}); "
            f"import bench_small; print(json.dumps(bench_small.measure_deqfuse({B}, {D}, {N}, {iters}, {reps})))")
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=src, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--B", default="32,128,512")
    ap.add_argument("--D", default="32,64,256")
    ap.add_argument("--N", default="2,3")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--baseline", action="append", default=[],
                    help="checkout of an older deqfuse, extension built in place (repeatable)")
    ap.add_argument("--no-torchdeq", action="store_true")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    rows = []
    res = Results(echo=False)
    print(f"threads={torch.get_num_threads()}  iters={a.iters}  per-iteration ms (train: fwd + adjoint iterations)")
    others = [(f"baseline {os.path.basename(os.path.normpath(d))}", d) for d in a.baseline]
    if not a.no_torchdeq:
        import importlib.util
        if importlib.util.find_spec("torchdeq") is None:
            print("  torchdeq unavailable: not installed (pip install torchdeq==0.1.0); its columns are left out")
        else:
            others.append(("torchdeq", None))
    print(f"{'B':>4} {'D':>4} {'N':>2}  {'floor mm':>8} {'kernel':>7}  {'eval':>7} {'x mm':>5} {'x kern':>6}  "
          f"{'train':>7} {'x mm':>5} {'x kern':>6}" + "".join(f"  {name + ' eval/train':>28}  {'speed-up':>11}"
                                                            for name, _ in others))
    for N in ints(a.N):
        for D in ints(a.D):
            for B in ints(a.B):
                floor, kfloor = gemm_floor_ms(B, D, N), kernel_floor_ms(B, D, N)
                ours = measure_deqfuse(B, D, N, a.iters, a.reps)
                row = dict(B=B, D=D, N=N, gemm_floor_ms=floor, kernel_floor_ms=kfloor, eval_it_ms=ours["eval_it"],
                           train_it_ms=ours["train_it"], eval_x_floor=ours["eval_it"] / floor,
                           train_x_floor=ours["train_it"] / floor, eval_x_kernel_floor=ours["eval_it"] / kfloor,
                           train_x_kernel_floor=ours["train_it"] / kfloor)
                shape = dict(B=B, D=D, N=N, dtype=torch.float32, note=f"{a.iters} iterations fixed")
                res.add("cell_gemms", "gemm floor (2N+2 torch.mm)", "ms", floor, "ms", **shape)
                res.add("cell_gemms", "gemm floor (C++ kernels, in the extension)", "ms", kfloor, "ms", **shape)
                res.add("solver_iteration", "deqfuse", "eval_ms_per_iteration", ours["eval_it"], "ms", **shape)
                res.add("solver_iteration", "deqfuse", "train_ms_per_iteration", ours["train_it"], "ms", **shape)
                cols = ""
                for name, src in others:
                    r = (measure_torchdeq(B, D, N, a.iters, a.reps) if src is None
                         else _in_checkout(src, B, D, N, a.iters, a.reps, a.threads))
                    key = name.replace(" ", "_")
                    row.update({f"{key}_eval_it_ms": r["eval_it"], f"{key}_train_it_ms": r["train_it"],
                                f"speedup_eval_vs_{key}": r["eval_it"] / ours["eval_it"],
                                f"speedup_train_vs_{key}": r["train_it"] / ours["train_it"]})
                    cols += (f"  {r['eval_it']:13.3f}/{r['train_it']:<14.3f}  "
                             f"{r['eval_it'] / ours['eval_it']:4.1f}x/{r['train_it'] / ours['train_it']:4.1f}x")
                    label = "torchdeq 0.1.0" if src is None else f"{name} ({src})"
                    res.add("solver_iteration", label, "eval_ms_per_iteration", r["eval_it"], "ms", **shape)
                    res.add("solver_iteration", label, "train_ms_per_iteration", r["train_it"], "ms", **shape)
                rows.append(row)
                print(f"{B:4d} {D:4d} {N:2d}  {floor:8.3f} {kfloor:7.3f}  {ours['eval_it']:7.3f} "
                      f"{row['eval_x_floor']:5.1f} {row['eval_x_kernel_floor']:6.1f}  {ours['train_it']:7.3f} "
                      f"{row['train_x_floor']:5.1f} {row['train_x_kernel_floor']:6.1f}{cols}", flush=True)
    per_fwd, per_it, ops = aten_ops(128, 64, 2)
    print(f"ATen ops of an eval forward (B=128 D=64 N=2): {per_fwd} at 10 iterations, {per_it:.1f} per further "
          f"iteration; deqfuse ops: {ops}")
    res.add("solver_iteration", "deqfuse", "aten_ops_per_eval_forward", per_fwd, "", B=128, D=64, N=2)
    res.add("solver_iteration", "deqfuse", "aten_ops_per_eval_iteration", per_it, "", B=128, D=64, N=2)
    res.write_csv(os.path.join(a.out, "small.csv"))
    return rows


if __name__ == "__main__":
    main()
