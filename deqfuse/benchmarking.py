"""The one timer and the one results schema of every benchmark (deqfuse bench, benchmarks/*.py).

Timer: `time_ms(fn, device)` -- median milliseconds of fn(): triton.testing.do_bench on a CUDA device
(warm-up and repetition budgets in ms, the GPU synchronised around the timed region), a perf_counter loop
on the CPU. `interleaved({name: fn})` times several variants round-robin, one call of each per round, so
that a noisy machine shifts them alike (use it for side-by-side ratios on shared CPUs).

Schema (long format, one row per measured number; RESULTS_FIELDS): op, variant, backend, dtype, B, D,
N, metric, value, unit, device, date, git_rev, note. `Results` collects rows, echoes them, and writes a
CSV; `read_results(path)` reads one back (report and plot scripts).
"""
import csv
import datetime
import os
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS_FIELDS = ("op", "variant", "backend", "dtype", "B", "D", "N", "metric", "value", "unit", "device",
                  "date", "git_rev", "note")


def time_ms(fn: Callable, device=None, reps: int = 20, warmup: int = 2, warmup_ms: float = 10,
            rep_ms: float = 50) -> float:
    """Median ms of fn(). CUDA: do_bench(warmup_ms, rep_ms); CPU: `warmup` calls then `reps` timed ones."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def interleaved(fns: Dict[str, Callable], reps: int, device=None, warmup: int = 1) -> Dict[str, float]:
    """Median ms of each fn, timed round-robin (one call of each per round)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in ts.items()}


def git_revision(path: Optional[str] = None) -> str:
    """Short git revision of the checkout (+'-dirty' with uncommitted changes), or 'unknown'."""
    root = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device=None) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


class Results:
    """Rows of one benchmark run in the long format; device, date and git revision filled in once."""

    def __init__(self, device=None, echo: bool = True):
        self.meta = dict(device=device_name(device), date=datetime.date.today().isoformat(), git_rev=git_revision())
        self.rows: List[dict] = []
        self.echo = echo

    def add(self, op: str, variant: str, metric: str, value, unit: str = "", **fields) -> dict:
        """One number. fields: backend, dtype, B, D, N, note (anything else is folded into note)."""
        extra = {k: v for k, v in fields.items() if k not in RESULTS_FIELDS}
        row = {k: "" for k in RESULTS_FIELDS}
        row.update(self.meta, op=op, variant=variant, metric=metric, unit=unit,
                   value=round(value, 6) if isinstance(value, float) else value,
                   **{k: v for k, v in fields.items() if k in RESULTS_FIELDS})
        if isinstance(row["dtype"], torch.dtype):
            row["dtype"] = str(row["dtype"]).replace("torch.", "")
        if extra:
            row["note"] = "; ".join(filter(None, [str(row["note"]), *(f"{k}={v}" for k, v in extra.items())]))
        self.rows.append(row)
        if self.echo:
            shape = " ".join(f"{k}={row[k]}" for k in ("B", "D", "N") if row[k] != "")
            val = f"{row['value']:.4g}" if isinstance(row["value"], (int, float)) else str(row["value"])
            print(f"  {op:<16} {shape:<22} {row['dtype']:<9} {variant:<34} {metric:<10} {val:>10} {unit:<5} "
                  f"{row['note']}", flush=True)
        return row

    def value(self, op: str, variant: str, metric: str = "ms", **match):
        """The value of a row added before (None if absent)."""
        for r in reversed(self.rows):
            if r["op"] == op and r["variant"] == variant and r["metric"] == metric and \
                    all(str(r[k]) == str(v) for k, v in match.items()):
                return r["value"]
        return None

    def write_csv(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=RESULTS_FIELDS)
            w.writeheader()
            w.writerows(self.rows)


def read_results(path: str) -> List[dict]:
    """Rows of a results CSV, numbers parsed (value, B, D, N where set)."""
    rows = []
    for r in csv.DictReader(open(path)):
        for k in ("B", "D", "N"):
            r[k] = int(r[k]) if r.get(k) not in (None, "") else None
        try:
            r["value"] = float(r["value"])
        except (TypeError, ValueError):
            pass
        rows.append(r)
    return rows
