"""Marginal cost of one iteration of the compiled CPU solves (issue 17), no Python in the timed loop:
torch.ops.deqfuse.anderson_cell_solve (forward) and anderson_vjp_solve (adjoint) called directly at two
iteration counts (tol 1e-30: no sample stops), (t(hi) - t(lo)) / (hi - lo), beside the in-extension GEMM floor
of one cell evaluation (deqfuse._C.cell_gemm_floor_seconds: the 2N+2 GEMMs alone, same kernels and threads).

  python benchmarks/bench_op_iter.py [--B 128] [--D 64] [--N 2] [--threads 2] [--m 5] [--reps 40]
                                     [--lo 4] [--hi 34] [--dtype float32] [--gemm G] [--rows R] [--layout L]

Prints one line per configuration: us per iteration (median of reps; min in brackets) and the ratio to the
floor, and the kernel plan that ran (deqfuse.cpu_plan; --gemm / --rows / --layout force parts of it through
deqfuse.force_cpu_plan). Needs the compiled extension.
"""
import argparse
import statistics
import time

import torch


def _ints(s):
    return [int(v) for v in s.split(",")]


def measure(B, D, N, m, reps, lo, hi, dtype):
    import deqfuse
    from deqfuse import DEQFusion
    from deqfuse.reference.cell import fuse_inputs
    from deqfuse.solvers import Results
    ext = deqfuse.extension_status()[0]
    assert ext is not None, "bench_op_iter needs the compiled extension"
    torch.manual_seed(0)
    layer = DEQFusion(D, N).to(dtype)
    p, G = list(layer.cell.params()), layer.cell.groups
    x = torch.randn(B, N, D, dtype=dtype)
    with torch.no_grad():
        xf = fuse_inputs(x, layer.weights, layer.bias)
        z0 = torch.zeros(B, (N + 1) * D, dtype=dtype)
        zs = torch.randn(B, N + 1, D, dtype=dtype) * 0.1
        saved = torch.ops.deqfuse.cell_forward(zs, x, xf, p, G, True)[1]
    add = torch.randn(B, (N + 1) * D, dtype=dtype)

    def fwd(it):
        r = Results(z0, it)
        return lambda: torch.ops.deqfuse.anderson_cell_solve(z0, x, xf, p, G, *r.buffers(), m, 1.0, 1e-4, 1e-30,
                                                             True, it)

    def adj(it):
        r = Results(z0, it)
        return lambda: torch.ops.deqfuse.anderson_vjp_solve(z0, add, saved, p, G, *r.buffers(), m, 1.0, 1e-4,
                                                            1e-30, True, it)

    def per_iter(make):
        f_lo, f_hi = make(lo), make(hi)
        for f in (f_lo, f_hi, f_lo, f_hi):
            f()
        d = []
        for _ in range(reps):  # interleaved, so drift hits both counts alike
            t0 = time.perf_counter(); f_lo(); t1 = time.perf_counter(); f_hi(); t2 = time.perf_counter()
            d.append(((t2 - t1) - (t1 - t0)) / (hi - lo) * 1e6)
        return statistics.median(d), min(d)

    floor = statistics.median(ext.cell_gemm_floor_seconds(z0, p, 200, False) * 1e6 for _ in range(7))
    return per_iter(fwd), per_iter(adj), floor, deqfuse.cpu_plan(D, G, dtype)


def main(argv=None):
    """Returns the rows printed: dicts of B, D, N, floor_us, forward_us, adjoint_us (medians), plan."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=_ints, default=[128])
    ap.add_argument("--D", type=_ints, default=[64])
    ap.add_argument("--N", type=_ints, default=[2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--lo", type=int, default=4)
    ap.add_argument("--hi", type=int, default=34)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    from deqfuse.backend import cpu_plan_choices
    for part, choices in cpu_plan_choices().items():
        ap.add_argument(f"--{part}", default="auto", choices=choices, help="force this part of the kernel plan")
    a = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        from deqfuse import force_cpu_plan
        with force_cpu_plan(gemm=a.gemm, rows=a.rows, layout=a.layout):
            return _run(a)
    finally:
        torch.set_num_threads(threads)


def _run(a):
    dtype = getattr(torch, a.dtype)
    print(f"threads={a.threads} m={a.m} {a.dtype}: us per iteration, median (min) of {a.reps}")
    print(f"{'B':>5} {'D':>4} {'N':>2} {'floor':>7} {'forward':>16} {'x floor':>7} {'adjoint':>16} {'x floor':>7}  plan")
    rows = []
    for B in a.B:
        for D in a.D:
            for N in a.N:
                (fm, fmin), (am, amin), floor, plan = measure(B, D, N, a.m, a.reps, a.lo, a.hi, dtype)
                print(f"{B:>5} {D:>4} {N:>2} {floor:>7.1f} {fm:>8.1f} ({fmin:>5.1f}) {fm / floor:>7.2f} "
                      f"{am:>8.1f} ({amin:>5.1f}) {am / floor:>7.2f}  {plan}", flush=True)
                rows.append(dict(B=B, D=D, N=N, floor_us=floor, forward_us=fm, adjoint_us=am, plan=plan))
    return rows


if __name__ == "__main__":
    main()
