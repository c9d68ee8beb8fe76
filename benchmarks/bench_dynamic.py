"""DynMM inference saving: wall time of routed inference vs running every expert, as a ratio to the
MAC saving (target >= 0.8). Measured side by side in one run, on the CPU and (if present) the GPU.

  python benchmarks/bench_dynamic.py [--B 1024[,8192...]] [--device cpu|cuda|all]
On a GPU it also counts the kernels each variant launches (torch.profiler): at B=1024 the experts take
~0.1 ms there, so the routing's launches and its one host sync decide the ratio.
"""
import argparse
import os

import torch

from deqfuse import ConcatGate, DynamicFusion, MLPHead, SubsetExpert
from deqfuse.benchmarking import Results, time_ms

DIMS = [256, 512, 128]


def build(device, dtype=torch.float32):
    torch.manual_seed(0)
    experts = [SubsetExpert([0], MLPHead(256, 256, hidden=256)),                  # cheap unimodal
               SubsetExpert([0, 1], MLPHead(768, 256, hidden=1024)),              # medium
               SubsetExpert([0, 1, 2], MLPHead(896, 256, hidden=4096))]           # full fusion
    m = DynamicFusion(experts, ConcatGate(DIMS, len(experts))).to(device, dtype).eval()
    with torch.no_grad():  # a gate that sends ~60% / 25% / 15% of the samples to experts 0 / 1 / 2
        m.gate.net[-1].weight.mul_(0.0)
        m.gate.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
    return m


def timeit(fn, device, reps):
    return time_ms(fn, device, reps=reps, warmup=3, warmup_ms=25, rep_ms=200)


def count_launches(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def run(device, B, reps=15):
    m = build(device)
    feats = [torch.randn(B, d, device=device) for d in DIMS]
    choice = torch.multinomial(torch.tensor([0.6, 0.25, 0.15]), B, replacement=True,
                               generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        m.measure_costs(feats)

        def routed():
            return m.route(feats, choice)

        def run_all():
            outs = torch.stack([e([feats[i] for i in e.modalities]) for e in m.experts], 1)
            return outs[torch.arange(B, device=device), choice]
        torch.testing.assert_close(routed()[0], run_all(), rtol=1e-4, atol=1e-4)
        t_routed = timeit(routed, device, reps)
        t_all = timeit(run_all, device, reps)
        backends = ["reference", "cuda"] + (["triton"] if device == "cuda" else [])
        by_backend = {}
        for b in backends:  # the same routing through each implementation of its three primitives
            m.backend = b
            try:
                by_backend[b] = timeit(routed, device, reps)
            except RuntimeError as e:  # e.g. the extension is not built
                print(f"{device:<5} B={B} routing backend={b} unavailable: {e}")
        m.backend = "auto"
        print(f"{device:<5} B={B} routed, by routing backend: "
              + "  ".join(f"{b} {t:.3f} ms" for b, t in by_backend.items()))
        counts = torch.bincount(choice, minlength=3).tolist()
        launches = {k: count_launches(f) for k, f in (("all", run_all), ("routed", routed))} if device == "cuda" else {}
    costs = list(m.costs)
    mac_saving = 1 - sum(c * k for c, k in zip(costs, counts)) / (B * sum(costs))
    time_saving = 1 - t_routed / t_all
    print(f"{device:<5} B={B} counts={counts} all-experts {t_all:8.3f} ms  routed {t_routed:8.3f} ms  "
          f"MAC saving {100 * mac_saving:5.1f}%  time saving {100 * time_saving:5.1f}%  "
          f"ratio {time_saving / mac_saving:.2f}" + (f"  kernels all/routed {launches['all']}/{launches['routed']}" if launches else ""))
    res = RESULTS.setdefault(device, Results(device, echo=False))
    for variant, ms in [("run every expert", t_all), ("routed (auto)", t_routed)] + [
            (f"routed (routing backend {b})", t) for b, t in by_backend.items()]:
        res.add("dynmm_inference", variant, "ms", ms, "ms", B=B, dtype=torch.float32)
    res.add("dynmm_inference", "routed (auto)", "mac_saving", mac_saving, "", B=B)
    res.add("dynmm_inference", "routed (auto)", "time_saving_over_mac_saving", time_saving / mac_saving, "", B=B)
    return dict(device=device, B=B, t_all_ms=t_all, t_routed_ms=t_routed, mac_saving=mac_saving,
                time_saving=time_saving, ratio=time_saving / mac_saving)


RESULTS = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", default="1024")
    ap.add_argument("--device", default="all")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args()
    devs = ["cpu", "cuda"] if a.device == "all" else [a.device]
    for d in devs:
        if d == "cuda" and not torch.cuda.is_available():
            continue
        for B in map(int, a.B.split(",")):
            run(d, B)
        RESULTS[d].write_csv(os.path.join(a.out, f"dynamic_{d}.csv"))


if __name__ == "__main__":
    main()
