"""Regression tests of issue 11 (no crash, no silent wrong answer, every option validated up front), one
per reported case, plus a bounded property-based fuzz test of the solvers across backends."""
import copy
import pickle

import pytest
import torch

import deqfuse
from deqfuse import DEQFusion, DepthGatedFusion, DynamicFusion, GumbelSchedule, MLPHead, SubsetExpert, anderson
from deqfuse.bench import step_args
from conftest import contractive_layer, needs_triton, rel_err

EXT = deqfuse.extension_status()[0] is not None
needs_ext = pytest.mark.skipif(not EXT, reason="compiled extension not built")


def feats(B=4, D=16, N=3, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(B, D, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(N)]


# 1. compiled ops: negative step index, mixed meta / real tensors
@needs_ext
def test_negative_step_index_is_an_error_not_a_heap_write():
    args = list(step_args(3, 8, 4))
    args[11] = -1
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        torch.ops.deqfuse.anderson_step(*args)
    from deqfuse.reference import anderson_step_ref
    with pytest.raises(ValueError, match="k must be >= 0"):
        anderson_step_ref(*args)


@needs_ext
def test_mixed_meta_and_real_tensors_raise_instead_of_computing_nothing():
    args = list(step_args(3, 8, 4))
    args[1] = args[1].to("meta")
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.deqfuse.anderson_step(*args)


# 2. non-contiguous x0 on every backend
@pytest.mark.parametrize("backend", ["reference", pytest.param("cuda", marks=needs_ext),
                                     pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_x0_gives_the_contiguous_answer(backend):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(5, 12, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ A.T + b)  # noqa: E731
    x0 = torch.randn(12, 5, generator=g, dtype=torch.float64).T  # non-contiguous view
    assert not x0.is_contiguous()
    z, st = anderson(f, x0, max_iter=40, tol=1e-12, backend=backend)
    z_ref, st_ref = anderson(f, x0.contiguous(), max_iter=40, tol=1e-12, backend="reference")
    assert st.all_converged and rel_err(z, z_ref) < 1e-10
    assert rel_err(f(z), z) < 1e-10


# 3. double backward through the implicit gradient raises (it would be wrong)
def test_double_backward_through_implicit_gradient_raises():
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(8, 2, f_max_iter=30, b_max_iter=30, on_nonconvergence="ignore").double())
    x = [t.double().requires_grad_() for t in feats(3, 8, 2)]
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(layer(x).square().sum(), x[0], create_graph=True)


def test_double_backward_through_unrolled_is_right():
    """grad='unrolled' (reference backend: plain autograd) gives true second-order gradients."""
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(8, 2, grad="unrolled", unrolled_steps=3, backend="reference").double())
    x = [t.double().requires_grad_() for t in feats(2, 8, 2)]
    assert torch.autograd.gradgradcheck(lambda a, b: layer([a, b]).square().sum(), x, atol=1e-6, rtol=1e-5)


# 4. huge finite inputs: a clear error instead of a silently zero output
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float64, 1e160)])
def test_inputs_beyond_the_groupnorm_range_raise(dtype, scale):
    layer = DEQFusion(16, 3).to(dtype)
    with pytest.raises(ValueError, match=r"features\[0\] has values up to .* rescale"):
        layer(feats(dtype=dtype, scale=scale))
    assert torch.isfinite(layer(feats(dtype=dtype, scale=1e3))).all()  # large but fine


# 5. the adjoint solve warns when it does not converge
def test_adjoint_nonconvergence_warns():
    torch.manual_seed(0)
    layer = DEQFusion(16, 3, f_max_iter=30, b_max_iter=2, b_tol=1e-12)
    out = layer(feats())
    with pytest.warns(RuntimeWarning, match=r"adjoint \(backward\) solve: some samples did not reach b_tol=1e-12"):
        out.sum().backward()


# 6. lam must be > 0 (the compiled bordered solves do not pivot)
def test_lam_zero_is_rejected_everywhere():
    f = lambda z: 2 * z + 1  # noqa: E731  colinear history: singular without the Tikhonov term
    with pytest.raises(ValueError, match="lam must be > 0"):
        anderson(f, torch.zeros(2, 4), lam=0.0)
    with pytest.raises(ValueError, match=r"solver_kw\['lam'\] must be > 0"):
        DEQFusion(8, 2, solver_kw=dict(lam=0.0))
    for backend in ["reference"] + (["cuda"] if EXT else []):  # and a tiny lam works on every backend alike
        z, st = anderson(lambda z: 0.5 * z + 1, torch.zeros(2, 4, dtype=torch.float64), lam=1e-12, tol=1e-10,
                         max_iter=30, backend=backend)
        assert st.all_converged and torch.allclose(z, torch.full_like(z, 2.0))


# 7. deepcopy / pickle after a training forward
def test_deepcopy_and_pickle_after_training_forward():
    torch.manual_seed(0)
    deq = DEQFusion(8, 2, jac_reg=1, f_max_iter=4, b_max_iter=4, on_nonconvergence="ignore")
    deq(feats(3, 8, 2))
    dyn = DynamicFusion([SubsetExpert([0], MLPHead(8, 3)), SubsetExpert([0, 1], MLPHead(16, 3))])
    dyn(feats(3, 8, 2))
    depth = DepthGatedFusion(MLPHead(16, 8), [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)], torch.nn.Linear(8, 2))
    depth(feats(3, 8, 2))
    for m in (deq, dyn, depth):
        assert m.info is not None
        c = copy.deepcopy(m)
        assert c.info is None and all(torch.equal(a, b) for a, b in zip(c.parameters(), m.parameters()))
        pickle.loads(pickle.dumps(m))
    c = copy.deepcopy(deq)
    assert c._graphs.layer is c  # the graph cache belongs to the copy
    assert torch.allclose(c.eval()(feats(3, 8, 2)), deq.eval()(feats(3, 8, 2)))


# 8. options: validated at construction, named as the user typed them
@pytest.mark.parametrize("kw,match", [
    (dict(f_max_iter=0), r"f_max_iter must be in \[1, 10000\]"), (dict(b_max_iter=2.5), "b_max_iter must be an int"),
    (dict(f_tol=0.0), "f_tol must be > 0"), (dict(b_tol=float("nan")), "b_tol must be a finite number"),
    (dict(stop_mode="max"), "stop_mode must be one of"), (dict(b_stop_mode="x"), "b_stop_mode must be one of"),
    (dict(solver="newton"), "solver must be one of"), (dict(backend="gpu"), "backend must be one of"),
    (dict(grad="magic"), "grad must be one of"), (dict(phantom_steps=0), "phantom_steps must be >= 1"),
    (dict(phantom_lam=0.0), "phantom_lam must be in"), (dict(jac_reg=-1), "jac_reg must be >= 0"),
    (dict(jac_reg=1, grad="unrolled"), "jac_reg: the Jacobian loss is taken at the fixed point"),
    (dict(unrolled_steps=0), "unrolled_steps must be >= 1"), (dict(cuda_graph=1), "cuda_graph must be a bool"),
    (dict(solver_kw=dict(beta=0.0)), r"solver_kw\['beta'\] must be > 0"),
    (dict(solver_kw=dict(beta=float("nan"))), r"solver_kw\['beta'\] must be a finite"),
    (dict(solver_kw=dict(lam=-1e-4)), r"solver_kw\['lam'\] must be > 0"),
    (dict(solver_kw=dict(m=0)), r"solver_kw\['m'\] must be >= 1"),
    (dict(solver_kw=dict(check_every=-1)), r"solver_kw\['check_every'\] must be >= 0"),
    (dict(solver_kw=dict(compact=2)), r"solver_kw\['compact'\] must be in"),
    (dict(solver_kw=dict(history_dtype=torch.int32)), r"solver_kw\['history_dtype'\] must be None or one of"),
    (dict(solver_kw=dict(max_iter=3)), r"solver_kw\['max_iter'\]: set it with DEQFusion's f_max_iter"),
    (dict(solver_kw=dict(backend="cuda")), r"solver_kw\['backend'\]: set it with DEQFusion's backend"),
    (dict(solver="fixed_point", solver_kw=dict(tau=0.0)), r"solver_kw\['tau'\] must be in \(0"),
    (dict(solver="fixed_point", solver_kw=dict(tau=2.5)), r"solver_kw\['tau'\] must be in \(0"),
    (dict(solver="broyden", solver_kw=dict(m=0)), r"solver_kw\['m'\] must be >= 1"),
    (dict(solver_kw=[1]), "solver_kw must be a dict"),
])
def test_deq_options_are_validated_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        DEQFusion(8, 2, **kw)


def test_solver_function_options_are_validated():
    f, x0 = (lambda z: 0.5 * z), torch.zeros(2, 3)
    for kw, match in [(dict(beta=-1.0), "beta must be > 0"), (dict(m=True), "m must be an int"),
                      (dict(history_dtype=torch.int64), "history_dtype must be None or one of"),
                      (dict(max_iter=0), r"max_iter must be in \[1, 10000\]")]:
        with pytest.raises(ValueError, match=match):
            anderson(f, x0, **kw)
    with pytest.raises(ValueError, match=r"tau must be in \(0"):
        deqfuse.fixed_point(f, x0, tau=0.0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        deqfuse.broyden(f, x0, m=0)


@needs_ext
def test_ring_size_beyond_the_compiled_step_falls_back_or_raises_alike():
    """m > 8: 'auto' takes another step implementation; 'cuda' named explicitly raises -- the same
    whether or not the extension is built (the reference would take it)."""
    f = lambda z: 0.5 * z + 1  # noqa: E731
    z, st = anderson(f, torch.zeros(2, 4, dtype=torch.float64), m=9, tol=1e-10, max_iter=40)
    assert st.all_converged
    with pytest.raises(ValueError, match="m=9: the compiled Anderson step"):
        anderson(f, torch.zeros(2, 4), m=9, backend="cuda")


@pytest.mark.parametrize("make,match", [
    (lambda: DynamicFusion([SubsetExpert([0], MLPHead(8, 3))], tau=0.0), "tau must be > 0"),
    (lambda: DynamicFusion([SubsetExpert([0], MLPHead(8, 3))], lambda_cost=-1.0), "lambda_cost must be >= 0"),
    (lambda: DynamicFusion([SubsetExpert([0], MLPHead(8, 3))] * 2, costs=[1.0]), "costs must give one cost per expert"),
    (lambda: DynamicFusion([SubsetExpert([0], MLPHead(8, 3))], costs=[-1.0]), r"costs\[0\] must be >= 0"),
    (lambda: DynamicFusion([SubsetExpert([1], MLPHead(8, 3))])([torch.randn(2, 8)]),
     r"inputs holds 1 modalities, the experts read modality 1"),
    (lambda: SubsetExpert([-1], MLPHead(8, 3)), r"modalities\[0\] must be >= 0"),
    (lambda: DynamicFusion([SubsetExpert([0], MLPHead(8, 3))], backend="gpu"), "backend must be one of"),
    (lambda: GumbelSchedule(tau_min=0.0), "tau_min must be > 0"),
])
def test_dynamic_options_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# 9. torch.compile: the non-convergence warning is no graph break (fullgraph works)
@needs_ext
def test_compile_fullgraph_with_default_warning():
    torch.manual_seed(0)
    layer = DEQFusion(16, 3, f_max_iter=4).eval()
    x = feats()
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert rel_err(out, layer(x)) < 1e-5


# 10. CLI: everything checked before training starts
@pytest.mark.parametrize("argv,match", [
    (["--models", "concat,foo"], "--models: unknown"), (["--epochs", "0"], "--epochs must be >= 1"),
    (["--dim", "0"], "--dim must be >= 4"), (["--dim", "30"], "--dim must be a multiple of 4"),
    (["--dynmm-lambda", "-1"], "--dynmm-lambda must be >= 0"),
    (["--out", "/proc/no/such/dir"], "is not writable"),
])
def test_cli_rejects_bad_arguments_before_training(argv, match, capsys):
    from deqfuse.__main__ import main
    with pytest.raises(SystemExit):
        main(["train", "--no-progress", *argv])
    assert match in capsys.readouterr().err


# 11. the implicit gradient does not depend on the scale of the loss
def test_gradient_is_invariant_to_the_loss_scale_with_abs_forward_tolerance():
    torch.manual_seed(0)
    layer = contractive_layer(DEQFusion(16, 2, stop_mode="abs", f_tol=1e-6, f_max_iter=60, b_max_iter=60,
                                        on_nonconvergence="ignore").double(), w_scale=0.5, gn3_scale=0.5)
    x = [t.double() for t in feats(128, 16, 2)]
    r = torch.randn(128, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for scale in (1.0, 1000.0):
        layer.zero_grad()
        (scale * (layer(x) * r).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]) / scale)
        assert layer.info.backward_stats.steps > 1  # the adjoint really iterated
    assert rel_err(grads[0], grads[1]) < 2e-3


# 12. empty batches and mixed dtypes: clear errors
def test_empty_batch_and_mixed_dtypes_are_clear_errors():
    dyn = DynamicFusion([SubsetExpert([0], MLPHead(8, 3)), SubsetExpert([1], MLPHead(8, 3))])
    with pytest.raises(ValueError, match="batch size 0"):
        dyn([torch.zeros(0, 8), torch.zeros(0, 8)])
    with pytest.raises(ValueError, match=r"inputs\[1\] has batch 3, inputs\[0\] has 2"):
        dyn([torch.zeros(2, 8), torch.zeros(3, 8)])
    deq = DEQFusion(8, 2)
    with pytest.raises(TypeError, match=r"features\[1\] is torch.float64, the layer's parameters are torch.float32"):
        deq([torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match="batch size 0"):
        deq([torch.zeros(0, 8), torch.zeros(0, 8)])
    z, st = anderson(lambda z: z, torch.zeros(0, 3), max_iter=3)  # the solvers take an empty batch
    assert z.shape == (0, 3) and st.summary()["batch"] == 0


# property-based fuzz: every backend agrees with the reference on converged samples
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(0, 9), L=st.integers(1, 40), m=st.integers(1, 8), beta=st.floats(0.3, 1.0),
       dtype=st.sampled_from([torch.float64, torch.float32]), transposed=st.booleans(),
       check_every=st.sampled_from([None, 0, 1, 3]), compact=st.sampled_from([None, 0, 0.5, 1.0]),
       stop_mode=st.sampled_from(["abs", "rel"]), seed=st.integers(0, 2 ** 16))
def test_fuzz_backends_agree_on_converged_samples(B, L, m, beta, dtype, transposed, check_every, compact,
                                                  stop_mode, seed):
    from deqfuse.rowwise import RowwiseFn
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, L, generator=g, dtype=torch.float64)
    A = (0.6 * A / torch.linalg.matrix_norm(A, 2)).to(dtype)
    c = torch.randn(B, L, generator=g, dtype=torch.float64).to(dtype)
    f = RowwiseFn(lambda z, c: torch.tanh(z @ A.T) + c, c)
    x0 = torch.randn(L, B, generator=g, dtype=torch.float64).to(dtype).T if transposed else torch.zeros(B, L, dtype=dtype)
    if compact and not check_every and check_every is not None:
        compact = 0
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    kw = dict(m=m, beta=beta, max_iter=60, tol=tol, stop_mode=stop_mode, check_every=check_every, compact=compact)
    z_ref, st_ref = anderson(f, x0, backend="reference", **kw)
    backends = ["cuda"] if EXT else []
    for b in backends:
        z, s = anderson(f, x0, backend=b, **kw)
        ok = s.converged & st_ref.converged
        assert z.shape == (B, L) and s.converged.shape == (B,)
        if ok.any():
            err = (z[ok] - z_ref[ok]).abs().max() / (1 + z_ref[ok].abs().max())
            assert err < (1e-7 if dtype == torch.float64 else 1e-2)


@needs_ext
def test_compile_does_not_recompile_per_batch_size():
    """Issue 11 item 9: new batch sizes reuse the compiled solve (dynamic=True: one graph; default:
    dynamo's automatic dynamic shapes after the second size)."""
    torch.manual_seed(0)
    layer = DEQFusion(16, 3, f_max_iter=4).eval()
    for dynamic, most in ((True, 1), (None, 2)):
        graphs = []
        torch._dynamo.reset()
        c = torch.compile(layer, backend=lambda gm, ex: graphs.append(gm) or gm.forward, dynamic=dynamic)
        with torch.no_grad():
            for B in (4, 8, 16, 5, 33):
                x = feats(B)
                assert rel_err(c(x), layer(x)) < 1e-5
        assert len(graphs) <= most, (dynamic, len(graphs))
