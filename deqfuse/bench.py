"""`python -m deqfuse bench`: time each op of every available backend side by side on this machine
(reference eager, torch.compile of the reference where it works, the compiled extension, Triton on a
GPU) and write bench.csv. The full GPU suite (torchdeq, graphs, sweeps) is benchmarks/bench_gpu.py."""
import os

import torch

from .backend import extension_status, triton_status
from .benchmarking import Results, time_ms
from .cell import TRITON_CELLS, FusionCell, cell_apply, resolve_triton_cell
from .reference import CellParams, anderson_step_ref, cell_forward
from .solvers import AndersonState


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
    """Every available backend of the Anderson step and of the cell forward, side by side (one timer,
    the long results format: deqfuse/benchmarking.py). Writes bench.csv to `out`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, L, m = (256, 1024, 6) if quick or device.type == "cpu" else (8192, 3072, 6)
    N, D, Bc = (3, 256, 256) if quick or device.type == "cpu" else (3, 1024, 8192)
    res = Results(device)
    steps = [("reference", "reference", anderson_step_ref)]
    if extension_status()[0] is not None and (device.type == "cpu" or extension_status()[0].has_cuda()):
        steps.append(("c++" if device.type == "cpu" else "cuda", "cuda", torch.ops.deqfuse.anderson_step))
    if triton_status()[0] and device.type == "cuda":
        from .kernels.anderson import anderson_step_triton
        steps.append(("triton", "triton", lambda *a: anderson_step_triton(*a, check=False)))
    for name, backend, fn in steps:
        args = step_args(B, L, m, device)
        res.add("anderson_step", name, "ms", time_ms(lambda: fn(*args), device), "ms", backend=backend,
                dtype=torch.float32, B=B, D=L, note=f"L={L} m={m}")
    p = CellParams(*(t.detach() for t in FusionCell(D, N).to(device).params()))
    z, x, xf = torch.randn(Bc, N + 1, D, device=device), torch.randn(Bc, N, D, device=device), torch.randn(Bc, D, device=device)
    cells = [("reference", "reference", lambda: cell_forward(z, x, xf, p))]
    if extension_status()[0] is not None and device.type == "cpu":
        cells.append(("c++", "cuda", lambda: torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, False)))
    if triton_status()[0] and device.type == "cuda":
        for variant in TRITON_CELLS:
            if resolve_triton_cell(None if variant == "cublas" else variant, D, 4) == variant:
                cells.append((f"triton/{variant}", "triton",
                              lambda v=variant: cell_apply(z, x, xf, p, 4, "triton", triton_cell=v)))
    with torch.no_grad():
        for name, backend, fn in cells:
            res.add("cell_forward", name, "ms", time_ms(fn, device), "ms", backend=backend, dtype=torch.float32,
                    B=Bc, D=D, N=N)
    res.write_csv(os.path.join(out, "bench.csv"))
    for r in res.rows:
        base = res.value(r["op"], "reference")
        print(f"{r['op']:<14} {r['variant']:<14} {r['value']:9.3f} ms   x{base / r['value']:.2f} vs reference")
    return res.rows
