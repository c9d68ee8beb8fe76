"""Backend discovery and dispatch: 'auto' | 'triton' | 'cuda' | 'reference'.

'cuda' means the compiled extension deqfuse._C (CUDA kernels, plus C++ CPU ops -- the Anderson step and
the whole fusion cell forward and VJP -- so the compiled path also runs without a GPU). 'auto' picks, per
device, the fastest path measured (benchmarks/RESULTS.md): triton > cuda ext > reference on a GPU (the
Triton step beat the CUDA one for fp32 and bf16 history on an H100); cuda ext (C++ ops) > reference on
the CPU. Triton on the CPU only runs under
TRITON_INTERPRET=1 and is chosen there only when asked for by name.
"""
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ._env import env_flag
from ._validate import check_choice

BACKENDS = ("auto", "triton", "cuda", "reference")
# DEQFUSE_CPU_GEMM: the kernel of the C++ CPU cell ops' float32 GEMMs (csrc/gemm_small.h), read once by the
# extension; unset or 'auto' lets it choose by CPU and D (deqfuse._C.cell_gemm_kernel(D) says which).
CPU_GEMMS = ("", "auto", "avx512", "avx2", "blas")
# DEQFUSE_CPU_ROWS: the vectors of their row passes (csrc/cpu_simd.h: 512-bit on Intel CPUs with AVX-512),
# read once; deqfuse._C.cell_rows_kernel(D, G) says which runs.
CPU_ROWS = ("", "auto", "zmm", "ymm")
# DEQFUSE_SOLVE_LAYOUT: the layout of the whole solves' chunks (csrc/solve_cpu.cpp: feature-major on Intel
# CPUs with AVX-512 where the floats allow it), read per solve; deqfuse._C.cell_solve_layout(D, G) says which runs.
SOLVE_LAYOUTS = ("", "auto", "rows", "fm")


def _positive_int(var: str) -> None:
    v = os.environ.get(var, "")
    if v and not (v.isdigit() and int(v) > 0):
        raise ValueError(f"{var}={v!r} is not a positive integer")


# The DEQFUSE_* variables read at run time -> the values each takes ('' where its reader takes it as unset;
# unset is always fine), or a function that raises ValueError for a value it does not take. DEQFUSE_SOLVE_CHUNK:
# samples per chunk of the C++ whole solves (csrc/solve_cpu.cpp), read per solve; unset: by cache size. Also
# read (env_errors adds them): DEQFUSE_CELL_GEMM (cell.TRITON_CELLS), DEQFUSE_DIST_TIMEOUT (distributed.timeout_s).
ENV_VARS = {"DEQFUSE_NO_EXT": env_flag, "DEQFUSE_CPU_GEMM": CPU_GEMMS, "DEQFUSE_CPU_ROWS": CPU_ROWS,
            "DEQFUSE_SOLVE_LAYOUT": SOLVE_LAYOUTS, "DEQFUSE_SOLVE_CHUNK": _positive_int,
            "DEQFUSE_AUTOTUNE": ("", "0", "1"), "DEQFUSE_NVTX": ("", "0", "1")}


def env_problem(var: str, allowed=None) -> Optional[str]:
    """Why the value of environment variable `var` is not one it takes (None: unset or fine). allowed:
    ENV_VARS[var] by default."""
    allowed = ENV_VARS[var] if allowed is None else allowed
    v = os.environ.get(var)
    if v is None:
        return None
    if callable(allowed):
        try:
            allowed(var)
        except ValueError as e:
            return str(e)
        return None
    return None if v in allowed else f"{var}={v!r} is not one of {tuple(a for a in allowed if a)}"


def env_errors() -> List[str]:
    """One message per DEQFUSE_* variable (ENV_VARS, DEQFUSE_CELL_GEMM, DEQFUSE_DIST_TIMEOUT) set to a value
    it does not take."""
    from .cell import TRITON_CELLS  # (cell imports this module)
    from .distributed import TIMEOUT_ENV, timeout_s
    rules = dict(ENV_VARS, DEQFUSE_CELL_GEMM=TRITON_CELLS, **{TIMEOUT_ENV: lambda var: timeout_s()})
    return [p for p in (env_problem(var, allowed) for var, allowed in rules.items()) if p]


@functools.lru_cache(None)
def extension_status():
    """(module or None, reason string). DEQFUSE_NO_EXT set to a value env_flag does not take: ValueError."""
    if env_flag("DEQFUSE_NO_EXT"):
        return None, "disabled by DEQFUSE_NO_EXT"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.deqfuse.*)
    except ImportError as e:
        return None, f"extension not built ({e}); reinstall without DEQFUSE_NO_EXT=1"
    from . import ops  # noqa: F401  fake kernels for torch.compile
    for var, what in (("DEQFUSE_CPU_GEMM", "GEMM kernel"), ("DEQFUSE_CPU_ROWS", "row passes' vectors"),
                      ("DEQFUSE_SOLVE_LAYOUT", "solves' layout"), ("DEQFUSE_SOLVE_CHUNK", "solves' chunks")):
        why = env_problem(var)
        if why:
            warnings.warn(f"{why}: ignored (the C++ CPU cell ops pick their {what} themselves)", RuntimeWarning,
                          stacklevel=2)
    return _C, "ok (cuda kernels: %s; CPU cell GEMMs: %s)" % ("yes" if _C.has_cuda() else "no, CPU build",
                                                               _C.blas_backend())


@functools.lru_cache(None)
def triton_status():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton not installed ({e})"
    if torch.cuda.is_available():
        return True, "ok (GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok (TRITON_INTERPRET=1, CPU interpreter)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"


@torch.compiler.assume_constant_result  # torch.compile: a constant, not a call into pybind (graph break)
def ext_has(device: torch.device) -> bool:
    ext, _ = extension_status()
    return ext is not None and (device.type == "cpu" or (device.type == "cuda" and ext.has_cuda()))


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: the backend name that selects it, the device types it runs on for
    'auto' (Triton also runs on the CPU interpreter when named explicitly), the input dtypes it takes
    (empty: any), and size limits (name, max, device type or None for every device)."""
    backend: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...] = ()
    limits: Tuple[Tuple[str, int, Optional[str]], ...] = ()


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPILED_MAX_M = 8        # ring slots of the compiled Anderson steps (csrc/anderson_common.h kMaxM)
CUDA_MAX_EXPERTS = 64     # groups of the CUDA counting sort (csrc/cuda/routing_kernel.cuh kMaxExperts)

# Per op, the implementations in 'auto' preference order (fastest measured first, benchmarks/RESULTS.md).
# The compiled extension ('cuda') has: the Anderson step (CPU and CUDA), the cell (C++ CPU only), routing
# (CPU and CUDA; C++ launches cost less host time than Triton's launcher, so it leads for routing).
REGISTRY: Dict[str, Tuple[Impl, ...]] = {
    "anderson_step": (Impl("triton", ("cuda",)),
                      Impl("cuda", ("cpu", "cuda"), _FLOATS, (("m", COMPILED_MAX_M, None),)),
                      Impl("reference", ("cpu", "cuda"))),
    "cell": (Impl("triton", ("cuda",), _FLOATS),
             Impl("cuda", ("cpu",), (torch.float32, torch.float64)),
             Impl("reference", ("cpu", "cuda"))),
    "routing": (Impl("cuda", ("cpu", "cuda"), (), (("experts", CUDA_MAX_EXPERTS, "cuda"),)),
                Impl("triton", ("cuda",)),
                Impl("reference", ("cpu", "cuda"))),
}


def _unfit(impl: Impl, device: torch.device, dtype, sizes: dict) -> Optional[str]:
    """Why impl cannot take these inputs (None if it can)."""
    if dtype is not None and impl.dtypes and dtype not in impl.dtypes:
        return f"dtype {dtype} (it takes {', '.join(str(d).replace('torch.', '') for d in impl.dtypes)})"
    for name, hi, dev in impl.limits:
        if (dev is None or dev == device.type) and sizes.get(name) is not None and sizes[name] > hi:
            return f"{name}={sizes[name]} (it supports {name} <= {hi}{' on ' + dev if dev else ''})"
    return None


def select(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None, **sizes) -> str:
    """The backend that runs `op` for inputs on `device` of `dtype` and these sizes (e.g. m=, experts=).
    'auto': the first implementation (REGISTRY order) that is available and takes the inputs. A backend
    named explicitly: that one, or a clear error if it is unavailable here or cannot take the inputs --
    the same whether or not the extension is built. 'cuda' for an op the extension does not have on this
    device (the cell on a GPU) means 'auto' for that op."""
    check_choice("backend", backend, BACKENDS)
    impls = REGISTRY[op]
    if backend == "cuda" and not any(i.backend == "cuda" and device.type in i.devices for i in impls):
        backend = "auto"
    if backend == "auto":
        for impl in impls:
            if device.type not in impl.devices or _unfit(impl, device, dtype, sizes) is not None:
                continue
            if impl.backend == "cuda" and not ext_has(device):
                continue
            if impl.backend == "triton" and not triton_status()[0]:
                continue
            return impl.backend
        return "reference"
    impl = next(i for i in impls if i.backend == backend)
    if backend == "cuda" and not ext_has(device):
        raise RuntimeError(f"backend='cuda' unavailable for {device.type} tensors: {extension_status()[1]}")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' unavailable: {why}")
    why = _unfit(impl, device, dtype, sizes)
    if why is not None:
        raise ValueError(f"{op}: backend={backend!r} cannot take {why}; use backend='auto' or another backend")
    return backend


def resolve(backend: str, device: torch.device, op: str = "anderson_step") -> str:
    """select() without dtype or sizes (the backend an op would take on this device)."""
    return select(op, backend, device)


def compiled_anderson_step():
    """The compiled Anderson step op (None without the extension)."""
    return torch.ops.deqfuse.anderson_step if extension_status()[0] is not None else None


def anderson_step_fn(backend: str, x: torch.Tensor, m: int = 1):
    """The step function (reference.anderson contract) for this backend, x's device and ring size m.
    'auto' falls back past a backend whose limits m exceeds; a backend named explicitly raises."""
    return anderson_step_fn_for(backend, x.device, m)


def anderson_step_fn_for(backend: str, device: torch.device, m: int = 1):
    """anderson_step_fn for tensors on `device` (the choice depends on nothing else)."""
    b = resolve(backend, device, "anderson_step")
    if b == "cuda" and m > COMPILED_MAX_M:
        if backend == "cuda":
            raise ValueError(f"m={m}: the compiled Anderson step (backend='cuda') supports m <= {COMPILED_MAX_M}; "
                             f"use backend='triton' or 'reference' (or 'auto')")
        b = "triton" if device.type == "cuda" and triton_status()[0] else "reference"
    if b == "cuda":
        return torch.ops.deqfuse.anderson_step
    if b == "triton":
        from .kernels.anderson import anderson_step_triton
        return functools.partial(anderson_step_triton, check=False)  # the solver owns the buffers, checks fx
    from .reference.anderson import anderson_step_ref
    return anderson_step_ref
