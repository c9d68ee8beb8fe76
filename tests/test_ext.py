"""The compiled extension: the C++ CPU Anderson step against the reference, op registration, errors."""
import pytest
import torch

import deqfuse
from deqfuse.reference import anderson_step_ref
from deqfuse.solvers import AndersonState, anderson
from conftest import rel_err

ext, why = deqfuse.extension_status()
pytestmark = pytest.mark.skipif(ext is None, reason=f"extension unavailable: {why}")
DEVS = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ext is not None and ext.has_cuda() else [])


def tanh_map(B, L, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = 0.9 * torch.linalg.qr(torch.randn(L, L, generator=g, dtype=torch.float64))[0]
    b = torch.randn(B, L, generator=g, dtype=torch.float64)
    A, b = A.to(dev, dtype), b.to(dev, dtype)
    return lambda z: torch.tanh(z @ A.T + b)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("B,L,m,dtype,hist", [
    (1, 5, 1, torch.float64, None), (3, 37, 3, torch.float64, None), (37, 20, 5, torch.float32, None),
    (4, 70, 6, torch.float32, torch.bfloat16), (5, 33, 8, torch.float64, None), (3, 300, 4, torch.bfloat16, None),
    # L % 4 == 0 (16-byte path) at every compiled ring size 2/4/6/8, rows longer than one block pass
    (3, 64, 2, torch.float32, None), (6, 128, 6, torch.float32, None), (4, 1028, 6, torch.float32, None),
    (2, 96, 7, torch.float32, torch.bfloat16), (3, 64, 6, torch.float16, None)])
def test_compiled_step_matches_reference(dev, B, L, m, dtype, hist):
    f = tanh_map(B, L, dtype, dev)
    x0 = torch.randn(B, L, dtype=torch.float64).to(dev, dtype)
    s_ref, s_ext = AndersonState(x0, m, 10, hist), AndersonState(x0, m, 10, hist)
    s_ext.X.fill_(float("nan"))
    s_ext.G.fill_(float("nan"))
    tight = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2) if hist is None else 1e-2
    for k in range(10):
        fx = f(s_ref.x)
        s_ref.step(anderson_step_ref, fx, k, 0.8, 1e-4, 1e-30, True)
        s_ext.step(torch.ops.deqfuse.anderson_step, fx.clone(), k, 0.8, 1e-4, 1e-30, True)
        assert rel_err(s_ext.x.double(), s_ref.x.double()) < tight, k
        for name in ("x", "X", "G", "GG"):  # re-sync: compare one step at a time
            getattr(s_ext, name).copy_(getattr(s_ref, name))
    assert torch.equal(s_ext.nstep, s_ref.nstep) and torch.equal(s_ext.converged, s_ref.converged)
    assert rel_err(s_ext.rel_trace.double(), s_ref.rel_trace.double()) < 1e-4


@pytest.mark.parametrize("dev", DEVS)
def test_solver_backend_cuda_per_sample_freeze(dev):
    f = tanh_map(6, 24, torch.float64, dev)
    z_ref, st_ref = anderson(f, torch.zeros(6, 24, dtype=torch.float64, device=dev), max_iter=60, tol=1e-10,
                             backend="reference")
    z, st = anderson(f, torch.zeros(6, 24, dtype=torch.float64, device=dev), max_iter=60, tol=1e-10, backend="cuda")
    assert st.all_converged and torch.equal(st.nstep, st_ref.nstep)
    assert rel_err(z, z_ref) < 1e-8


def test_nan_residual_never_converges():
    x0 = torch.randn(2, 8, dtype=torch.float64)
    st = AndersonState(x0, 3, 1)
    fx = x0.clone()
    fx[1, 0] = float("nan")
    st.step(torch.ops.deqfuse.anderson_step, fx, 0, 1.0, 1e-4, 1e-3, True)
    assert st.converged.tolist() == [True, False]
    assert torch.isfinite(st.best_x).all()


def test_errors_name_the_argument():
    st = AndersonState(torch.randn(2, 8), 3, 1)
    with pytest.raises(RuntimeError, match="fx must have shape"):
        st.step(torch.ops.deqfuse.anderson_step, torch.randn(2, 7), 0, 1.0, 1e-4, 1e-3, True)
    st9 = AndersonState(torch.randn(2, 8), 9, 1)
    with pytest.raises(RuntimeError, match=r"m \(X.size\(1\)\) must be in"):
        st9.step(torch.ops.deqfuse.anderson_step, torch.randn(2, 8), 0, 1.0, 1e-4, 1e-3, True)


def test_fake_kernel_lets_compile_trace():
    """torch.compile traces through the mutating op (fake kernel registered) with no graph break."""
    x = torch.randn(3, 16)
    fx = torch.tanh(x)

    def step(st_x, fx, X, G, GG, bx, br, cv, ns, a, r):
        torch.ops.deqfuse.anderson_step(st_x, fx, X, G, GG, bx, br, cv, ns, a, r, 0, 1.0, 1e-4, 1e-6, True)
        return st_x * 1

    st = AndersonState(x, 3, 1)
    args = (st.x, fx, st.X, st.G, st.GG, st.best_x, st.best_res, st.converged, st.nstep, st.abs_trace[0], st.rel_trace[0])
    explain = torch._dynamo.explain(step)(*args)
    assert explain.graph_break_count == 0


@pytest.mark.skipif("cuda" not in DEVS, reason="needs the CUDA build of the extension and a GPU")
@pytest.mark.parametrize("N,B,D,dtype", [(3, 5, 20, torch.float32), (2, 37, 1020, torch.float32),
                                         (5, 3, 64, torch.bfloat16), (2, 9, 1024, torch.float32),
                                         (1, 3, 2048, torch.float32), (1, 2, 4096, torch.float16),
                                         (2, 3, 1204, torch.float32)])  # every (vector, chunks) instance
def test_modality_epilogue_cuda_matches_reference(N, B, D, dtype):
    from deqfuse.reference.epilogue import modality_epilogue_ref
    a2 = torch.randn(N, B, D, device="cuda", dtype=dtype)
    x = torch.randn(B, N, D, device="cuda", dtype=dtype)
    z = torch.randn(B, N + 1, D, device="cuda", dtype=dtype)
    p = [torch.randn(N, D, device="cuda") for _ in range(5)]
    out, u = torch.ops.deqfuse.modality_epilogue(a2, x, z, *p, 4)
    ro, ru = modality_epilogue_ref(a2.double(), x.double(), z.double(), *(t.double() for t in p), 4)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out.double(), ro) < tol and rel_err(u.double(), ru) < tol


def test_modality_epilogue_reference_matches_cell():
    """Fed the cell's own W2 GEMM output, the epilogue reproduces the cell's modality outputs."""
    from deqfuse.reference import cell_forward
    from deqfuse.reference.epilogue import modality_epilogue_ref
    from conftest import make_inputs, make_params
    p = make_params(3, 12)
    z, x, xf = make_inputs(4, 3, 12)
    out_cell, saved = cell_forward(z, x, xf, p, save=True)
    a2 = torch.einsum("bnk,ndk->nbd", torch.relu(saved["g1"]), p.w2)
    out, u = modality_epilogue_ref(a2, x, z, p.b2, p.gn2_w, p.gn2_b, p.gn3_w, p.gn3_b, 4)
    assert rel_err(out, out_cell[:, :3]) < 1e-12
    assert rel_err(u, saved["u"].transpose(0, 1)) < 1e-12


def test_torch_compile_traces_the_whole_eval_solve_in_one_graph():
    """Fake kernels + a constant backend choice: dynamo sees the layer's forward solve as one graph with
    the compiled step in it (no graph break), and the compiled layer gives the eager result."""
    from deqfuse import DEQFusion
    torch.manual_seed(0)
    layer = DEQFusion(16, 3, backend="cuda", f_max_iter=6, on_nonconvergence="ignore").eval()
    feats = [torch.randn(4, 16) for _ in range(3)]
    with torch.no_grad():
        ex = torch._dynamo.explain(layer)(feats)
        assert ex.graph_count == 1 and ex.graph_break_count == 0
        assert any("anderson_step" in str(op) for g in ex.ops_per_graph for op in g)
        torch._dynamo.reset()
        out = torch.compile(layer, backend="aot_eager")(feats)
        assert rel_err(out, layer(feats)) < 1e-5


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("B,E,dtype", [(1, 3, torch.int64), (37, 2, torch.int64), (3000, 5, torch.int64),
                                       (1500, 64, torch.int32)])   # > 1024: several chunks on CUDA
def test_compiled_group_by_choice_is_the_stable_sort(dev, B, E, dtype):
    from deqfuse.dynamic import group_by_choice_ref
    choice = torch.randint(0, E, (B,), generator=torch.Generator().manual_seed(B)).to(dev, dtype)
    order, counts = torch.ops.deqfuse.group_by_choice(choice, E)
    ref_order, ref_counts = group_by_choice_ref(choice.long(), E)
    assert torch.equal(order, ref_order) and torch.equal(counts.long(), ref_counts)
    bad = choice.clone()
    bad[0] = E
    assert int(torch.ops.deqfuse.group_by_choice(bad, E)[1].sum()) == B - 1
    with pytest.raises(RuntimeError, match="choice must be an integer"):
        torch.ops.deqfuse.group_by_choice(choice.float(), E)


@pytest.mark.parametrize("dev", DEVS)
def test_compiled_gather_multi_and_scatter_match_reference(dev):
    from deqfuse.dynamic import gather_rows_multi_ref
    g = torch.Generator().manual_seed(0)
    # widths and dtypes that take every copy word (16, 8, 4, 2 bytes); 9 sources: two launches on CUDA
    specs = [(4, torch.float32), (3, torch.float32), (3, torch.float16), (1, torch.bfloat16), (2, torch.float64),
             (40, torch.float32), (5, torch.float16), (8, torch.bfloat16), (7, torch.float64)]
    srcs = [torch.randn(23, d, generator=g).to(dev, dt) for d, dt in specs]
    idx = torch.tensor([22, 0, 5, 5, 11], device=dev)
    for a, b in zip(torch.ops.deqfuse.gather_rows_multi(srcs, idx), gather_rows_multi_ref(srcs, idx)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert [t.shape for t in torch.ops.deqfuse.gather_rows_multi(srcs, idx[:0])] == [(0, d) for d, _ in specs]
    out = torch.full((23, 3), float("nan"), device=dev)
    y = torch.randn(3, 3, generator=g).to(dev)
    torch.ops.deqfuse.scatter_rows(y, torch.tensor([4, 0, 22], device=dev), out)
    assert torch.equal(out[[4, 0, 22]], y) and out.isnan().sum() == 20 * 3
    with pytest.raises(RuntimeError, match="idx must be a 1-D int64"):
        torch.ops.deqfuse.gather_rows_multi(srcs, idx.int())
    with pytest.raises(RuntimeError, match="share D"):
        torch.ops.deqfuse.scatter_rows(y[:, :2], torch.tensor([4, 0, 22], device=dev), out)


@pytest.mark.parametrize("dev", DEVS)
def test_dynamic_fusion_routes_through_the_compiled_ops(dev):
    from deqfuse import DynamicFusion, MLPHead, SubsetExpert
    torch.manual_seed(0)
    experts = [SubsetExpert([0], MLPHead(6, 4)), SubsetExpert([0, 1], MLPHead(11, 4, hidden=16))]
    m = DynamicFusion(experts, [6, 5]).double().eval().to(dev)
    f = [torch.randn(50, 6, dtype=torch.float64, device=dev), torch.randn(50, 5, dtype=torch.float64, device=dev)]
    with torch.no_grad():
        m.backend = "reference"
        ref = m(f)
        m.backend = "cuda"
        out = m(f)
    assert torch.equal(out, ref) and sum(m.info.counts) == 50
