"""`python -m deqfuse bench`: time each op of every available backend side by side on this machine
(reference eager, torch.compile of the reference where it works, the compiled extension, Triton on a
GPU) and write bench.csv. The full GPU suite (torchdeq, graphs, sweeps) is benchmarks/bench_gpu.py."""
import csv
import os
import time

import torch

from .backend import extension_status, triton_status
from .cell import FusionCell
from .reference import CellParams, anderson_step_ref, cell_forward
from .solvers import AndersonState


def time_ms(fn, device, reps=20, warmup_ms=10, rep_ms=50):
    """Median ms of fn(): triton do_bench on CUDA (warmup/rep in ms), perf_counter loop on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def step_args(B, L, m, device="cpu", dtype=torch.float32, hist=None):
    """Arguments of one steady-state Anderson step (full random ring, k = 2m so every slot is read, never
    'better' and never converged): the same work at every call, for timing. Returns the tuple to splat
    into any step implementation (reference.anderson contract)."""
    x0 = torch.randn(B, L, device=device, dtype=dtype)
    st = AndersonState(x0, m, 1, hist)
    st.X.normal_()
    st.G.normal_()
    st.GG.copy_(torch.einsum("bil,bjl->bij", st.G.float(), st.G.float()).to(st.GG.dtype))
    st.best_res.fill_(-1.0)
    fx = x0 + 0.1 * torch.randn_like(x0)
    return (st.x, fx, st.X, st.G, st.GG, st.best_x, st.best_res, st.converged, st.nstep,
            st.abs_trace[0], st.rel_trace[0], 2 * m, 1.0, 1e-4, 0.0, True)


def run(out="bench_out", quick=False):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, L, m = (256, 1024, 6) if quick or device.type == "cpu" else (8192, 3072, 6)
    N, D, Bc = (3, 256, 256) if quick or device.type == "cpu" else (3, 1024, 8192)
    rows = []
    steps = [("reference", anderson_step_ref)]
    if extension_status()[0] is not None and (device.type == "cpu" or extension_status()[0].has_cuda()):
        steps.append(("cuda-ext" if device.type == "cuda" else "c++-ext", torch.ops.deqfuse.anderson_step))
    if triton_status()[0] and device.type == "cuda":
        from .kernels.anderson import anderson_step_triton
        steps.append(("triton", lambda *a: anderson_step_triton(*a, check=False)))
    for name, fn in steps:
        args = step_args(B, L, m, device)
        rows.append(dict(op=f"anderson_step B={B} L={L} m={m}", backend=name, ms=time_ms(lambda: fn(*args), device)))
    p = CellParams(*(t.detach() for t in FusionCell(D, N).to(device).params()))
    z, x, xf = torch.randn(Bc, N + 1, D, device=device), torch.randn(Bc, N, D, device=device), torch.randn(Bc, D, device=device)
    cells = [("reference", lambda: cell_forward(z, x, xf, p))]
    if triton_status()[0] and device.type == "cuda":
        from .kernels.cell import cell_forward_triton
        from .kernels.cell_fused import cell_forward_fused, fused_supported
        cells.append(("triton", lambda: cell_forward_triton(z, x, xf, p)))
        if fused_supported(D, 4):
            cells.append(("triton-fused", lambda: cell_forward_fused(z, x, xf, p)))
    with torch.no_grad():
        for name, fn in cells:
            rows.append(dict(op=f"cell forward B={Bc} D={D} N={N}", backend=name, ms=time_ms(fn, device)))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["op", "backend", "ms"])
        w.writeheader()
        w.writerows(rows)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for r in rows:
        base = next(q["ms"] for q in rows if q["op"] == r["op"] and q["backend"] == "reference")
        print(f"{r['op']:<36} {r['backend']:<12} {r['ms']:9.3f} ms   x{base / r['ms']:.2f} vs reference")
    return rows
