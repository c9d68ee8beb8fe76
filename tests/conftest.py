import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU interpreter (must be set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deqfuse.reference.cell import CellParams


def pytest_configure(config):
    # fixed kernel configs in tests: autotuning each of dozens of tiny shapes would dominate a GPU run
    # (a hook, not module code: the benchmarks import this module for make_params and must autotune)
    os.environ.setdefault("DEQFUSE_AUTOTUNE", "0")


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_params(N, D, dtype=torch.float64, device="cpu", w_scale=1.0, gn3_scale=1.0, seed=0):
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
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N + 1, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    xf = torch.randn(B, D, generator=g, dtype=torch.float64)
    return z.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device), xf.to(dtype=dtype, device=device)


def contractive_layer(layer, w_scale=0.2, gn3_scale=0.2, seed=0):
    """Load contractive random parameters into a DEQFusion layer (for tests that need a solvable cell)."""
    p = make_params(layer.n, layer.dim, torch.float64, w_scale=w_scale, gn3_scale=gn3_scale, seed=seed)
    with torch.no_grad():
        for name, t in zip(p._fields, p):
            getattr(layer.cell, name).copy_(t)
    return layer


needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
