"""The Anderson step (op: anderson_step, contract deqfuse/reference/anderson.py) on every backend -- the
compiled extension (C++ CPU, CUDA), Triton (GPU or CPU interpreter) -- against the reference step,
one step at a time (the map amplifies rounding, so the states are re-synchronised after each step);
bookkeeping (best iterate, step counts, flags, traces) exactly; per-dtype tolerances; errors."""
import pytest
import torch

from deqfuse.reference import anderson_step_ref
from deqfuse.solvers import AndersonState, anderson
from conftest import backend_params, rel_err

KERNELS = [p for p in backend_params() if p.values[0] != "reference"]
# x after one step vs the reference, per (state dtype, history dtype): a few roundings of the state's
# (or the history's) dtype -- measured: fp16 1.3e-4 (C++), bf16 5.5e-4 (C++) and 7.4e-3 (Triton, ~2 ulp)
TIGHT = {(torch.float64, None): 1e-10, (torch.float32, None): 1e-5, (torch.float16, None): 1e-3,
         (torch.bfloat16, None): 1e-2, (torch.float32, torch.bfloat16): 1e-2}
CASES = [  # B, L, m, state dtype, history dtype
    (1, 5, 1, torch.float64, None), (3, 37, 3, torch.float64, None), (37, 20, 5, torch.float32, None),
    (4, 70, 6, torch.float32, torch.bfloat16), (5, 33, 8, torch.float64, None), (3, 300, 4, torch.bfloat16, None),
    # L % 4 == 0 (16-byte path of the CUDA kernel) at every compiled ring size 2/4/6/8, rows longer than a block
    (3, 64, 2, torch.float32, None), (6, 128, 6, torch.float32, None), (4, 1028, 6, torch.float32, None),
    (2, 96, 7, torch.float32, torch.bfloat16), (3, 64, 6, torch.float16, None)]


def tanh_map(B, L, dtype, dev, seed=0, rho=0.9):
    g = torch.Generator().manual_seed(seed)
    A = rho * torch.linalg.qr(torch.randn(L, L, generator=g, dtype=torch.float64))[0]
    b = torch.randn(B, L, generator=g, dtype=torch.float64)
    A, b = A.to(dev, dtype), b.to(dev, dtype)
    return lambda z: torch.tanh(z @ A.T + b)


def step_fn(backend):
    """The kernel step of a backend (the Triton wrapper with its argument checks on, a small block so
    that short rows still take several passes)."""
    if backend == "cuda":
        return torch.ops.deqfuse.anderson_step
    from deqfuse.kernels.anderson import anderson_step_triton
    return lambda *a: anderson_step_triton(*a, block=16)


@pytest.mark.parametrize("backend,dev", KERNELS)
@pytest.mark.parametrize("B,L,m,dtype,hist", CASES)
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_step_sequence_matches_reference(backend, dev, B, L, m, dtype, hist, beta):
    if backend == "triton" and dev == "cpu" and (B > 8 or B * L > 3000 or beta != 1.0 and L > 40):
        pytest.skip("Triton interpreter (~0.1 s per program and step): keep it small")
    f = tanh_map(B, L, dtype, dev)
    x0 = torch.randn(B, L, dtype=torch.float64).to(dev, dtype)
    s_ref, s_k = AndersonState(x0, m, 9, hist), AndersonState(x0, m, 9, hist)
    s_k.X.fill_(float("nan"))  # poison the buffers the kernel must overwrite before reading
    s_k.G.fill_(float("nan"))
    tol = 1e-3 if dtype == torch.float16 else 1e-30
    fn = step_fn(backend)
    for k in range(9):
        fx = f(s_ref.x)
        s_ref.step(anderson_step_ref, fx, k, beta, 1e-4, tol, True)
        s_k.step(fn, fx.clone(), k, beta, 1e-4, tol, True)
        assert rel_err(s_k.x.double(), s_ref.x.double()) < TIGHT[(dtype, hist)], k
        for name in ("x", "X", "G", "GG"):
            getattr(s_k, name).copy_(getattr(s_ref, name))
    for name in ("best_res", "abs_trace", "rel_trace"):
        a, r = getattr(s_k, name), getattr(s_ref, name)
        assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        assert rel_err(torch.nan_to_num(a.double()), torch.nan_to_num(r.double())) < (
            1e-10 if dtype == torch.float64 and hist is None else 1e-3), name
    assert torch.equal(s_k.converged, s_ref.converged) and torch.equal(s_k.nstep, s_ref.nstep)


@pytest.mark.parametrize("backend,dev", KERNELS)
def test_solver_on_each_backend_converges_and_freezes_like_the_reference(backend, dev):
    f = tanh_map(4, 24, torch.float64, dev, rho=0.8)
    x0 = torch.zeros(4, 24, dtype=torch.float64, device=dev)
    z_ref, st_ref = anderson(f, x0, max_iter=60, tol=1e-10, backend="reference")
    z, st = anderson(f, x0, max_iter=60, tol=1e-10, backend=backend)
    assert st.all_converged and torch.equal(st.nstep, st_ref.nstep)
    assert rel_err(z, z_ref) < 1e-8


@pytest.mark.parametrize("backend,dev", backend_params())
def test_nan_residual_never_converges(backend, dev):
    x0 = torch.randn(2, 8, dtype=torch.float64, device=dev)
    st = AndersonState(x0, 3, 1)
    fx = x0.clone()
    fx[1, 0] = float("nan")
    st.step(anderson_step_ref if backend == "reference" else step_fn(backend), fx, 0, 1.0, 1e-4, 1e-3, True)
    assert st.converged.tolist() == [True, False]
    assert torch.isfinite(st.best_x).all()


@pytest.mark.parametrize("backend,dev", KERNELS)
def test_indefinite_gram_rows_take_the_elimination_beside_regular_rows(backend, dev):
    """Samples whose Gram block is indefinite (the Cholesky meets a negative pivot) share the C++ step's group
    of 8 SIMD lanes with regular ones: each gets the reference's step (the elimination fallback for the first,
    the lanes' Cholesky for the others)."""
    B, L, m, k = 11, 6, 3, 2
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, L, generator=g, dtype=torch.float64)
    fx = torch.tanh(x0) + 0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)
    states = [AndersonState(x0.to(dev), m, k + 1) for _ in range(2)]
    X, G = torch.randn(B, m, L, generator=g, dtype=torch.float64), torch.randn(B, m, L, generator=g, dtype=torch.float64)
    GG = G @ G.transpose(1, 2)
    bad = [2, 9]
    GG[bad, 0, 1] = GG[bad, 1, 0] = 3 * (GG[bad, 0, 0] * GG[bad, 1, 1]).sqrt()  # |off-diagonal| > geometric mean
    assert (torch.linalg.eigvalsh(GG[bad, :2, :2]).amin(1) < 0).all()
    for st in states:
        st.X.copy_(X)
        st.G.copy_(G)
        st.GG.copy_(GG)
    states[0].step(anderson_step_ref, fx.to(dev), k, 1.0, 1e-4, 1e-30, True)
    states[1].step(step_fn(backend), fx.to(dev), k, 1.0, 1e-4, 1e-30, True)
    assert torch.isfinite(states[1].x).all()
    assert rel_err(states[1].x[bad].double(), states[0].x[bad].double()) < 1e-10
    assert rel_err(states[1].x.double(), states[0].x.double()) < 1e-10


@pytest.mark.parametrize("backend,dev", KERNELS)
def test_errors_name_the_argument(backend, dev):
    err = RuntimeError if backend == "cuda" else ValueError
    st = AndersonState(torch.randn(2, 8, device=dev), 3, 1)
    with pytest.raises(err, match="fx must have shape"):
        st.step(step_fn(backend), torch.randn(2, 7, device=dev), 0, 1.0, 1e-4, 1e-3, True)
    if backend == "cuda":
        st9 = AndersonState(torch.randn(2, 8, device=dev), 9, 1)
        with pytest.raises(RuntimeError, match=r"m \(X.size\(1\)\) must be in"):
            st9.step(torch.ops.deqfuse.anderson_step, torch.randn(2, 8, device=dev), 0, 1.0, 1e-4, 1e-3, True)
