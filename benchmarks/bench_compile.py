"""torch.compile with a dynamic batch against eager: the compile time a user pays once, whether a new
batch size recompiles, and the steady-state time, for the eval forward and for a training step
(encoders + DEQFusion + head, cross-entropy, backward), side by side in one run.

  python benchmarks/bench_compile.py [--backend inductor] [--B 48,100,128] [--D 64] [--N 2] [--threads 2]
                                     [--device cpu|cuda] [--out DIR]

Rows (compile.csv in --out, the schema of deqfuse/benchmarking.py): per mode (eval / train) and batch
size: eager ms, compiled ms, the first-call seconds (compile + run; only the first batch size should
pay it) and the unique graphs dynamo holds after that call (constant = no recompilation). The solves
run a fixed iteration count (tol 1e-30) so eager and compiled do the same work (rows x iterations in
the note). A batch size equal to another dimension of the first call (e.g. B == D or groups) can cost
one extra compile: dynamo's duck sizing ties the two, and the next size releases them. On the CPU,
inductor's C++ code generation also guards the training graph on B <= 64 (its reduction-helper choice,
`need_use_acc_helper`): one more compile when the batch first crosses 64, none after.
"""
import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from deqfuse import DEQFusion
from deqfuse.benchmarking import Results, interleaved


def build(D, N, iters, device):
    torch.manual_seed(0)
    enc = torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(N)).to(device)
    fusion = DEQFusion(D, N, f_tol=1e-30, b_tol=1e-30, f_max_iter=iters, b_max_iter=iters,
                       on_nonconvergence="ignore").to(device)
    head = torch.nn.Linear(D, 10).to(device)

    def forward(feats):
        return head(fusion([e(v) for e, v in zip(enc, feats)]))

    def train_step(feats, y):
        loss = F.cross_entropy(forward(feats), y)
        loss.backward()
        return loss.detach()
    return (enc, fusion, head), forward, train_step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--B", default="48,100,128")  # none equal to D: see the duck-sizing note
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--N", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    from torch._dynamo.utils import counters
    res = Results(a.device)
    mods, forward, train_step = build(a.D, a.N, a.iters, a.device)
    for mode in ("eval", "train"):
        for m in mods:
            m.train(mode == "train")
        torch._dynamo.reset()
        counters.clear()
        eager = train_step if mode == "train" else forward
        compiled = torch.compile(eager, dynamic=True, backend=a.backend)
        for B in (int(b) for b in a.B.split(",")):
            feats = [torch.randn(B, a.D, device=a.device) for _ in range(a.N)]
            y = torch.randint(0, 10, (B,), device=a.device)
            args = (feats, y) if mode == "train" else (feats,)
            ctx = torch.enable_grad() if mode == "train" else torch.no_grad()
            with ctx:
                t0 = time.perf_counter()
                compiled(*args)
                if a.device == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                graphs = counters["stats"]["unique_graphs"]
                ms = interleaved({"eager": lambda: eager(*args), "compiled": lambda: compiled(*args)}, a.reps, a.device)
            shape = dict(B=B, D=a.D, N=a.N, dtype="float32", backend="auto")
            work = f"{B} rows x {a.iters} forward iterations" + (f" + {a.iters} adjoint" if mode == "train" else "")
            res.add(f"compile_{mode}", "eager", "ms", ms["eager"], "ms", note=work, **shape)
            res.add(f"compile_{mode}", f"compiled/{a.backend}", "ms", ms["compiled"], "ms", note=work, **shape)
            res.add(f"compile_{mode}", f"compiled/{a.backend}", "first_call_s", first_s, "s", **shape)
            res.add(f"compile_{mode}", f"compiled/{a.backend}", "unique_graphs", graphs, "", **shape)
    os.makedirs(a.out, exist_ok=True)
    res.write_csv(os.path.join(a.out, "compile.csv"))
    return res


if __name__ == "__main__":
    main()
