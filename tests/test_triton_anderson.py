"""Triton Anderson step against the reference step (TRITON_INTERPRET=1 on the CPU)."""
import pytest
import torch

from deqfuse.reference import anderson_step_ref
from deqfuse.solvers import AndersonState, anderson
from conftest import needs_triton, rel_err

pytestmark = [pytest.mark.triton, needs_triton]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def problem(B, L, dtype, seed=0, rho=0.9):
    g = torch.Generator().manual_seed(seed)
    A = rho * torch.linalg.qr(torch.randn(L, L, generator=g, dtype=torch.float64))[0]
    b = torch.randn(B, L, generator=g, dtype=torch.float64)
    A, b = A.to(DEV, dtype), b.to(DEV, dtype)
    return lambda z: torch.tanh(z @ A.T + b)


@pytest.mark.parametrize("B,L,m,dtype,hist", [
    (1, 5, 1, torch.float64, None), (3, 37, 3, torch.float64, None), (37, 20, 5, torch.float32, None),
    (4, 70, 6, torch.float32, torch.bfloat16), (5, 33, 4, torch.float16, None)])
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_step_sequence_matches_reference(B, L, m, dtype, hist, beta):
    from deqfuse.kernels.anderson import anderson_step_triton
    f = problem(B, L, dtype)
    x0 = torch.randn(B, L, dtype=torch.float64).to(DEV, dtype)
    s_ref, s_tri = AndersonState(x0, m, 9, hist), AndersonState(x0, m, 9, hist)
    for st in (s_tri,):  # poison buffers the kernel must overwrite before reading
        st.X.fill_(float("nan"))
        st.G.fill_(float("nan"))
    tol = 1e-3 if dtype == torch.float16 else 1e-30
    for k in range(9):
        fx = f(s_ref.x)
        s_ref.step(anderson_step_ref, fx, k, beta, 1e-4, tol, True)
        s_tri.step(lambda *a: anderson_step_triton(*a, block=16), fx.clone(), k, beta, 1e-4, tol, True)
        tight = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 and hist is None else 1e-2)
        assert rel_err(s_tri.x.double(), s_ref.x.double()) < tight, k
        s_tri.x.copy_(s_ref.x)  # compare one step at a time (the map amplifies rounding differences)
        s_tri.X.copy_(s_ref.X)
        s_tri.G.copy_(s_ref.G)
        s_tri.GG.copy_(s_ref.GG)
    for name in ("best_res", "abs_trace", "rel_trace"):
        a, r = getattr(s_tri, name), getattr(s_ref, name)
        assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        assert rel_err(torch.nan_to_num(a.double()), torch.nan_to_num(r.double())) < 1e-3, name
    assert torch.equal(s_tri.converged, s_ref.converged)
    assert torch.equal(s_tri.nstep, s_ref.nstep)


def test_solver_with_triton_backend_converges_and_freezes():
    f = problem(6, 24, torch.float64, rho=0.95)
    z_ref, st_ref = anderson(f, torch.zeros(6, 24, dtype=torch.float64, device=DEV), max_iter=60, tol=1e-10,
                             backend="reference")
    z, st = anderson(f, torch.zeros(6, 24, dtype=torch.float64, device=DEV), max_iter=60, tol=1e-10,
                     backend="triton")
    assert st.all_converged and torch.equal(st.nstep, st_ref.nstep)
    assert rel_err(z, z_ref) < 1e-8


def test_bad_shapes_raise():
    from deqfuse.kernels.anderson import anderson_step_triton
    st = AndersonState(torch.randn(2, 8, device=DEV), 3, 2)
    with pytest.raises(ValueError, match="fx must have shape"):
        st.step(anderson_step_triton, torch.randn(2, 7, device=DEV), 0, 1.0, 1e-4, 1e-4, True)
