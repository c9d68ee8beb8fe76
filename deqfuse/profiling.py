"""NVTX ranges for profilers (Nsight Systems): where a training step's time goes.

Ranges (all named "deqfuse/<what>"; in the `deqfuse` NVTX domain when the `nvtx` package is installed,
`pip install deqfuse[profile]`, else through torch.cuda.nvtx in the default domain):
    forward_solve, attach_grad, adjoint_solve     DEQFusion forward / backward phases
    solve_iters                                   each chunk of solver iterations between convergence checks
    cell_forward[<path>], cell_vjp[ext] / cell_vjp, anderson_step   each kernel launch (or ATen sequence) of a step
    route, expert[<e>], unroute                   DynamicFusion's routed inference (group + gather,
                                                  each expert on its rows, scatter back)

Cost contract: off unless a profiler is attached (NVTX_INJECTION64_PATH is set, as nsys does) or
DEQFUSE_NVTX=1; DEQFUSE_NVTX=0 forces off. Off, `range()` returns a shared null context and `wrap()`
returns the function itself, so nothing is added per iteration. Never active while torch.compile traces
(ranges would break the graph). Under CUDA-graph replay the captured launches show no per-step ranges
(the host does not run them); the replay shows as one forward_solve / adjoint_solve range.
"""
import contextlib
import functools
import os
import warnings
from typing import Callable, Optional

import torch

_NULL = contextlib.nullcontext()


def _backend() -> Optional[Callable[[str], object]]:
    """name -> context manager, or None where no NVTX implementation is usable."""
    try:
        import nvtx  # optional: pip install deqfuse[profile]
        return lambda name: nvtx.annotate(name, domain="deqfuse")
    except ImportError:
        pass
    if torch.cuda.is_available():
        return lambda name: torch.cuda.nvtx.range(name)
    return None


def _default_on() -> bool:
    """DEQFUSE_NVTX=1 / 0, else on under an NVTX-injecting profiler. A value it does not take leaves the ranges
    off with a warning (importing deqfuse does not fail on it); `python -m deqfuse` reports it as a usage error
    before anything runs (backend.env_errors)."""
    flag = os.environ.get("DEQFUSE_NVTX", "")
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        warnings.warn_explicit(f"DEQFUSE_NVTX must be 0 or 1 (or unset), got {flag!r}: NVTX ranges stay off",
                               RuntimeWarning, "<environment>", 0, module="deqfuse")
        return False
    return bool(os.environ.get("NVTX_INJECTION64_PATH"))


_impl = _backend()
_on = _default_on() and _impl is not None


def enabled() -> bool:
    return _on


def set_enabled(on: bool, impl: Optional[Callable[[str], object]] = None) -> None:
    """Turn the ranges on or off at run time; impl replaces the NVTX implementation (name -> context
    manager; tests record the ranges this way). Turning on with no NVTX implementation raises."""
    global _on, _impl
    if impl is not None:
        _impl = impl
    if on and _impl is None:
        raise RuntimeError("no NVTX implementation: pip install nvtx (or deqfuse[profile]), or run on a CUDA build")
    _on = bool(on)


def range(name: str):  # noqa: A001  (the NVTX term)
    """A context manager: an NVTX range "deqfuse/<name>" when profiling is on, else a no-op."""
    if not _on or torch.compiler.is_compiling():
        return _NULL
    return _impl("deqfuse/" + name)


def wrap(fn: Callable, name: str) -> Callable:
    """fn with every call inside range(name) when profiling is on now; fn itself when off (call sites
    wrap when they bind a kernel for a solve, so the check costs nothing per iteration)."""
    if not _on:
        return fn

    @functools.wraps(fn)
    def ranged(*args, **kw):
        with range(name):
            return fn(*args, **kw)
    return ranged
