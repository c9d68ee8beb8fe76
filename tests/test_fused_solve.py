"""The whole Anderson solve as one C++ call (csrc/solve_cpu.cpp: anderson_cell_solve / anderson_vjp_solve),
which the solver runs instead of its per-iteration loop for the C++ cell (solvers.whole_solve): per sample
the loop's answer (iterate, best residual, its step, flag, traces), on 1 and 2 threads, contiguous and
gathered blocks of active rows, forward and adjoint; the layer's outputs and gradients; rows = the work
each sample needed; no ATen op per iteration; checked arguments."""
import pytest
import torch

import deqfuse
from deqfuse import DEQFusion, force_cpu_plan, solvers
from deqfuse.cell import ExtCellRows
from deqfuse.reference.cell import fuse_inputs
from deqfuse.solvers import Results, anderson
from deqfuse.testing import extension_runs, rel_err
from conftest import contractive_layer, make_inputs, make_params, plan_part

pytestmark = pytest.mark.skipif(not extension_runs("cpu"), reason="compiled extension not built")

# "same answer": the GEMMs over different row subsets (and thread splits) round differently in the last
# bits, which a solve to tol 1e-9 amplifies a little
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture
def per_iteration(monkeypatch):
    """A context in which the solvers run their per-iteration loop (the reference of these tests)."""
    class Ctx:
        def __enter__(self):
            monkeypatch.setattr(solvers, "whole_solve", lambda *a: None)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return Ctx()


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def cell_map(B, N, D, dtype, w_scale=0.5, seed=0):
    """The layer's forward map (ExtCellRows) on random features, and its parameters."""
    layer = contractive_layer(DEQFusion(D, N, groups=2).to(dtype), w_scale=w_scale, gn3_scale=w_scale, seed=seed)
    _, x, _ = make_inputs(B, N, D, dtype, seed=seed + 1)
    x = x * torch.linspace(0.05, 3, B, dtype=dtype)[:, None, None]  # samples that need different step counts
    xf = fuse_inputs(x, layer.weights, layer.bias)
    with torch.no_grad():
        return layer._flat_cell(x, xf), layer


CHAOTIC_TOL = 1e-6  # samples that do not converge (see assert_same)


def assert_same(z, st, z_ref, st_ref, dtype):
    """The whole solve's answer and stats equal the loop's, sample by sample. Both paths evaluate the cell on
    different row subsets, and a BLAS GEMM's rows can round differently with the row count of the call
    (~1e-16 per step). A sample that converges keeps that at ~1e-12; one that does not (Anderson wandering
    at a residual of ~0.01-5 for 40 steps) amplifies it chaotically (measured: 6e-9 in z in float64, MKL on
    an AMD EPYC), so those samples -- flagged unconverged by both -- are compared to CHAOTIC_TOL."""
    tol = TOL[dtype]
    assert torch.equal(st.converged, st_ref.converged)
    assert torch.equal(st.nstep, st_ref.nstep)
    assert st.steps == st_ref.steps
    for rows, t in ((st_ref.converged, tol), (~st_ref.converged, max(tol, CHAOTIC_TOL))):
        if not rows.any():
            continue
        zr = z_ref[rows]
        assert (z[rows] - zr).abs().max() <= t * (1 + zr.abs().max())
        assert torch.allclose(st.best_res[rows], st_ref.best_res[rows], rtol=t * 100, atol=t)
        for name in ("abs_trace", "rel_trace"):
            a, r = getattr(st, name)[:, rows], getattr(st_ref, name)[:, rows]
            assert torch.equal(torch.isnan(a), torch.isnan(r)), name
            assert torch.allclose(a, r, rtol=t * 100, atol=t * 10, equal_nan=True), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,N,D", [(1, 1, 8), (7, 2, 8), (37, 3, 12), (150, 2, 16)])
def test_cell_solve_equals_per_iteration_loop(B, N, D, dtype, threads, per_iteration):
    # float32: a more contractive cell (a sample that needs ~40 steps amplifies the last-bit differences of
    # GEMMs over different row subsets into its trace; float64 keeps them at ~1e-12)
    f, _ = cell_map(B, N, D, dtype, w_scale=0.5 if dtype == torch.float64 else 0.3)
    assert isinstance(f, ExtCellRows)
    x0 = torch.zeros(B, (N + 1) * D, dtype=dtype)
    kw = dict(max_iter=40, tol=1e-9 if dtype == torch.float64 else 1e-5, m=5)
    with torch.no_grad():
        z, st = anderson(f, x0, **kw)
        with per_iteration:
            z_ref, st_ref = anderson(f, x0, compact=0, **kw)
    assert st_ref.rows == B * st_ref.steps  # the loop evaluated every row at every step
    assert_same(z, st, z_ref, st_ref, dtype)
    # the whole solve evaluated each sample until it froze: rows = the trace entries written
    assert st.rows == int((~torch.isnan(st.abs_trace)).sum())
    assert B == 1 or 1 < len(set(st.nstep.tolist())), "the problem must spread the samples' step counts"


@pytest.mark.parametrize("D,groups", [(64, 4), (64, 2), (32, 4)])
def test_whole_solve_equals_the_loop_with_tile_gemms(D, groups, threads, per_iteration):
    """float32 with the tile GEMMs: the whole solve -- its ring holding X + beta G, the Gram row in one pass,
    bias and GroupNorm epilogues -- gives the per-iteration loop's iterates and step counts to float32
    rounding (the two drive the same kernels; each sample's steps within one of the loop's)."""
    if plan_part("gemm", D) == "blas":
        pytest.skip("no tile GEMM kernel for this width on this CPU")
    B, N = 70, 2
    layer = contractive_layer(DEQFusion(D, N, groups=groups), w_scale=0.3, gn3_scale=0.3, seed=0)
    _, x, _ = make_inputs(B, N, D, torch.float32, seed=1)
    x = x * torch.linspace(0.05, 3, B)[:, None, None]
    with torch.no_grad():
        f = layer._flat_cell(x, fuse_inputs(x, layer.weights, layer.bias))
        kw = dict(max_iter=40, tol=1e-5, m=5)
        z, st = anderson(f, torch.zeros(B, (N + 1) * D), **kw)
        with per_iteration:
            z_ref, st_ref = anderson(f, torch.zeros(B, (N + 1) * D), compact=0, **kw)
    assert 1 < len(set(st.nstep.tolist())), "the problem must spread the samples' step counts"
    assert rel_err(z, z_ref) < 1e-4
    assert (st.nstep - st_ref.nstep).abs().max() <= 1 and torch.equal(st.converged, st_ref.converged)


@pytest.mark.parametrize("check_every", [1, 4])
def test_reported_steps_follow_the_check_interval(check_every, per_iteration):
    f, _ = cell_map(9, 2, 8, torch.float64)
    x0 = torch.zeros(9, 24, dtype=torch.float64)
    kw = dict(max_iter=40, tol=1e-8, check_every=check_every)
    with torch.no_grad():
        z, st = anderson(f, x0, **kw)
        with per_iteration:
            z_ref, st_ref = anderson(f, x0, compact=0, **kw)
    assert st.steps == st_ref.steps and (z - z_ref).abs().max() < 1e-12
    assert st.all_converged and st.steps < 40 and st.steps % check_every == 0


def test_non_contiguous_start_and_features():
    """x0 and the features with other strides: the same solve as from contiguous copies."""
    f, _ = cell_map(6, 2, 8, torch.float64)
    x0 = torch.randn(24, 6, dtype=torch.float64).t() * 0.1  # [6, 24], column-major
    fnc = ExtCellRows(f.fn, f.inputs[0].transpose(0, 1).contiguous().transpose(0, 1), f.inputs[1].t().contiguous().t(),
                      f.params, f.groups)
    assert not x0.is_contiguous() and not fnc.inputs[0].is_contiguous() and not fnc.inputs[1].is_contiguous()
    with torch.no_grad():
        z, st = anderson(fnc, x0, max_iter=30, tol=1e-10)
        z_ref, st_ref = anderson(f, x0.contiguous(), max_iter=30, tol=1e-10)
    assert torch.equal(z, z_ref) and torch.equal(st.nstep, st_ref.nstep)


def test_none_and_all_converged(per_iteration):
    f, _ = cell_map(5, 2, 8, torch.float64)
    x0 = torch.zeros(5, 24, dtype=torch.float64)
    with torch.no_grad():
        _, st = anderson(f, x0, max_iter=6, tol=1e-30)
        assert st.steps == 6 and not st.converged.any() and st.rows == 30
        _, st = anderson(f, x0, max_iter=6, tol=1e30)
        assert st.steps == 1 and st.all_converged and st.rows == 5 and (st.nstep == 1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_outputs_and_gradients_equal_per_iteration_loop(dtype, threads, per_iteration):
    """Training step: forward solve and adjoint solve (anderson_vjp_solve) against the loop's."""
    torch.manual_seed(0)
    B, N, D = 23, 2, 8
    layer = contractive_layer(DEQFusion(D, N, groups=2, f_max_iter=40, b_max_iter=40).to(dtype), w_scale=0.5,
                              gn3_scale=0.5)
    feats = [torch.randn(B, D, dtype=dtype) * s for s in (0.5, 1.5)]
    P = torch.randn(D, 3, dtype=dtype)

    def step():
        layer.zero_grad(set_to_none=True)
        out, info = layer(feats, return_info=True)
        (out @ P).square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}, info

    out, grads, info = step()
    with per_iteration:
        out_ref, grads_ref, info_ref = step()
    # float32: both solves stop at the layer's tolerances (1e-4) along their own roundings (each plan's)
    tol = TOL[dtype] * (1 if dtype == torch.float64 else 100)
    assert (out - out_ref).abs().max() <= tol * (1 + out_ref.abs().max())
    for n in grads:
        assert (grads[n] - grads_ref[n]).abs().max() <= tol * (1 + grads_ref[n].abs().max()), n
    fb, fb_ref = info.backward_stats, info_ref.backward_stats
    assert torch.equal(fb.converged, fb_ref.converged)
    if dtype == torch.float64:  # (float32: the two plans round apart, and a slow sample's best step can move)
        assert torch.equal(fb.nstep, fb_ref.nstep)
        assert fb.rows <= fb_ref.rows and info.forward_stats.rows <= info_ref.forward_stats.rows


def test_no_aten_op_per_iteration():
    """The eval solve is one op call: the ATen ops of a forward do not grow with the iteration count."""
    from torch.profiler import ProfilerActivity, profile
    feats = [torch.randn(64, 16) for _ in range(2)]

    def count(iters):
        layer = DEQFusion(16, 2, f_max_iter=iters, f_tol=1e-30, on_nonconvergence="ignore").eval()
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(feats)
        ev = prof.key_averages()
        assert sum(e.count for e in ev if e.key == "deqfuse::anderson_cell_solve") == 1
        return sum(e.count for e in ev if e.key.startswith("aten::"))
    assert count(5) == count(40)


def test_whole_solve_steps_aside():
    """The registry's compiled 'anderson_solve' runs only where it applies; elsewhere the per-iteration loop:
    fixed iterations, another history dtype, the reference backend, m past the compiled ring, float16, a plain
    callable, grad enabled."""
    f, _ = cell_map(4, 2, 8, torch.float32)
    x0 = torch.zeros(4, 24)
    with torch.no_grad():
        assert solvers.whole_solve(f, x0, "auto", 5, None, 1) is f
        assert solvers.whole_solve(f, x0, "cuda", 5, None, 1) is f
        assert solvers.whole_solve(f, x0, "auto", 5, None, 0) is None  # fixed iterations: the fixed-shape loop
        assert solvers.whole_solve(f, x0, "auto", 5, torch.bfloat16, 1) is None
        assert solvers.whole_solve(f, x0, "reference", 5, None, 1) is None
        assert solvers.whole_solve(f, x0, "auto", 9, None, 1) is None
        assert solvers.whole_solve(f, x0.half(), "auto", 5, None, 1) is None
        assert solvers.whole_solve(lambda z: z, x0, "auto", 5, None, 1) is None
    assert solvers.whole_solve(f, x0, "auto", 5, None, 1) is None  # grad enabled


def _op_args(B=4, N=2, D=8, dtype=torch.float32, max_iter=5):
    p = list(make_params(N, D, dtype))
    _, x, xf = make_inputs(B, N, D, dtype)
    z0 = torch.zeros(B, (N + 1) * D, dtype=dtype)
    r = Results(z0, max_iter)
    return [z0, x, xf, p, 2, r.best_x, r.best_res, r.converged, r.nstep, r.abs_trace, r.rel_trace, 5, 1.0, 1e-4,
            1e-4, True, max_iter]


@pytest.mark.parametrize("i,bad,msg", [
    (0, torch.zeros(4, 25), "z0 must be"),
    (1, torch.zeros(4, 2, 8, dtype=torch.float64), "x must have z0's dtype"),
    (4, 3, "groups"),
    (6, torch.zeros(4, dtype=torch.float64), "best_res must be"),
    (7, torch.zeros(4, dtype=torch.int32), "converged must be"),
    (9, torch.zeros(3, 4), "abs_trace must have >= max_iter"),
    (11, 9, "m must be in"),
    (13, 0.0, "lam, beta and tol must be > 0"),
    (16, 0, "max_iter must be >= 1"),
])
def test_cell_solve_checks_its_arguments(i, bad, msg):
    args = _op_args()
    args[i] = bad
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.deqfuse.anderson_cell_solve(*args)


def test_vjp_solve_checks_its_arguments():
    B, N, D = 4, 2, 8
    p = list(make_params(N, D, torch.float32))
    z, x, xf = make_inputs(B, N, D, torch.float32)
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, 2, True)
    g0 = torch.zeros(B, (N + 1) * D)
    r = Results(g0, 5)
    tail = [r.best_x, r.best_res, r.converged, r.nstep, r.abs_trace, r.rel_trace, 5, 1.0, 1e-4, 1e-4, True, 5]
    torch.ops.deqfuse.anderson_vjp_solve(g0, g0.clone(), saved, p, 2, *tail)  # well-formed: runs
    with pytest.raises(RuntimeError, match="add must be"):
        torch.ops.deqfuse.anderson_vjp_solve(g0, torch.zeros(B, 3), saved, p, 2, *tail)
    with pytest.raises(RuntimeError, match=r"saved\[0\] must have shape"):
        torch.ops.deqfuse.anderson_vjp_solve(g0, g0, [s[:, :2] if s.dim() == 3 else s for s in saved], p, 2, *tail)


def _solve_all(f, B, N, D, dtype, runs=1):
    x0 = torch.zeros(B, (N + 1) * D, dtype=dtype)
    with torch.no_grad():
        return [anderson(f, x0, max_iter=40, tol=1e-9 if dtype == torch.float64 else 1e-5, m=5)
                for _ in range(runs)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_size_and_thread_order_do_not_change_the_answer(dtype, threads):
    """The solve runs chunk by chunk (solve_cpu.cpp, solve_chunks) and the threads take chunks in no fixed
    order: a chunk of 1, 5 or 64 samples gives each sample the same trajectory, and repeated 2-thread
    solves agree bit for bit. float32 at D = 16 runs the tile GEMMs (rows round alike whatever the call's row
    count: bit for bit across chunk sizes); float64 goes through the BLAS, whose rows may round differently
    with the row count (assert_same's tolerances)."""
    B, N, D = 70, 2, 16
    f, _ = cell_map(B, N, D, dtype, w_scale=0.5 if dtype == torch.float64 else 0.3)
    runs = {}
    for chunk in ("1", "5", "64"):
        with force_cpu_plan(chunk=int(chunk)):
            runs[chunk] = _solve_all(f, B, N, D, dtype, runs=3)
        z0, st0 = runs[chunk][0]
        for z, st in runs[chunk][1:]:  # run to run: bit for bit
            assert torch.equal(z, z0) and torch.equal(st.abs_trace.nan_to_num(), st0.abs_trace.nan_to_num())
    z_ref, st_ref = runs["64"][0]
    assert 1 < len(set(st_ref.nstep.tolist()))  # samples freeze at different steps inside a chunk
    tile = dtype == torch.float32 and plan_part("gemm", D) != "blas"
    for chunk in ("1", "5"):
        z, st = runs[chunk][0]
        assert st.rows == st_ref.rows and st.steps == st_ref.steps
        if tile:
            assert torch.equal(z, z_ref) and torch.equal(st.nstep, st_ref.nstep)
            assert torch.equal(st.abs_trace.nan_to_num(), st_ref.abs_trace.nan_to_num())
        else:
            assert_same(z, st, z_ref, st_ref, dtype)


def _cell_solve(layer, x, groups, m, tol, stop_rel, max_iter, z0):
    """anderson_cell_solve of the layer's cell from z0: ((steps, rows), the Results buffers)."""
    p = list(layer.cell.params())
    with torch.no_grad():
        xf = fuse_inputs(x, layer.weights, layer.bias)
    r = Results(z0.clone(), max_iter)
    out = torch.ops.deqfuse.anderson_cell_solve(z0, x, xf, p, groups, *r.buffers(), m, 1.0, 1e-4, tol, stop_rel,
                                                max_iter)
    return out, r.buffers()


def _vjp_solve(layer, x, groups, m, tol, stop_rel, max_iter, z0):
    """anderson_vjp_solve of the layer's cell at the point z0 (add: a fixed random cotangent) from zeros."""
    p = list(layer.cell.params())
    B = x.shape[0]
    with torch.no_grad():
        xf = fuse_inputs(x, layer.weights, layer.bias)
        saved = torch.ops.deqfuse.cell_forward(z0.view(B, layer.n + 1, layer.dim), x, xf, p, groups, True)[1]
    add = make_inputs(B, layer.n, layer.dim, torch.float32, seed=3)[0].reshape(B, -1)
    g0 = torch.zeros_like(add)
    r = Results(g0.clone(), max_iter)
    out = torch.ops.deqfuse.anderson_vjp_solve(g0, add, saved, p, groups, *r.buffers(), m, 1.0, 1e-4, tol, stop_rel,
                                               max_iter)
    return out, r.buffers()


@pytest.mark.parametrize("D,groups,N,m,B,chunk", [(64, 4, 2, 5, 70, ""), (32, 4, 3, 3, 37, ""), (64, 8, 1, 8, 130, ""),
                                                  (64, 4, 2, 1, 21, "5"), (64, 4, 5, 5, 50, "24")])
@pytest.mark.parametrize("stop_rel", [True, False], ids=["rel", "abs"])
@pytest.mark.parametrize("solve", [_cell_solve, _vjp_solve], ids=["forward", "adjoint"])
def test_feature_major_solve_agrees_with_the_row_layout(D, groups, N, m, B, chunk, stop_rel, solve, threads):
    """Where the whole solves can run feature-major (csrc/cpu/cell_fm_avx512.h: float32, tile GEMMs, GroupNorm
    group width 16 or 8 with groups % 4 == 0; the default on CPUs with AVX-512F), forward and adjoint, each
    sample's iterate and residuals agree with the row layout's to the solve's tolerance (steps within one), with
    samples freezing at different steps (their lanes compacted from 4 vectors down to 1), padding lanes (chunks
    of 5, 24, 21 samples) and ring sizes 1 to 8."""
    if plan_part("layout", D, groups) != "fm":
        pytest.skip("the feature-major solve does not run on this CPU or width")
    layer = contractive_layer(DEQFusion(D, N, groups=groups), w_scale=0.3, gn3_scale=0.3, seed=0)
    _, x, _ = make_inputs(B, N, D, torch.float32, seed=1)
    x = x * torch.linspace(0.05, 3, B)[:, None, None]  # samples that need different step counts
    z0 = make_inputs(B, N, D, torch.float32, seed=2)[0].reshape(B, -1) * 0.1
    tol = 1e-6 if stop_rel else 1e-5 if solve is _cell_solve else 1e-4  # the adjoint's residuals are larger
    runs = {}
    for layout in ("fm", "rows"):
        with force_cpu_plan(layout=layout, chunk=int(chunk or 0)):
            runs[layout] = solve(layer, x, groups, m, tol, stop_rel, 16, z0)  # some samples reach max_iter
    (out, bufs), (out_ref, bufs_ref) = runs["fm"], runs["rows"]
    if m > 1:  # (the adjoint without acceleration, m = 1, moves every sample for all 16 steps)
        assert len(set(bufs_ref[3].tolist())) > 1, "samples must freeze at various steps"
    assert abs(out[0] - out_ref[0]) <= 1
    best_x, best_res, conv, nstep = bufs[:4]
    # two roundings of one solve: the iterates agree to the solve's tolerance (the adjoint's is 1e-4 absolute)
    assert rel_err(best_x, bufs_ref[0]) < (1e-4 if solve is _cell_solve else 2e-3)
    assert (nstep - bufs_ref[3]).abs().max() <= 1
    both = conv & bufs_ref[2]
    assert both.sum() >= 0.9 * bufs_ref[2].sum()  # (a sample at its tolerance's edge may tip either way)


def test_adjoint_solve_does_not_depend_on_the_chunk_size():
    """anderson_vjp_solve runs chunk by chunk too: a training step's outputs and gradients with chunks of
    1, 7 and 64 samples (2 threads; float32 tile GEMMs: bit for bit, else to the loop tests' tolerance)."""
    torch.manual_seed(0)
    B, N, D = 45, 2, 16
    layer = contractive_layer(DEQFusion(D, N, groups=2, f_max_iter=40, b_max_iter=40), w_scale=0.3, gn3_scale=0.5)
    feats = [torch.randn(B, D) * s for s in (0.5, 1.5)]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    res = {}
    try:
        for chunk in ("1", "7", "64"):
            layer.zero_grad(set_to_none=True)
            with force_cpu_plan(chunk=int(chunk)):
                out, info = layer(feats, return_info=True)
                (out * torch.linspace(-1, 1, D)).sum().backward()
            res[chunk] = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
            assert 1 < len(set(info.backward_stats.nstep.tolist()))
    finally:
        torch.set_num_threads(old)
    tile = plan_part("gemm", D) != "blas"
    for chunk in ("1", "7"):
        for a, b in zip(res[chunk], res["64"]):
            assert torch.equal(a, b) if tile else (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())


def test_whole_solve_with_a_smaller_openmp_team_than_asked():
    """A team smaller than asked for (OMP_THREAD_LIMIT=1 gives one thread while torch asks for two) still
    solves every chunk (once, with a per-step barrier sized by the request, it waited forever)."""
    import os
    import subprocess
    import sys
    if not extension_runs():
        pytest.skip("compiled extension not built")
    code = ("import torch; from deqfuse import DEQFusion; torch.set_num_threads(2); "
            "layer = DEQFusion(64, 2, f_max_iter=30, on_nonconvergence='ignore').eval(); "
            "print(layer([torch.randn(128, 64) for _ in range(2)]).shape)")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "[128, 64]" in r.stdout, r.stderr[-2000:]


def _fork_child_solve(q, args):
    """In a forked child: the whole solve on 2 threads (the op itself: torch's own OpenMP ops hang in a child
    of a parent that used them, libgomp's limit, which is why DataLoader workers run 1 thread)."""
    torch.set_num_threads(2)
    torch.ops.deqfuse.anderson_cell_solve(*args)
    q.put(float(args[5].sum()))


def test_solve_team_survives_concurrent_calls_and_fork():
    """The solves' thread teams: two Python threads solving at once get the answers they get alone, and a
    forked child (a DataLoader worker) of a parent whose OpenMP team is up solves on its own pool (a libgomp
    parallel region in the child would never end)."""
    import multiprocessing as mp
    import threading
    torch.manual_seed(0)
    layer = DEQFusion(16, 2).eval()
    feats = [[torch.randn(96, 16) for _ in range(2)] for _ in range(2)]
    with torch.no_grad():
        alone = [layer(f) for f in feats]
        got = [[], []]

        def run(i):
            with torch.no_grad():  # (grad mode is per thread)
                for _ in range(15):
                    got[i].append(layer(feats[i]))
        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    for i in range(2):
        assert all(torch.equal(g, alone[i]) for g in got[i])
    from deqfuse.solvers import Results
    z0, x = torch.zeros(96, 48), torch.stack(feats[0], 1)
    with torch.no_grad():
        xf = fuse_inputs(x, layer.weights, layer.bias)
    res = Results(z0, 20)
    args = (z0, x, xf, list(layer.cell.params()), 4, *res.buffers(), 5, 1.0, 1e-4, 1e-4, True, 20)
    torch.ops.deqfuse.anderson_cell_solve(*args)  # the parent's solve team has threads now
    torch.ones(1 << 22).add_(1)  # and torch's OpenMP team too
    want = float(res.best_x.sum())
    res.reset(z0)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_fork_child_solve, args=(q, args))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == want


def test_solver_stats_name_the_plan_that_ran():
    """A compiled whole solve's stats name its kernel plan (deqfuse.cpu_plan, with what is forced); the
    per-iteration loop says so."""
    feats = [torch.randn(9, 16), torch.randn(9, 16)]
    layer = DEQFusion(16, 2, groups=2)
    with torch.no_grad(), force_cpu_plan(gemm="blas", chunk=8):
        _, info = layer.eval()(feats, return_info=True)
        assert info.forward_stats.plan == "C++ whole solve: " + deqfuse.cpu_plan(16, 2)
    assert info.forward_stats.plan.endswith("chunk=8") and "gemm=blas" in info.forward_stats.plan
    layer.train()
    out, info = layer([t.requires_grad_() for t in feats], return_info=True)
    out.sum().backward()
    assert info.backward_stats.plan.startswith("C++ whole solve: gemm=")
    with torch.no_grad():
        _, info = DEQFusion(16, 2, groups=2, backend="reference").eval()(feats, return_info=True)
    assert info.forward_stats.plan == "per-iteration loop"


def test_feature_major_needs_a_full_vector_per_solve_thread():
    """The plan's layout follows the batch: feature-major (where the CPU and width allow it) from one full
    16-sample vector per solve thread, rows below; a solve's stats name the layout that ran."""
    if plan_part("layout", 64, 4) != "fm":
        pytest.skip("the feature-major solve does not run on this CPU")
    before = torch.get_num_threads()
    try:
        for threads, rows_below in ((1, 16), (2, 32)):
            torch.set_num_threads(threads)
            assert "layout=rows" in deqfuse.cpu_plan(64, 4, batch=rows_below - 1)
            assert "layout=fm" in deqfuse.cpu_plan(64, 4, batch=rows_below)
            with force_cpu_plan(layout="fm"):
                assert "layout=fm" in deqfuse.cpu_plan(64, 4, batch=rows_below - 1)
        layer = DEQFusion(64, 2).eval()
        with torch.no_grad():
            for B, layout in ((31, "rows"), (32, "fm")):
                _, info = layer([torch.randn(B, 64), torch.randn(B, 64)], return_info=True)
                assert info.forward_stats.plan.endswith("layout=" + layout)
    finally:
        torch.set_num_threads(before)
