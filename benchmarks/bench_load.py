"""The compiled CPU solve on a quiet machine and beside busy neighbour processes (data-loader workers, other
jobs): time per iteration with 1 thread and with torch's thread count, alternated in one run.

    python benchmarks/bench_load.py [--B 128] [--D 64] [--N 2] [--iters 30] [--neighbours 1] [--rounds 5]

Each measurement: anderson_cell_solve (forward) and anderson_vjp_solve (adjoint) with tol 1e-30 (no sample
stops), `--iters` iterations, median over 40 calls; rounds alternate 1 thread / default threads; the
neighbours are `python -c "while True: pass"` processes started for the loaded half. Prints us per
iteration (medians over rounds) and the loaded default-thread time over the loaded 1-thread time.
The same in a model: two Linear encoders (300 -> 256 -> D) before DEQFusion(D, N) with
`--iters` fixed iterations, an eval forward and an AdamW training step, ms per call (torch's own parallel ops
run right before each solve, as in any model).
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--N", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--neighbours", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    if min(a.B, a.D, a.N, a.iters, a.rounds) < 1 or a.neighbours < 0 or a.D % 4:
        ap.error("--B, --D (a multiple of 4), --N, --iters, --rounds >= 1, --neighbours >= 0")
    import deqfuse
    from deqfuse import DEQFusion
    from deqfuse.reference.cell import fuse_inputs
    from deqfuse.solvers import Results
    if deqfuse.extension_status()[0] is None:
        ap.error("needs the compiled extension")
    torch.manual_seed(0)
    B, D, N, T = a.B, a.D, a.N, a.iters
    layer = DEQFusion(D, N)
    p, G = list(layer.cell.params()), layer.cell.groups
    x = torch.randn(B, N, D)
    with torch.no_grad():
        xf = fuse_inputs(x, layer.weights, layer.bias)
        saved = torch.ops.deqfuse.cell_forward(torch.randn(B, N + 1, D) * 0.1, x, xf, p, G, True)[1]
    z0, add = torch.zeros(B, (N + 1) * D), torch.randn(B, (N + 1) * D)
    ops = torch.ops.deqfuse
    solves = {"forward": lambda r: ops.anderson_cell_solve(z0, x, xf, p, G, *r.buffers(), 5, 1.0, 1e-4, 1e-30, True, T),
              "adjoint": lambda r: ops.anderson_vjp_solve(z0, add, saved, p, G, *r.buffers(), 5, 1.0, 1e-4, 1e-30,
                                                          True, T)}
    default = torch.get_num_threads()

    def us(kind, nt):
        torch.set_num_threads(nt)
        ts = []
        for _ in range(40):
            r = Results(z0, T)
            t0 = time.perf_counter()
            solves[kind](r)
            ts.append((time.perf_counter() - t0) / T * 1e6)
        return statistics.median(ts)

    res = {}

    def rounds(kinds, measure):
        """res[(loaded, kind, threads)]: a.rounds measurements each, quiet and beside the neighbours."""
        for loaded in (False, True):
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                     for _ in range(a.neighbours if loaded else 0)]
            time.sleep(0.5)
            try:
                for _ in range(a.rounds):
                    for kind in kinds:
                        for nt in (1, default):
                            res.setdefault((loaded, kind, nt), []).append(measure(kind, nt))
            finally:
                for pr in procs:
                    pr.kill()
        torch.set_num_threads(default)

    rounds(solves, us)
    enc = [torch.nn.Sequential(torch.nn.Linear(300, 256), torch.nn.Linear(256, D)) for _ in range(N)]
    model = DEQFusion(D, N, f_max_iter=T, b_max_iter=T, f_tol=1e-30, b_tol=1e-30, on_nonconvergence="ignore")
    opt = torch.optim.AdamW([q for m in (model, *enc) for q in m.parameters()])
    raw = [torch.randn(B, 300) for _ in range(N)]

    def model_ms(kind, nt):
        torch.set_num_threads(nt)
        model.train(kind == "train")
        ts = []
        for i in range(23):
            t0 = time.perf_counter()
            if kind == "eval":
                with torch.no_grad():
                    model([e(r) for e, r in zip(enc, raw)])
            else:
                opt.zero_grad()
                model([e(r) for e, r in zip(enc, raw)]).square().mean().backward()
                opt.step()
            if i >= 3:
                ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    rounds(("eval", "train"), model_ms)
    print(f"B={B} D={D} N={N}, {T} iterations, us per iteration (median of {a.rounds} rounds); "
          f"loaded: {a.neighbours} busy neighbour process(es); {default} = torch's threads")
    print(f"{'solve':8s} {'quiet 1':>9s} {'quiet ' + str(default):>9s} {'loaded 1':>9s} {'loaded ' + str(default):>10s}  "
          f"loaded {default}/1")
    for kind in (*solves, "eval", "train"):
        if kind == "eval":
            print("in a model (encoders + DEQFusion), ms per call: eval forward, AdamW training step")
        m = {k: statistics.median(v) for k, v in res.items() if k[1] == kind}
        print(f"{kind:8s} {m[(False, kind, 1)]:9.1f} {m[(False, kind, default)]:9.1f} {m[(True, kind, 1)]:9.1f} "
              f"{m[(True, kind, default)]:10.1f}  {m[(True, kind, default)] / m[(True, kind, 1)]:.2f}x")


if __name__ == "__main__":
    main()
