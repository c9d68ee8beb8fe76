"""Backend discovery and dispatch: 'auto' | 'triton' | 'cuda' | 'reference'.

'cuda' means the compiled extension deqfuse._C (CUDA kernels, plus C++ CPU ops -- the Anderson step and
the whole fusion cell forward and VJP -- so the compiled path also runs without a GPU). 'auto' picks, per
device, the fastest path measured (benchmarks/RESULTS.md): triton > cuda ext > reference on a GPU (the
Triton step beat the CUDA one for fp32 and bf16 history on an H100); cuda ext (C++ ops) > reference on
the CPU. Triton on the CPU only runs under
TRITON_INTERPRET=1 and is chosen there only when asked for by name.
"""
import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ._env import env_flag, sources_sha
from ._validate import check_choice, check_int

BACKENDS = ("auto", "triton", "cuda", "reference")
# Environment variables no longer read -> what replaced them (a warning says so when one is set).
RETIRED_ENV = {"DEQFUSE_CPU_GEMM": "deqfuse.force_cpu_plan(gemm=...)",
               "DEQFUSE_CPU_ROWS": "deqfuse.force_cpu_plan(rows=...)",
               "DEQFUSE_SOLVE_LAYOUT": "deqfuse.force_cpu_plan(layout=...)",
               "DEQFUSE_SOLVE_CHUNK": "deqfuse.force_cpu_plan(chunk=...)",
               "DEQFUSE_CELL_GEMM": "the triton_cell argument of DEQFusion / FusionCell",
               "DEQFUSE_AUTOTUNE": "deqfuse.set_triton_autotune(...)",
               "DEQFUSE_DIST_TIMEOUT": "the --dist-timeout option of `python -m deqfuse train` / `eval` "
                                       "(deqfuse.distributed.set_timeout in a script)"}


# The DEQFUSE_* variables read at run time -> the values each takes ('' where its reader takes it as unset;
# unset is always fine), or a function that raises ValueError for a value it does not take.
ENV_VARS = {"DEQFUSE_NO_EXT": env_flag, "DEQFUSE_NVTX": ("", "0", "1")}


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
    """One message per DEQFUSE_* variable (ENV_VARS) set to a value it does not take."""
    return [p for p in (env_problem(var, allowed) for var, allowed in ENV_VARS.items()) if p]


@functools.lru_cache(None)
def extension_status():
    """(module or None, reason string). DEQFUSE_NO_EXT set to a value env_flag does not take: ValueError."""
    if env_flag("DEQFUSE_NO_EXT"):
        return None, "disabled by DEQFUSE_NO_EXT"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.deqfuse.*)
    except ImportError as e:
        return None, f"extension not built ({e}); reinstall without DEQFUSE_NO_EXT=1"
    checkout = sources_sha(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    built = getattr(_C, "sources_sha", lambda: "unknown")()
    if checkout is not None and built != checkout:  # a checkout whose csrc/ changed since the build (git pull)
        why = ("stale: deqfuse._C was built from other csrc/ sources than this checkout's; rebuild it with "
               "`pip install --no-build-isolation -e .` (until then every op runs on the reference path)")
        warnings.warn(f"deqfuse: the compiled extension is {why}", RuntimeWarning, stacklevel=2)
        return None, why
    from . import ops  # noqa: F401  fake kernels for torch.compile
    for var, instead in RETIRED_ENV.items():
        if var in os.environ:  # attributed to the environment, not to a line of deqfuse's
            warnings.warn_explicit(f"{var} is no longer read: use {instead}", RuntimeWarning, "<environment>", 0,
                                   module="deqfuse")
    return _C, "ok (cuda kernels: %s; BLAS: %s)" % ("yes" if _C.has_cuda() else "no, CPU build", _C.blas_backend())


def cpu_plan(dim: int, groups: int = 4, dtype: torch.dtype = torch.float32, batch: int = 0) -> str:
    """The C++ CPU kernel plan that the cell ops and whole solves of width `dim` in `groups` GroupNorm groups
    run in `dtype` on this CPU for `batch` samples (0: a large batch) with torch's current thread count and
    what force_cpu_plan forces now, e.g. 'gemm=avx512 rows=ymm layout=fm' (fm: feature-major, samples in SIMD
    lanes, where each solve thread gets 16 samples; docs/ARCHITECTURE.md lists every choice). A compiled
    whole solve's SolverStats.plan is 'C++ whole solve: ' + this. The C++ ops take float32 and float64; other
    dtypes run the reference path (SolverStats.plan 'per-iteration loop'). Needs the compiled extension."""
    ext, why = extension_status()
    if ext is None:
        raise RuntimeError(f"cpu_plan: the compiled extension is not available: {why}")
    check_int("dim", dim, 1)
    check_int("groups", groups, 1)
    check_int("batch", batch, 0)
    if dim % groups:
        raise ValueError(f"groups ({groups}) must divide dim ({dim})")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (the C++ CPU ops' dtypes), got {dtype}; "
                         f"other dtypes run the reference path, with no kernel plan")
    return ext.cell_plan(dim, groups, dtype == torch.float64, batch)


def cpu_plan_choices() -> dict:
    """Each part of the C++ CPU kernel plan that force_cpu_plan can force -> the names it takes ('auto': the
    plan's own choice): gemm, the kernel of the cell's float32 GEMMs; rows, the instruction set of its row
    passes; layout, the whole solves' chunk layout. The list is the extension's (csrc/cpu/plan.h)."""
    ext, why = extension_status()
    if ext is None:
        raise RuntimeError(f"cpu_plan_choices: the compiled extension is not available: {why}")
    return {part: ("auto", *names) for part, names in ext.cpu_plan_choices().items()}


@contextlib.contextmanager
def force_cpu_plan(*, gemm: str = "auto", rows: str = "auto", layout: str = "auto", chunk: int = 0):
    """Inside the block, the C++ CPU ops run with these parts of their kernel plan forced (tests, benchmarks):
    gemm 'avx512' | 'avx2' | 'blas' (the float32 GEMM kernel), rows 'zmm' | 'ymm' | 'base' (the row passes
    compiled for x86-64-v4's 512-bit vectors, x86-64-v3's 256-bit ones, or the build's baseline),
    layout 'rows' | 'fm' (the whole solves' chunk layout), chunk (samples per chunk of a whole solve; 0: by cache
    size); 'auto' leaves a part to the plan. A choice the CPU or the shape does not allow falls back to the plan's
    own (cpu_plan says what runs). Process-wide, like torch.backends flags: every thread sees it; the previous
    setting comes back on exit. Blocks do not combine: inside an outer force_cpu_plan, a part an inner one leaves
    'auto' is the plan's own again. Every plan gives the reference's values within the dtype's tolerance; within
    one plan, results are bit for bit the same across threads, chunk sizes and compaction."""
    ext, why = extension_status()
    if ext is None:
        raise RuntimeError(f"force_cpu_plan: the compiled extension is not available: {why}")
    choices = cpu_plan_choices()
    for name, v in (("gemm", gemm), ("rows", rows), ("layout", layout)):
        check_choice(name, v, choices[name])
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk must be an int >= 0 (0: by cache size), got {chunk!r}")
    before = ext.get_cpu_plan()
    ext.set_cpu_plan(gemm, rows, layout, chunk)
    try:
        yield
    finally:
        ext.set_cpu_plan(**before)


def set_triton_autotune(enabled: bool) -> bool:
    """Whether the fused Triton cell kernels (triton_cell='fused') tune their tile config per shape on a GPU
    (True, the default) or run one fixed config (False: e.g. a test suite of many tiny shapes, each of which
    would be tuned). Process-wide; returns the previous setting."""
    global _TRITON_AUTOTUNE
    check_choice("enabled", enabled, (True, False))
    before, _TRITON_AUTOTUNE = _TRITON_AUTOTUNE, bool(enabled)
    return before


def triton_autotune() -> bool:
    """The setting of set_triton_autotune."""
    return _TRITON_AUTOTUNE


_TRITON_AUTOTUNE = True


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
# (CPU and CUDA; C++ launches cost less host time than Triton's launcher, so it leads for routing), the whole
# Anderson solve (C++ CPU only).
REGISTRY: Dict[str, Tuple[Impl, ...]] = {
    "anderson_step": (Impl("triton", ("cuda",)),
                      Impl("cuda", ("cpu", "cuda"), _FLOATS, (("m", COMPILED_MAX_M, None),)),
                      Impl("reference", ("cpu", "cuda"))),
    "cell": (Impl("triton", ("cuda",), _FLOATS),
             Impl("cuda", ("cpu",), (torch.float32, torch.float64)),
             Impl("reference", ("cpu", "cuda"))),
    # A whole Anderson solve in one call, for maps that have one (rowwise.WholeSolve: the C++ cell and its
    # adjoint, csrc/solve_cpu.cpp); 'reference' is the per-iteration loop (solvers.run).
    "anderson_solve": (Impl("cuda", ("cpu",), (torch.float32, torch.float64), (("m", COMPILED_MAX_M, None),)),
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
