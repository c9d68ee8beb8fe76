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

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")


@functools.lru_cache(None)
def extension_status():
    """(module or None, reason string)."""
    if os.environ.get("DEQFUSE_NO_EXT"):
        return None, "disabled by DEQFUSE_NO_EXT"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.deqfuse.*)
    except ImportError as e:
        return None, f"extension not built ({e}); reinstall without DEQFUSE_NO_EXT=1"
    from . import ops  # noqa: F401  fake kernels for torch.compile
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


def resolve(backend: str, device: torch.device, op: str = "anderson_step") -> str:
    """Concrete backend for `op` on `device`; raises a clear error if a named backend can't run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    # ops the extension provides, per device type (the cell op is C++ CPU only; on GPUs the Triton cell
    # is the kernel path)
    cuda_ops = {"anderson_step", "routing"} | ({"cell"} if device.type == "cpu" else {"modality_epilogue"})
    triton_ops = {"anderson_step", "cell", "routing"}                # ops with a Triton kernel
    if backend == "cuda" and op not in cuda_ops:
        backend = "auto"  # ops the extension lacks (the cell) take the best other path
    if backend == "auto":
        # routing is a chain of tiny launches: the extension's C++ launches cost less host time than
        # Triton's Python launcher (not yet timed side by side: benchmarks/bench_dynamic.py does)
        ext_first = op == "routing"
        if ext_first and ext_has(device):
            return "cuda"
        if op in triton_ops and device.type == "cuda" and triton_status()[0]:
            return "triton"
        if op in cuda_ops and ext_has(device):
            return "cuda"
        return "reference"
    if backend == "cuda":
        if not ext_has(device):
            raise RuntimeError(f"backend='cuda' unavailable for {device.type} tensors: {extension_status()[1]}")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' unavailable: {why}")
    return backend


COMPILED_MAX_M = 8  # ring slots the compiled steps support (csrc/anderson_common.h kMaxM)


def anderson_step_fn(backend: str, x: torch.Tensor, m: int = 1):
    """The step function (reference.anderson contract) for this backend, x's device and ring size m.
    'auto' falls back past a backend whose limits m exceeds; a backend named explicitly raises."""
    b = resolve(backend, x.device, "anderson_step")
    if b == "cuda" and m > COMPILED_MAX_M:
        if backend == "cuda":
            raise ValueError(f"m={m}: the compiled Anderson step (backend='cuda') supports m <= {COMPILED_MAX_M}; "
                             f"use backend='triton' or 'reference' (or 'auto')")
        b = "triton" if x.is_cuda and triton_status()[0] else "reference"
    if b == "cuda":
        return torch.ops.deqfuse.anderson_step
    if b == "triton":
        from .kernels.anderson import anderson_step_triton
        return functools.partial(anderson_step_triton, check=False)  # the solver owns the buffers, checks fx
    from .reference.anderson import anderson_step_ref
    return anderson_step_ref
