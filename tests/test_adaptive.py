"""Adaptive compute: early exit and active-set compaction give, per sample, exactly the fixed-shape
solve's answer (iterate, residual, step count, flag, trace) while evaluating far fewer rows."""
import pytest
import torch

from deqfuse import DEQFusion, anderson, broyden, fixed_point, solvers
from deqfuse.graphs import GraphedSolves
from deqfuse.implicit import adjoint_solver
from deqfuse.reference.cell import fuse_inputs
from deqfuse.rowwise import RowwiseFn
from deqfuse.solvers import DEFAULT_COMPACT, solve
from conftest import contractive_layer, needs_triton, rel_err

SOLVERS = {"anderson": anderson, "broyden": broyden, "fixed_point": fixed_point}
# tolerance of "same answer" per state dtype: f on a sub-batch may round differently in the last bit
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
FIXED = dict(check_every=0, compact=0)


def spread_problem(B=37, L=12, dtype=torch.float64, seed=0, rho_lo=0.1, rho_hi=0.9):
    """Row-wise f(z) = rho_b * tanh(z A^T) + c_b: sample b contracts at rate ~rho_b, so the samples
    need very different numbers of steps (the per-sample spread adaptive compute is for)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, L, generator=g, dtype=torch.float64)
    A = (A / torch.linalg.matrix_norm(A, 2)).to(dtype)
    rho = torch.linspace(rho_lo, rho_hi, B, dtype=torch.float64)[torch.randperm(B, generator=g)].to(dtype)
    c = torch.randn(B, L, generator=g, dtype=torch.float64).to(dtype)
    return RowwiseFn(lambda z, rho, c: rho[:, None] * torch.tanh(z @ A.T) + c, rho, c)


def solver_kw(name, backend):
    kw = dict(max_iter=80, tol=1e-9, stop_mode="abs")
    if name == "anderson":
        kw["backend"] = backend
    if name == "fixed_point":
        kw["max_iter"] = 150
    return kw


def assert_same_per_sample(z, st, z_ref, st_ref, tol):
    """Per sample: flags and step counts equal, iterates within tol (relative), residuals and traces
    within tol of the iterate's scale (a residual |f(z) - z| of a converged sample is a difference of
    two O(|z|) numbers: its own relative error is ~eps |z| / residual, whoever computes it)."""
    assert torch.equal(st.converged, st_ref.converged)
    assert torch.equal(st.nstep, st_ref.nstep)
    assert rel_err(z, z_ref) < tol
    assert (z - z_ref).abs().max() <= tol * z_ref.abs().max()
    scale = {"abs": float(z_ref.norm(dim=1).max()) + 1.0, "rel": 1.0}
    close = lambda a, r, s: torch.allclose(a, r, rtol=tol, atol=tol * s, equal_nan=True)  # noqa: E731
    assert close(st.best_res, st_ref.best_res, scale[st.stop_mode])
    T = st.steps
    for name, s in (("abs_trace", scale["abs"]), ("rel_trace", scale["rel"])):
        a, r = getattr(st, name), getattr(st_ref, name)
        assert torch.equal(torch.isnan(a), torch.isnan(r[:T])), name
        assert close(a, r[:T], s), name
        assert torch.isnan(r[T:]).all(), name  # the fixed solve did nothing more after everyone froze


CASES = [(name, backend, B) for name in SOLVERS for backend in ("reference", "cuda") for B in (1, 7, 37)
         if name == "anderson" or backend == "reference"]
# Triton under the CPU interpreter costs ~0.1 s per step at B=7: one batch size, two schedules
CASES += [pytest.param("anderson", "triton", 7, marks=needs_triton)]


@pytest.mark.parametrize("name,backend,B", CASES)
def test_compacted_solve_equals_fixed_shape_solve(name, backend, B, monkeypatch):
    monkeypatch.setattr(solvers, "COMPACT_COST", 0.0)  # compact whenever the fraction says so
    f = spread_problem(B)
    x0 = torch.zeros(B, 12, dtype=torch.float64)
    kw = solver_kw(name, backend)
    if backend == "triton":
        kw["max_iter"] = 40
    z_ref, st_ref = solve(name, f, x0, **kw, **FIXED)
    assert st_ref.all_converged and st_ref.rows == B * kw["max_iter"]
    schedules = ((3, 0.5),) if backend == "triton" else ((1, 0), (1, 0.9), (3, 0.5), (1, 1.0))
    for ce, cp in schedules:
        z, st = solve(name, f, x0, **kw, check_every=ce, compact=cp)
        assert_same_per_sample(z, st, z_ref, st_ref, TOL[torch.float64])
        assert st.steps < kw["max_iter"] and st.steps <= int(st_ref.nstep.max()) + ce - 1
        if cp and B > 1:
            assert st.compactions > 0 and st.rows < B * st.steps
        if cp == 1.0:  # compact at every step: rows = sum of per-sample steps exactly
            assert st.rows == int(st_ref.nstep.sum())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_default_rows_within_a_quarter_of_the_per_sample_minimum(name):
    """The issue's target: rows evaluated <= 1.25 x sum_b steps_b with the default settings."""
    B = 256
    f = spread_problem(B, L=16, rho_lo=0.05, rho_hi=0.95)
    kw = solver_kw(name, "auto")
    z, st = solve(name, f, torch.zeros(B, 16, dtype=torch.float64), **kw)
    assert st.all_converged
    need = int(st.nstep.sum())
    assert st.rows <= 1.25 * need, (st.rows, need)
    z_ref, st_ref = solve(name, f, torch.zeros(B, 16, dtype=torch.float64), **kw, **FIXED)
    assert_same_per_sample(z, st, z_ref, st_ref, TOL[torch.float64])


@pytest.mark.parametrize("name", list(SOLVERS))
def test_all_converge_at_step_one(name):
    f = spread_problem(9)
    z_star, _ = solve(name, f, torch.zeros(9, 12, dtype=torch.float64), **solver_kw(name, "auto"))
    z, st = solve(name, f, z_star.clone(), max_iter=50, tol=1e-6, stop_mode="abs")
    assert st.steps == 1 and st.all_converged and (st.nstep == 1).all() and st.rows == 9
    assert torch.equal(z, z_star)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_none_converge_runs_max_iter_without_compacting(name):
    f = spread_problem(5)
    z_ref, st_ref = solve(name, f, torch.zeros(5, 12, dtype=torch.float64), max_iter=6, tol=1e-30, **FIXED)
    z, st = solve(name, f, torch.zeros(5, 12, dtype=torch.float64), max_iter=6, tol=1e-30)
    assert st.steps == 6 and st.compactions == 0 and st.rows == 30 and not st.converged.any()
    assert_same_per_sample(z, st, z_ref, st_ref, TOL[torch.float64])


@pytest.mark.parametrize("dtype,hist", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                        (torch.bfloat16, None), (torch.float16, None)])
def test_low_precision_states_compact_like_fixed_shape(dtype, hist):
    """fp32 / bf16 / fp16 states and bf16 rings: the compacted solve follows the fixed-shape one (f is
    applied row by row here so both evaluate bit-identical rows; the step kernels see identical data)."""
    B, L = 23, 16
    g = torch.Generator().manual_seed(3)
    A = (torch.randn(L, L, generator=g) / 8).to(dtype)
    rho = torch.linspace(0.1, 0.9, B).to(dtype)
    fn = lambda z, rho: rho[:, None] * torch.tanh((z.unsqueeze(1) * A).sum(-1)) + 1  # noqa: E731  row by row
    f = RowwiseFn(fn, rho)
    low = dtype != torch.float32 or hist is not None
    kw = dict(max_iter=40, tol=1e-2 if low else 1e-5, history_dtype=hist)
    for backend in ("reference", "cuda"):
        z_ref, st_ref = anderson(f, torch.zeros(B, L, dtype=dtype), backend=backend, **kw, **FIXED)
        z, st = anderson(f, torch.zeros(B, L, dtype=dtype), backend=backend, **kw, check_every=1, compact=0.9)
        assert st.compactions > 0
        assert torch.equal(st.nstep, st_ref.nstep) and torch.equal(st.converged, st_ref.converged)
        assert torch.equal(z, z_ref)


@pytest.mark.parametrize("name,backend", [(n, b) for n in SOLVERS for b in ("reference", "cuda")] +
                         [pytest.param("anderson", "triton", marks=needs_triton)])
def test_layer_default_adaptive_equals_fixed_iterations(name, backend):
    """DEQFusion with its defaults (early exit + compaction in both solves) gives the fixed-iteration
    layer's output and gradients (float64, contractive cell), and really shrinks both solves."""
    torch.manual_seed(0)
    kw = dict(solver=name, backend=backend, f_max_iter=120, b_max_iter=120, f_tol=1e-11, b_tol=1e-11,
              stop_mode="abs")
    if name == "broyden":
        kw.update(f_max_iter=60, b_max_iter=60)
    fixed_kw = dict(kw)
    if backend == "triton":  # the CPU interpreter (~0.4 s per iteration): the fixed-shape twin runs the
        kw.update(f_max_iter=16, b_max_iter=16, f_tol=1e-5, b_tol=1e-5)  # reference cell + C++ step
        fixed_kw = dict(kw, backend="cuda")
    a = contractive_layer(DEQFusion(12, 3, **kw).double(), w_scale=0.3, gn3_scale=0.3)
    b = contractive_layer(DEQFusion(12, 3, **fixed_kw, solver_kw=FIXED).double(), w_scale=0.3, gn3_scale=0.3)
    g = torch.Generator().manual_seed(1)
    B = 6 if backend == "triton" else 11  # the interpreter's cost grows with the batch
    scale = torch.logspace(-3, 1, B, dtype=torch.float64)[:, None]  # easy and hard samples
    feats = [torch.randn(B, 12, generator=g, dtype=torch.float64) * scale for _ in range(3)]
    w = torch.randn(B, 12, generator=g, dtype=torch.float64)
    outs, grads = [], []
    for layer in (a, b):
        xs = [t.clone().requires_grad_() for t in feats]
        (layer(xs) * w).sum().backward()
        outs.append(layer.info)
        grads.append([p.grad for p in layer.parameters()] + [t.grad for t in xs])
    fa, fb = outs[0].forward_stats, outs[1].forward_stats
    ba, bb = outs[0].backward_stats, outs[1].backward_stats
    assert fa.all_converged and ba.all_converged
    # the C++ cell and step on the CPU: each solve is one whole-solve call (solvers.whole_solve) that skips
    # converged samples itself, no compaction needed; every other path compacts
    assert (fa.compactions > 0 and ba.compactions > 0) or (backend == "cuda" and name == "anderson")
    most = 0.8 if backend == "triton" else 0.6  # (16 iterations there: less room to save)
    assert fa.rows < fb.rows * most and ba.rows < bb.rows * most
    assert torch.equal(fa.nstep, fb.nstep) and torch.equal(ba.nstep, bb.nstep)
    for ga, gb in zip(*grads):  # (Triton's fp64 cell differs from the reference in the last bits)
        assert rel_err(ga, gb) < (1e-9 if backend == "triton" else 1e-10)


def eager_capture(bodies):
    """Stand-in for cuda_capture on the CPU: 'replaying' a chunk runs its body eagerly."""
    return bodies


@pytest.mark.parametrize("check_every", [None, 0, 1, 5])
def test_chunked_graph_solves_stop_at_chunk_boundaries(check_every):
    """The chunk logic of graphed solves (CPU stand-in for the CUDA graph replays): same per-sample
    answer and gradient as the eager fixed-shape solve, stopped at the first chunk boundary after the
    last sample converged, and reusable across calls with new inputs."""
    torch.manual_seed(0)
    kw = dict(f_max_iter=60, b_max_iter=60, f_tol=1e-10, b_tol=1e-10, stop_mode="abs", backend="cuda")
    eager = contractive_layer(DEQFusion(12, 2, **kw, solver_kw=FIXED).double())
    graphed = contractive_layer(DEQFusion(12, 2, **kw, solver_kw=dict(check_every=check_every)).double())
    graphed._graphs = GraphedSolves(graphed, capture=eager_capture)
    graphed.cuda_graph = True
    chunk = {None: 1, 0: 60}.get(check_every, check_every)  # the CPU default interval is 1
    for call in range(2):
        feats = [torch.randn(5, 12, dtype=torch.float64) for _ in range(2)]
        x = torch.stack(feats, 1)
        xf = fuse_inputs(x, graphed.weights, graphed.bias).detach()
        z_g, st_g = graphed._graphs.forward(x, xf)
        z_e, st_e = solve("anderson", eager._flat_cell(x, xf), x.new_zeros(5, 36), **eager.f_kw)
        assert_same_per_sample(z_g, st_g, z_e, st_e, TOL[torch.float64])
        assert st_g.steps % chunk == 0 or st_g.steps == 60
        assert st_g.steps - chunk < int(st_e.nstep.max()) <= st_g.steps
        grad = torch.randn(5, 36, dtype=torch.float64)
        box = []
        with torch.no_grad():  # as in the backward pass
            g_g = graphed._graphs.adjoint(z_g, x, xf, box)(grad)
        ebox = []
        g_e = adjoint_solver(eager.saved_vjp(z_e, x, xf), "anderson", ebox, **eager.b_kw)(grad)
        assert box[0].all_converged and torch.equal(box[0].nstep, ebox[0].nstep)
        assert rel_err(g_g, g_e) < 1e-12
    assert len(graphed._graphs.cache) == 2


def test_adaptive_options_are_checked():
    f = spread_problem(3)
    x0 = torch.zeros(3, 12, dtype=torch.float64)
    plain = lambda z: f(z)  # noqa: E731
    with pytest.raises(ValueError, match="check_every"):
        anderson(f, x0, check_every=-1)
    with pytest.raises(ValueError, match="check_every"):
        anderson(f, x0, check_every=1.5)
    with pytest.raises(ValueError, match="compact"):
        anderson(f, x0, compact=1.5)
    with pytest.raises(ValueError, match="row-wise"):
        anderson(plain, x0, compact=0.5)
    with pytest.raises(ValueError, match="needs check_every > 0"):
        fixed_point(f, x0, compact=0.5, check_every=0)
    z, st = anderson(plain, x0, max_iter=200, tol=1e-9)  # plain callable: early exit, no compaction
    assert st.all_converged and st.compactions == 0 and st.steps < 200
    assert 0 < DEFAULT_COMPACT <= 1
    with pytest.raises(ValueError, match=r"solver_kw\['max_iter'\].*f_max_iter"):
        DEQFusion(8, 2, solver_kw=dict(max_iter=3))
    with pytest.raises(ValueError, match=r"solver_kw\['backend'\]"):
        DEQFusion(8, 2, solver_kw=dict(backend="reference"))
    with pytest.raises(ValueError, match=r"solver_kw\['tau'\]: not an option of solver 'anderson'"):
        DEQFusion(8, 2, solver_kw=dict(tau=0.5))
    with pytest.raises(ValueError, match="solver must be one of"):
        DEQFusion(8, 2, solver="newton")


def test_graphed_solves_follow_autocast_and_the_precision_default_tolerance():
    """A graphed solve captured under autocast is not replayed outside it (nor the reverse), and a
    defaulted tolerance follows the precision as in eager mode (CPU stand-in for the CUDA replays)."""
    from deqfuse.layers import DEFAULT_TOL, LOW_PRECISION_TOL
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(12, 2, backend="reference", on_nonconvergence="ignore"))
    layer._graphs = GraphedSolves(layer, capture=eager_capture)
    x = torch.randn(5, 2, 12)
    xf = fuse_inputs(x, layer.weights, layer.bias).detach()
    _, st = layer._graphs.forward(x, xf)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, st_amp = layer._graphs.forward(x, xf)
        layer._graphs.adjoint(x.new_zeros(5, 36), x, xf)
    assert (st.tol, st_amp.tol) == (DEFAULT_TOL, LOW_PRECISION_TOL)
    assert len(layer._graphs.cache) == 3
    assert {(k[0], k[-1]) for k in layer._graphs.cache} == {("fwd", None), ("fwd", torch.bfloat16),
                                                             ("bwd", torch.bfloat16)}
