"""Shared helpers of the tests and benchmarks (like fla's utils/_testing.py): error measures, per-dtype
tolerance tables, deterministic cell parameters and inputs, and the list of backends that can run here.

Tolerances are relative errors (||a - b|| / ||b||) of a kernel against the float64 reference, per dtype
of the kernel's inputs; fp16 and bf16 apart (bf16 has 8 mantissa bits, fp16 11).
"""
import os

import torch

from .reference.cell import CellParams

# kernel output vs the float64 reference, inputs in this dtype (elementwise + reductions + GEMMs)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# float32 with tf32 GEMMs (the Triton cell on a GPU with TF32 on)
TOL_TF32 = 3e-3


def tol(dtype: torch.dtype) -> float:
    return TOL[dtype]


def rel_err(a, b) -> float:
    a, b = a.detach(), b.detach()
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_params(N, D, dtype=torch.float64, device="cpu", w_scale=1.0, gn3_scale=1.0, seed=0) -> CellParams:
    """Random (never zero) cell parameters; small w_scale/gn3_scale make the cell contractive."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    p = CellParams(
        w1=r(N, D, D) * w_scale / D ** 0.5, b1=r(N, D), w2=r(N, D, D) * w_scale / D ** 0.5, b2=r(N, D),
        gn1_w=1 + 0.1 * r(N, D), gn1_b=0.1 * r(N, D), gn2_w=1 + 0.1 * r(N, D), gn2_b=0.1 * r(N, D),
        gn3_w=gn3_scale * (1 + 0.1 * r(N, D)), gn3_b=0.1 * r(N, D),
        wg=r(D, D) * w_scale / D ** 0.5, bg=r(D), wf=r(D, D) * w_scale / D ** 0.5, bf=r(D),
        gnf_w=gn3_scale * (1 + 0.1 * r(D)), gnf_b=0.1 * r(D))
    return CellParams(*(t.to(dtype=dtype, device=device) for t in p))


def make_inputs(B, N, D, dtype=torch.float64, device="cpu", seed=1):
    """(z [B, N+1, D], x [B, N, D], xf [B, D]) of a cell call."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N + 1, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    xf = torch.randn(B, D, generator=g, dtype=torch.float64)
    return z.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device), xf.to(dtype=dtype, device=device)


def contractive_layer(layer, w_scale=0.2, gn3_scale=0.2, seed=0):
    """Make a DEQFusion layer the paper's cell on the raw features (no input normalisation) with contractive
    random parameters (for tests that compare it with the reference cell, or need a solvable cell)."""
    p = make_params(layer.n, layer.dim, torch.float64, w_scale=w_scale, gn3_scale=gn3_scale, seed=seed)
    layer.norms, layer.input_norm = None, False
    with torch.no_grad():
        for name, t in zip(p._fields, p):
            getattr(layer.cell, name).copy_(t)
    return layer


def triton_runs() -> bool:
    """Triton kernels run here: on a GPU, or on the CPU interpreter (TRITON_INTERPRET=1)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def extension_runs(device: str = "cpu") -> bool:
    from .backend import extension_status
    ext = extension_status()[0]
    return ext is not None and (device == "cpu" or (device == "cuda" and torch.cuda.is_available() and ext.has_cuda()))


def backend_params(cpu_ext: bool = True, cuda_ext: bool = True, triton: bool = True):
    """pytest params of the backends to check against the reference, skipped where they cannot run:
    (backend, device) pairs."""
    import pytest
    out = [pytest.param("reference", "cpu", id="reference")]
    if cpu_ext:
        out.append(pytest.param("cuda", "cpu", id="c++-cpu", marks=pytest.mark.skipif(
            not extension_runs("cpu"), reason="compiled extension not built")))
    if cuda_ext:
        out.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(
            not extension_runs("cuda"), reason="needs a GPU and the CUDA build of the extension")))
    if triton:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        out.append(pytest.param("triton", dev, id="triton", marks=[pytest.mark.triton, pytest.mark.skipif(
            not triton_runs(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")]))
    return out
