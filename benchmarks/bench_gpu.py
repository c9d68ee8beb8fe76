"""GPU microbenchmarks, every variant timed side by side in one run (triton.testing.do_bench, median).

  python benchmarks/bench_gpu.py [--out DIR] [--quick]
Sections: copy bandwidth; Anderson step (reference eager / torch.compile / Triton / CUDA); cell forward
and VJP (reference / torch.compile / Triton cublas and fused variants); the full DEQ solve, forward + implicit
backward, at fixed iteration counts (30 + 30) and at the default tolerances (early exit, compaction in eager
mode, chunked graphs), ours vs torchdeq 0.1.0; kernel launches per Anderson iteration (torch.profiler).
The B x D x N x dtype grid is benchmarks/sweep.py. Writes results.csv (the long results format of
deqfuse/benchmarking.py) to --out; prints a summary last.
"""
import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
warnings.filterwarnings("ignore")

import triton  # noqa: E402

import deqfuse  # noqa: E402
from deqfuse import DEQFusion  # noqa: E402
from deqfuse.bench import step_args  # noqa: E402
from deqfuse.benchmarking import Results, time_ms  # noqa: E402
from deqfuse.cell import TRITON_CELLS, cell_apply, cell_vjp_apply  # noqa: E402
from deqfuse.kernels.anderson import anderson_step_triton  # noqa: E402
from deqfuse.reference import anderson_step_ref, cell_forward, cell_vjp  # noqa: E402

RES = Results("cuda") if torch.cuda.is_available() else None
COPY_TBS = [None]


def bench(fn, warmup=25, rep=100):
    return time_ms(fn, "cuda", warmup_ms=warmup, rep_ms=rep)


def record(op, variant, ms, metrics=None, **fields):
    """One timing (ms) and its derived metrics ({name: (value, unit)}) in the long results format."""
    if ms is not None:
        RES.add(op, variant, "ms", ms, "ms", **fields)
    for name, (value, unit) in (metrics or {}).items():
        RES.add(op, variant, name, value, unit, **fields)


def try_compile(fn):
    try:
        c = torch.compile(fn, dynamic=False)
        return c
    except Exception as e:  # noqa: BLE001
        print("  torch.compile unavailable:", e)
        return None


def copy_bandwidth():
    a = torch.empty(2 ** 29 // 4 * 4, dtype=torch.float32, device="cuda").normal_()  # 2 GiB
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    tbs = 2 * a.numel() * 4 / ms / 1e9
    COPY_TBS[0] = tbs
    record("copy", "torch.copy_", ms, {"TBps": (round(tbs, 3), "TB/s")}, dtype=torch.float32, B=a.numel())


def anderson_step_bench(B=8192, L=3072, m=6, hist=None):
    fields = dict(dtype=torch.float32, B=B, D=L, note=f"L={L} m={m}" + (f" history={str(hist).split('.')[-1]}" if hist else ""))
    hb = torch.finfo(hist).bits // 8 if hist else 4
    uniq = B * L * (3 * 4 + 2 * (m - 1) * hb + 2 * hb)  # read x, fx, X/G ring (m-1 slots); write x, X[s], G[s]
    variants = [("reference", anderson_step_ref), ("triton", lambda *a: anderson_step_triton(*a, check=False))]
    ext, _ = deqfuse.extension_status()
    if ext is not None and ext.has_cuda():
        variants.append(("cuda", torch.ops.deqfuse.anderson_step))
    comp = try_compile(anderson_step_ref)
    if comp is not None:
        variants.insert(1, ("torch.compile(reference)", comp))
    for name, fn in variants:
        args = step_args(B, L, m, "cuda", torch.float32, hist)
        try:
            ms = bench(lambda: fn(*args))
        except Exception as e:  # noqa: BLE001
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:2000]}")
            continue
        tbs = uniq / ms / 1e9
        record("anderson_step", name, ms, {"TBps": (round(tbs, 3), "TB/s"),
                                           "pct_copy": (round(100 * tbs / COPY_TBS[0], 1), "%")}, **fields)
        torch.cuda.empty_cache()


def cell_bench(B=8192, D=1024, N=3, dtype=torch.float32):
    from deqfuse.testing import make_inputs, make_params
    fields = dict(dtype=dtype, B=B, D=D, N=N)
    p = make_params(N, D, dtype=dtype, device="cuda")
    z, x, xf = make_inputs(B, N, D, dtype=dtype, device="cuda")
    flops = 2 * B * D * D * (2 * N + 2)
    comp = try_compile(lambda z, x, xf: cell_forward(z, x, xf, p))
    with torch.no_grad():
        fwd = [("reference", lambda: cell_forward(z, x, xf, p)),
               ("torch.compile(reference)", (lambda: comp(z, x, xf)) if comp else None)]
        fwd += [(f"triton/{v}", lambda v=v: cell_apply(z, x, xf, p, 4, "triton", triton_cell=v)) for v in TRITON_CELLS]
        for name, fn in fwd:
            if fn is None:
                continue
            ms = bench(fn)
            record("cell_forward", name, ms, {"TFLOPs": (round(flops / ms / 1e9, 1), "TFLOP/s")}, **fields)
        _, saved_r = cell_forward(z, x, xf, p, save=True)
        _, saved_t = cell_apply(z, x, xf, p, 4, "triton", save=True)
        g = torch.randn_like(z)
        vjp = [("reference", lambda: cell_vjp(g, saved_r, p))]
        vjp += [(f"triton/{v}", lambda v=v: cell_vjp_apply(g, saved_t, p, 4, "triton", v)) for v in TRITON_CELLS]
        for name, fn in vjp:
            ms = bench(fn)
            record("cell_vjp", name, ms, {"TFLOPs": (round(flops / ms / 1e9, 1), "TFLOP/s")}, **fields)


def graph_forward(layer, feats, fields):
    """Capture the whole eval forward solve in one CUDA graph and time its replay."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            layer(feats)
    torch.cuda.current_stream().wait_stream(s)
    with torch.no_grad(), torch.cuda.graph(g):
        static_out = layer(feats)
    ms = bench(g.replay, warmup=3, rep=30)
    with torch.no_grad():
        eager = layer(feats)
    g.replay()
    torch.cuda.synchronize()
    err = float((static_out - eager).norm() / eager.norm())
    record("deq_forward", "deqfuse[auto] whole solve in a user CUDA graph", ms, {"rel_err_vs_eager": (err, "")}, **fields)


def full_solve_bench(B=256, D=512, N=3, dtype=torch.float32, iters=30, graphs=True, torchdeq_too=True, tol=None):
    """Forward solve + implicit backward. tol=None: fixed iteration counts (iters each, tolerance 1e-30, no
    convergence check: every variant does the same work); tol: that tolerance (relative) for both solves and
    the default adaptive compute (early exit, compaction in eager mode, chunked CUDA graphs), torchdeq with
    the same tolerance and caps."""
    torch.manual_seed(0)
    fixed = tol is None
    fields = dict(dtype=dtype, B=B, D=D, N=N, note=f"fixed {iters}+{iters} iterations" if fixed else
                  f"tol={tol} rel, caps {iters}+{iters}")
    op_train, op_fwd = "deq_train_step", "deq_forward"
    feats = [torch.randn(B, D, device="cuda", dtype=dtype) for _ in range(N)]
    proj = torch.randn(B, D, device="cuda") / (B * D) ** 0.5  # a read-out loss (|out|^2 has a zero adjoint)
    out = {}
    t = 1e-30 if fixed else tol
    skw = dict(m=6, check_every=0) if fixed else dict(m=6)

    def ours(backend, graph=False, triton_cell=None):
        layer = DEQFusion(D, N, backend=backend, f_max_iter=iters, b_max_iter=iters, f_tol=t, b_tol=t,
                          on_nonconvergence="ignore", solver_kw=skw, cuda_graph=graph,
                          triton_cell=triton_cell).cuda().to(dtype)

        def step():
            layer.zero_grad(set_to_none=True)
            (layer(feats).float() * proj).sum().backward()
        return step, layer

    for backend in ("reference", "auto"):
        step, layer = ours(backend)
        ms = bench(step, warmup=3, rep=30)
        out[backend] = ms
        torch.cuda.reset_peak_memory_stats()
        step()
        record(op_train, f"deqfuse[{backend}]", ms,
               {"peak_MiB": (round(torch.cuda.max_memory_allocated() / 2 ** 20, 1), "MiB"),
                "rows": (layer.info.forward_stats.rows + layer.info.backward_stats.rows, "rows")}, **fields)
        layer.eval()
        with torch.no_grad():
            ms = bench(lambda: layer(feats), warmup=3, rep=30)
        record(op_fwd, f"deqfuse[{backend}]", ms, {"rows": (layer.info.forward_stats.rows, "rows")}, **fields)
        if backend == "auto" and graphs and fixed:
            try:
                graph_forward(layer, feats, fields)
            except Exception as e:  # noqa: BLE001
                print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:500]}")
    for gemm in TRITON_CELLS if graphs else ():
        try:
            step, layer = ours("auto", graph=True, triton_cell=gemm)
            ms = bench(step, warmup=3, rep=30)
            name = f"auto+cuda_graph, triton/{gemm} cell"
            out[name] = ms
            record(op_train, f"deqfuse[{name}]", ms, **fields)
        except Exception as e:  # noqa: BLE001
            print(f"  graphed training step ({gemm} cell) failed: {type(e).__name__}: {str(e)[:500]}")
    if torchdeq_too:
        try:
            from torchdeq import get_deq
        except ImportError as e:
            print("  torchdeq unavailable:", e)
            return out
        layer = DEQFusion(D, N).cuda().to(dtype)
        deq = get_deq(ift=True, f_solver="anderson", b_solver="anderson", f_max_iter=iters, b_max_iter=iters,
                      f_tol=t, b_tol=t, f_stop_mode="rel", b_stop_mode="rel")
        x = torch.stack(feats, 1)
        xf = deqfuse.reference.fuse_inputs(x, layer.weights, layer.bias)
        shape = (B, N + 1, D)

        def tdq_step():
            layer.zero_grad(set_to_none=True)
            f = lambda z: layer.cell(z, x, xf, "reference")  # noqa: E731
            zs, _ = deq(f, torch.zeros(shape, device="cuda", dtype=dtype))
            (zs[-1][:, N].float() * proj).sum().backward(retain_graph=True)
        ms = bench(tdq_step, warmup=2, rep=20)
        out["torchdeq"] = ms
        record(op_train, "torchdeq 0.1.0", ms, **fields)
        for k, v in out.items():
            if k != "torchdeq":
                record(op_train, f"deqfuse[{k}]", None, {"speedup_vs_torchdeq": (round(ms / v, 2), "x")}, **fields)
    return out


def launches_per_iter(B=256, D=512, N=3, iters=10):
    """CUDA kernels launched per Anderson iteration of a forward solve (profiler count / iters)."""
    from torch.profiler import ProfilerActivity, profile
    feats = [torch.randn(B, D, device="cuda") for _ in range(N)]
    res = {}
    for backend in ("reference", "auto"):
        layer = DEQFusion(D, N, backend=backend, f_max_iter=iters, f_tol=1e-30, on_nonconvergence="ignore").cuda().eval()
        with torch.no_grad():
            layer(feats)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                layer(feats)
        n = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        res[backend] = n / iters
        record("launches_per_iteration", f"deqfuse[{backend}]", None, {"kernels": (round(n / iters, 1), "")},
               B=B, D=D, N=N)
    try:
        from torchdeq import get_deq
        layer = DEQFusion(D, N).cuda().eval()
        deq = get_deq(f_solver="anderson", f_max_iter=iters, f_tol=1e-30)
        x = torch.stack(feats, 1)
        xf = deqfuse.reference.fuse_inputs(x, layer.weights, layer.bias)
        with torch.no_grad():
            f = lambda z: layer.cell(z, x, xf, "reference")  # noqa: E731
            deq(f, torch.zeros(B, N + 1, D, device="cuda"))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                deq(f, torch.zeros(B, N + 1, D, device="cuda"))
        n = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        record("launches_per_iteration", "torchdeq 0.1.0", None, {"kernels": (round(n / iters, 1), "")}, B=B, D=D, N=N)
    except ImportError:
        pass
    return res


def profile_train_step(B=256, D=512, N=3):
    """Where the time of one training step (fwd solve + implicit bwd) goes: top host-side ops."""
    from torch.profiler import ProfilerActivity, profile
    layer = DEQFusion(D, N, f_max_iter=30, b_max_iter=30, f_tol=1e-30, b_tol=1e-30,
                      on_nonconvergence="ignore").cuda()
    feats = [torch.randn(B, D, device="cuda") for _ in range(N)]
    proj = torch.randn(B, D, device="cuda")
    (layer(feats) * proj).sum().backward()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        (layer(feats) * proj).sum().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"{time.strftime('%Y-%m-%d')} ext={deqfuse.extension_status()[1]}", flush=True)
    copy_bandwidth()
    anderson_step_bench()
    anderson_step_bench(hist=torch.bfloat16)
    anderson_step_bench(B=256, L=2048)
    cell_bench()
    cell_bench(dtype=torch.bfloat16)
    launches_per_iter()
    full_solve_bench()
    full_solve_bench(tol=1e-3, iters=55)
    profile_train_step()
    RES.write_csv(os.path.join(a.out, "results.csv"))
    print("\n# summary")
    for r in RES.rows:
        shape = " ".join(f"{k}={r[k]}" for k in ("B", "D", "N") if r[k] != "")
        print(f"{r['op']:<24} {shape:<22} {r['dtype']:<9} {r['variant']:<44} {r['metric']:<18} {r['value']!s:>10} "
              f"{r['unit']:<6} {r['note']}")


if __name__ == "__main__":
    main()
