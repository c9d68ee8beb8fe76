"""B x D x N x dtype sweep (issue 6): every variant timed side by side at each point, in one process.

  python benchmarks/sweep.py [--dtype fp32|bf16|all] [--out DIR] [--iters 30] [--device cuda|cpu]
                             [--N 2,3] [--D ...] [--B ...] [--budget-s 540] [--smoke] [--no-compile] [--no-torchdeq]
Per point (B, D, N, dtype), with L = (N+1) D and m = 6:
  cell_fwd     reference | torch.compile(reference) | triton/cublas (cuBLAS + row epilogues) | triton/fused
  step         reference | torch.compile(reference) | triton | cuda
  solve_fwd    eval forward solve, `iters` Anderson iterations: reference | auto | auto+graph | torchdeq
  train_step   forward solve + implicit backward (`iters` adjoint iterations) + parameter grads:
               reference | auto | auto+graph | torchdeq | torchdeq+compile(cell); peak memory too
Iteration counts are fixed (tolerance 1e-30), so every variant does the same work. Variants whose one
call would take seconds (reference / torchdeq / compile at B * D^2 > SLOW_LIMIT) are skipped and
listed as such. Writes sweep.csv in the long results format (deqfuse/benchmarking.py: op = the measure,
metrics ms / peak_MiB / TFLOPs / TBps); plot/table: sweep_report.py.
--smoke: a tiny grid on any device (CI runs it on the CPU so this script cannot rot between GPU runs).
"""
import argparse
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
warnings.filterwarnings("ignore")

import deqfuse  # noqa: E402
from deqfuse import DEQFusion  # noqa: E402
from deqfuse.bench import step_args  # noqa: E402
from deqfuse.benchmarking import Results, time_ms  # noqa: E402
from deqfuse.cell import FUSED_MAX_GROUP_WIDTH, TRITON_CELLS, cell_apply  # noqa: E402
from deqfuse.reference import anderson_step_ref, cell_forward, fuse_inputs  # noqa: E402

GRID = dict(B=(32, 256, 2048, 8192), D=(256, 512, 1024), N=(2, 3, 5))
SMOKE = dict(B=(3,), D=(8,), N=(2,))
MAX_STATE = 8192 * 3 * 1024      # B * N * D above the largest cell point: skipped
SLOW_LIMIT = 2048 * 512 * 512    # B * D^2 above this: eager reference / torchdeq solves take seconds per call
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Sweep:
    def __init__(self, device, out, iters, compile_ok, torchdeq_ok, smoke):
        self.dev, self.out, self.iters, self.smoke = torch.device(device), out, iters, smoke
        self.res = Results(self.dev, echo=False)
        self.triton = deqfuse.triton_status()[0] and (self.dev.type == "cuda" or smoke)
        ext = deqfuse.extension_status()[0]
        self.cuda_ext = ext is not None and (self.dev.type == "cpu" or ext.has_cuda())
        self.compiled = {}
        self.compile_ok = compile_ok
        self.tdq = None
        if torchdeq_ok:
            try:
                from torchdeq import get_deq
                self.tdq = get_deq
            except ImportError as e:
                print("  torchdeq unavailable:", e)

    # ------------------------------------------------------------------ helpers
    def time(self, fn, slow=False):
        if self.dev.type == "cuda":
            return time_ms(fn, self.dev, warmup_ms=2 if slow else 10, rep_ms=10 if slow else 50)
        return time_ms(fn, self.dev, reps=3)

    @property
    def rows(self):
        return self.res.rows

    def record(self, pt, measure, variant, fn=None, note="", flops=0.0, byts=0.0, mem=False, slow=False):
        """Time fn at point pt (B, D, N, dtype) as `measure` / `variant`: rows ms (+ peak_MiB, TFLOPs, TBps);
        without fn (or if it fails) one row with an empty value and the note."""
        add = lambda metric, value, unit, n=note: self.res.add(measure, variant, metric, value, unit, note=n, **pt)  # noqa: E731
        ms = None
        if fn is not None:
            try:
                peak = None
                if mem and self.dev.type == "cuda":
                    fn()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    fn()
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() / 2 ** 20
                ms = self.time(fn, slow)
                add("ms", ms, "ms")
                if peak is not None:
                    add("peak_MiB", round(peak, 1), "MiB")
                if flops:
                    add("TFLOPs", round(flops / ms / 1e9, 1), "TFLOP/s")
                if byts:
                    add("TBps", round(byts / ms / 1e9, 3), "TB/s")
            except Exception as e:  # noqa: BLE001  one failing variant must not end the sweep
                ms, note = None, f"failed: {type(e).__name__}: {str(e)[:200]}"
        if ms is None:
            add("ms", "", "ms", note)
        print(f"  {measure:<10} B={pt['B']:<5} D={pt['D']:<5} N={pt['N']} {pt['dtype']:<5} {variant:<26} "
              f"{ms if ms is not None else float('nan'):10.4f} ms {note}", flush=True)

    def compiled_fn(self, name, fn):
        if not self.compile_ok:
            return None
        if name not in self.compiled:
            try:
                self.compiled[name] = torch.compile(fn, dynamic=True)
            except Exception as e:  # noqa: BLE001
                print(f"  torch.compile({name}) unavailable: {e}")
                self.compiled[name] = None
        return self.compiled[name]

    # ------------------------------------------------------------------ measures
    def cell(self, pt, dtype):
        from deqfuse.testing import make_inputs, make_params
        B, D, N = pt["B"], pt["D"], pt["N"]
        p = make_params(N, D, dtype=dtype, device=self.dev)
        z, x, xf = make_inputs(B, N, D, dtype=dtype, device=self.dev)
        flops = 2 * B * D * D * (2 * N + 2)
        comp = self.compiled_fn("cell", cell_forward)
        with torch.no_grad():
            self.record(pt, "cell_fwd", "reference", lambda: cell_forward(z, x, xf, p), flops=flops)
            if comp is not None:
                self.record(pt, "cell_fwd", "torch.compile(reference)", lambda: comp(z, x, xf, p), flops=flops)
            if self.triton:
                for v in TRITON_CELLS:
                    if D // 4 <= FUSED_MAX_GROUP_WIDTH or v == "cublas":
                        self.record(pt, "cell_fwd", f"triton/{v}",
                                    lambda v=v: cell_apply(z, x, xf, p, 4, "triton", triton_cell=v), flops=flops)

    def step(self, pt, dtype):
        B, L, m = pt["B"], (pt["N"] + 1) * pt["D"], 6
        e = torch.finfo(dtype).bits // 8
        byts = B * L * (3 * e + 2 * (m - 1) * e + 2 * e)     # as bench_gpu.anderson_step_bench
        variants = [("reference", anderson_step_ref), ("torch.compile(reference)", self.compiled_fn("step", anderson_step_ref))]
        if self.triton:
            from deqfuse.kernels.anderson import anderson_step_triton
            variants.append(("triton", lambda *a: anderson_step_triton(*a, check=False)))
        if self.cuda_ext:
            variants.append(("cuda", torch.ops.deqfuse.anderson_step))
        for name, fn in variants:
            if fn is not None:
                args = step_args(B, L, m, self.dev, dtype)
                self.record(pt, "step", name, lambda: fn(*args), byts=byts)

    def solves(self, pt, dtype):
        B, D, N, it = pt["B"], pt["D"], pt["N"], self.iters
        slow = B * D * D > SLOW_LIMIT and not self.smoke
        torch.manual_seed(0)
        feats = [torch.randn(B, D, device=self.dev, dtype=dtype) for _ in range(N)]

        # the loss of the training step: a fixed random read-out (|out|^2 would give a zero adjoint:
        # the fused output is a GroupNorm output, whose norm does not depend on its input)
        proj = torch.randn(B, D, device=self.dev, generator=None) / (B * D) ** 0.5

        def layer(backend, graph=False, triton_cell=None):
            return DEQFusion(D, N, backend=backend, f_max_iter=it, b_max_iter=it, f_tol=1e-30, b_tol=1e-30,
                             on_nonconvergence="ignore", solver_kw=dict(m=6, check_every=0), cuda_graph=graph,
                             triton_cell=triton_cell).to(self.dev, dtype)

        def train_step(ly):
            def run():
                ly.zero_grad(set_to_none=True)
                (ly(feats).float() * proj).sum().backward()
            return run

        graphs = self.dev.type == "cuda"
        variants = [("reference", "reference", False, None), ("auto", "auto", False, None)]
        if graphs:
            variants += [("auto+graph", "auto", True, None), ("auto+graph, fused cell", "auto", True, "fused")]
        for name, backend, graph, gemm in variants:
            if name == "reference" and slow:
                for measure in ("solve_fwd", "train_step"):
                    self.record(pt, measure, name, note="skipped: seconds per call at this size")
                continue
            if gemm == "fused" and D // 4 > FUSED_MAX_GROUP_WIDTH:
                continue
            ly = layer(backend, graph, gemm)
            self.record(pt, "train_step", name, train_step(ly), mem=True, slow=slow)
            ly.eval()
            with torch.no_grad():
                self.record(pt, "solve_fwd", name, lambda: ly(feats), slow=slow)
            del ly
        if self.tdq is None:
            return
        for name in ("torchdeq", "torchdeq+compile(cell)"):
            if slow:
                self.record(pt, "train_step", name, note="skipped: seconds per call at this size")
                continue
            ly = layer("reference")
            x = torch.stack(feats, 1)
            xf = fuse_inputs(x, ly.weights, ly.bias)
            fwd = cell_forward if name == "torchdeq" else self.compiled_fn("cell", cell_forward)
            if fwd is None:
                continue
            cell = lambda z, x, xf, fwd=fwd, ly=ly: fwd(z, x, xf, ly.cell.params(), ly.cell.groups)  # noqa: E731
            deq = self.tdq(ift=True, f_solver="anderson", b_solver="anderson", f_max_iter=it, b_max_iter=it,
                           f_tol=1e-30, b_tol=1e-30)

            def tdq_step(cell=cell, deq=deq, ly=ly, x=x, xf=xf):
                ly.zero_grad(set_to_none=True)
                zs, _ = deq(lambda z: cell(z, x, xf), torch.zeros(B, N + 1, D, device=self.dev, dtype=dtype))
                (zs[-1][:, N].float() * proj).sum().backward(retain_graph=True)
            self.record(pt, "train_step", name, tdq_step, mem=True, slow=True)

    # ------------------------------------------------------------------ driver
    def run(self, grid, dtypes, budget_s=0.0):
        t_start = time.time()
        for dname in dtypes:
            for N in grid["N"]:
                for D in grid["D"]:
                    for B in grid["B"]:
                        pt = dict(B=B, D=D, N=N, dtype=dname)
                        if B * N * D > MAX_STATE:
                            continue
                        if budget_s and time.time() - t_start > budget_s:
                            print(f"# time budget ({budget_s:.0f} s) spent: stopping before B={B} D={D} N={N} {dname}")
                            return
                        t0 = time.time()
                        self.cell(pt, DTYPES[dname])
                        self.step(pt, DTYPES[dname])
                        self.solves(pt, DTYPES[dname])
                        if self.dev.type == "cuda":
                            torch.cuda.empty_cache()
                        print(f"# point B={B} D={D} N={N} {dname}: {time.time() - t0:.1f} s", flush=True)
                        self.write()

    def write(self):
        self.res.write_csv(os.path.join(self.out, "sweep.csv"))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="all", choices=["all", *DTYPES])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-torchdeq", action="store_true")
    ap.add_argument("--N", help="comma list: only these N (default: the whole grid)")
    ap.add_argument("--D", help="comma list: only these D")
    ap.add_argument("--B", help="comma list: only these B")
    ap.add_argument("--budget-s", type=float, default=0.0, help="start no new point after this many seconds")
    a = ap.parse_args(argv)
    grid = dict(SMOKE if a.smoke else GRID)
    for k in ("N", "D", "B"):
        if getattr(a, k):
            grid[k] = tuple(int(v) for v in getattr(a, k).split(","))
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    iters = min(a.iters, 2) if a.smoke else a.iters
    print(f"# sweep {name} torch {torch.__version__} {time.strftime('%Y-%m-%d')} iters={iters}", flush=True)
    s = Sweep(a.device, a.out, iters, not a.no_compile, not a.no_torchdeq, a.smoke)
    s.run(grid, list(DTYPES) if a.dtype == "all" else [a.dtype], a.budget_s)
    s.write()
    return s.rows


if __name__ == "__main__":
    main()
