"""GPU microbenchmarks, every variant timed side by side in one run (triton.testing.do_bench, median).

  python benchmarks/bench_gpu.py [--out DIR] [--quick]
Sections: copy bandwidth; Anderson step (reference eager / torch.compile / Triton / CUDA); cell forward
and VJP (reference / torch.compile / Triton); modality epilogue (reference / Triton / CUDA); the full
DEQ solve, forward (30 iters) + implicit backward (30 iters), ours vs torchdeq 0.1.0; kernel launches
per Anderson iteration (torch.profiler). The B x D x N x dtype grid is benchmarks/sweep.py.
Writes results.csv to --out; prints a table last.
"""
import argparse
import csv
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import deqfuse  # noqa: E402
from deqfuse import DEQFusion  # noqa: E402
from deqfuse.kernels.anderson import anderson_step_triton  # noqa: E402
from deqfuse.kernels.cell import cell_forward_triton, cell_vjp_triton  # noqa: E402
from deqfuse.kernels.cell_fused import cell_forward_fused, cell_vjp_fused  # noqa: E402
from deqfuse.reference import anderson_step_ref, cell_forward, cell_vjp  # noqa: E402
from deqfuse.bench import step_args  # noqa: E402

ROWS = []
COPY_TBS = [None]


def bench(fn, warmup=25, rep=100):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def record(section, variant, ms, **extra):
    row = dict(section=section, variant=variant, ms=round(ms, 5), **extra)
    ROWS.append(row)
    print(f"  {section:<28} {variant:<24} {ms:9.4f} ms  " + "  ".join(f"{k}={v}" for k, v in extra.items()),
          flush=True)


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
    record("copy", "torch.copy_", ms, TBps=round(tbs, 3))


def anderson_step_bench(B=8192, L=3072, m=6, hist=None):
    sec = f"anderson_step B={B} L={L} m={m}" + (f" hist={str(hist).split('.')[-1]}" if hist else "")
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
        record(sec, name, ms, TBps=round(tbs, 3), pct_copy=round(100 * tbs / COPY_TBS[0], 1))
        torch.cuda.empty_cache()


def cell_bench(B=8192, D=1024, N=3, dtype=torch.float32):
    from conftest import make_inputs, make_params
    sec = f"cell B={B} D={D} N={N} {str(dtype).split('.')[-1]}"
    p = make_params(N, D, dtype=dtype, device="cuda")
    z, x, xf = make_inputs(B, N, D, dtype=dtype, device="cuda")
    flops = 2 * B * D * D * (2 * N + 2)
    comp = try_compile(lambda z, x, xf: cell_forward(z, x, xf, p))
    with torch.no_grad():
        for name, fn in [("reference", lambda: cell_forward(z, x, xf, p)),
                         ("torch.compile(reference)", (lambda: comp(z, x, xf)) if comp else None),
                         ("triton", lambda: cell_forward_triton(z, x, xf, p)),
                         ("triton-fused", lambda: cell_forward_fused(z, x, xf, p))]:
            if fn is None:
                continue
            ms = bench(fn)
            record(sec + " fwd", name, ms, TFLOPs=round(flops / ms / 1e9, 1))
        _, saved_r = cell_forward(z, x, xf, p, save=True)
        _, saved_t = cell_forward_triton(z, x, xf, p, save=True)
        g = torch.randn_like(z)
        for name, fn in [("reference", lambda: cell_vjp(g, saved_r, p)), ("triton", lambda: cell_vjp_triton(g, saved_t, p)),
                         ("triton-fused", lambda: cell_vjp_fused(g, saved_t, p))]:
            ms = bench(fn)
            record(sec + " vjp", name, ms, TFLOPs=round(flops / ms / 1e9, 1))


def epilogue_bench(B=8192, D=1024, N=3):
    from conftest import make_params
    from deqfuse.reference.epilogue import modality_epilogue_ref
    sec = f"modality_epilogue B={B} D={D} N={N}"
    p = make_params(N, D, dtype=torch.float32, device="cuda")
    a2 = torch.randn(N, B, D, device="cuda")
    x = torch.randn(B, N, D, device="cuda")
    z = torch.randn(B, N + 1, D, device="cuda")
    args = (a2, x, z, p.b2, p.gn2_w, p.gn2_b, p.gn3_w, p.gn3_b, 4)
    byts = 4 * B * D * (N * 3 + N * 2)  # read a2, x, z_i; write out, u
    variants = [("reference", lambda: modality_epilogue_ref(*args))]
    ext, _ = deqfuse.extension_status()
    if ext is not None and ext.has_cuda():
        variants.append(("cuda", lambda: torch.ops.deqfuse.modality_epilogue(*args)))
    for name, fn in variants:
        ms = bench(fn)
        record(sec, name, ms, TBps=round(byts / ms / 1e9, 3))


def graph_forward(layer, feats, sec):
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
    record(sec.replace("fwd+bwd", "fwd only"), "deqfuse[auto] CUDA graph", ms, rel_err_vs_eager=f"{err:.1e}")


def full_solve_bench(B=256, D=512, N=3, dtype=torch.float32, iters=30, graphs=True, torchdeq_too=True):
    """Forward solve (iters Anderson steps) + implicit backward (iters adjoint steps), fixed iteration count."""
    torch.manual_seed(0)
    sec = f"deq fwd+bwd B={B} D={D} N={N} {str(dtype).split('.')[-1]} it={iters}"
    feats = [torch.randn(B, D, device="cuda", dtype=dtype) for _ in range(N)]
    out = {}

    def ours(backend, graph=False):
        layer = DEQFusion(D, N, backend=backend, f_max_iter=iters, b_max_iter=iters, f_tol=1e-30, b_tol=1e-30,
                          on_nonconvergence="ignore", solver_kw=dict(m=6), cuda_graph=graph).cuda().to(dtype)

        def step():
            layer.zero_grad(set_to_none=True)
            layer(feats).float().square().mean().backward()
        return step, layer

    for backend in ("reference", "auto"):
        step, layer = ours(backend)
        ms = bench(step, warmup=3, rep=30)
        out[backend] = ms
        record(sec, f"deqfuse[{backend}]", ms)
        torch.cuda.reset_peak_memory_stats()
        step()
        record(sec, f"deqfuse[{backend}] peak_mem", 0.0, MiB=round(torch.cuda.max_memory_allocated() / 2 ** 20, 1))
        layer.eval()
        with torch.no_grad():
            ms = bench(lambda: layer(feats), warmup=3, rep=30)
        record(sec.replace("fwd+bwd", "fwd only"), f"deqfuse[{backend}]", ms)
        if backend == "auto" and graphs:
            try:
                graph_forward(layer, feats, sec)
            except Exception as e:  # noqa: BLE001
                print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:500]}")
    for gemm in ("cublas", "fused") if graphs else ():
        os.environ["DEQFUSE_CELL_GEMM"] = gemm  # read when the graphs are captured (first call)
        try:
            step, layer = ours("auto", graph=True)
            ms = bench(step, warmup=3, rep=30)
            name = "auto+cuda_graph" + (", fused cell" if gemm == "fused" else "")
            out[name] = ms
            record(sec, f"deqfuse[{name}]", ms)
        except Exception as e:  # noqa: BLE001
            print(f"  graphed training step ({gemm} cell) failed: {type(e).__name__}: {str(e)[:500]}")
        finally:
            os.environ.pop("DEQFUSE_CELL_GEMM", None)
    if torchdeq_too:
        try:
            from torchdeq import get_deq
        except ImportError as e:
            print("  torchdeq unavailable:", e)
            return out
        layer = DEQFusion(D, N).cuda().to(dtype)
        deq = get_deq(ift=True, f_solver="anderson", b_solver="anderson", f_max_iter=iters, b_max_iter=iters,
                      f_tol=1e-30, b_tol=1e-30)
        x = torch.stack(feats, 1)
        xf = deqfuse.reference.fuse_inputs(x, layer.weights, layer.bias)
        shape = (B, N + 1, D)

        def tdq_step():
            layer.zero_grad(set_to_none=True)
            f = lambda z: layer.cell(z, x, xf, "reference")  # noqa: E731
            zs, _ = deq(f, torch.zeros(shape, device="cuda", dtype=dtype))
            zs[-1][:, N].float().square().mean().backward(retain_graph=True)
        ms = bench(tdq_step, warmup=2, rep=20)
        out["torchdeq"] = ms
        record(sec, "torchdeq 0.1.0", ms)
        for k, v in out.items():
            if k != "torchdeq":
                record(sec, f"speedup deqfuse[{k}] vs torchdeq", 0.0, x=round(ms / v, 2))
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
        record("launches per fwd iteration", f"deqfuse[{backend}]", 0.0, kernels=round(n / iters, 1))
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
        record("launches per fwd iteration", "torchdeq 0.1.0", 0.0, kernels=round(n / iters, 1))
    except ImportError:
        pass
    return res


def profile_train_step(B=256, D=512, N=3):
    """Where the time of one training step (fwd solve + implicit bwd) goes: top host-side ops."""
    from torch.profiler import ProfilerActivity, profile
    layer = DEQFusion(D, N, f_max_iter=30, b_max_iter=30, f_tol=1e-30, b_tol=1e-30,
                      on_nonconvergence="ignore").cuda()
    feats = [torch.randn(B, D, device="cuda") for _ in range(N)]
    layer(feats).square().mean().backward()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        layer(feats).square().mean().backward()
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
    epilogue_bench()
    launches_per_iter()
    full_solve_bench()
    profile_train_step()
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in ROWS for k in r}))
        w.writeheader()
        w.writerows(ROWS)
    print("\n# summary")
    for r in ROWS:
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("section", "variant", "ms"))
        print(f"{r['section']:<44} {r['variant']:<36} {r['ms']:9.4f} ms  {extra}")


if __name__ == "__main__":
    main()
