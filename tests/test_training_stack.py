"""The layers inside a user's training stack: torch.autocast (bf16 / fp16, GradScaler), DDP across two
processes (gloo), checkpoint + resume, torch.compile with a dynamic batch, NVTX profiling ranges.

Mixed-precision bounds (CPU autocast; the policy is in DEQFusion's docstring). Errors are relative
(||a - b|| / ||b||) against a float64 solve of the same layer, and are compared with PyTorch's own error
in the same precision, as flash-attention's tests do. Measured (B=32, N=2, D=64, contractive cell,
reference backend; the default CPU backend's C++ cell computes in float32 under autocast):
  * output (f_tol 5e-4): bf16 2.2e-4, fp16 3.8e-5 vs a plain-PyTorch Picard iteration of the reference
    cell under the same autocast 2.15e-4, 3.2e-5 (ratio 1.03, 1.19): bound OUT_RATIO x PyTorch's and OUT_TOL;
  * gradients (parameters and features, adjoint in float32 outside autocast, b_tol 1e-6): bf16 5.3e-3,
    fp16 1.1e-3 vs PyTorch's unrolled weight-tied network (40 steps) under the same autocast 6.4e-3,
    1.8e-3 (ratio 0.83, 0.60): bound GRAD_RATIO x PyTorch's and GRAD_TOL;
  * a module cast to bf16/fp16 (state in that dtype too): 5.2e-3 / 6.4e-4 at f_tol 3e-3 / 1e-3.
Before the solvers' own arithmetic was kept out of autocast, the reference Anderson step ran its Gram
GEMMs in bf16 and the solve stalled at a 1.7e-3 residual (8x PyTorch's error): that is what these catch.
"""
import contextlib
import copy
import json
import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import deqfuse
from deqfuse import ConcatGate, DEQFusion, DynamicFusion, MLPHead, SubsetExpert, profiling
from deqfuse.reference.cell import cell_forward, fuse_inputs
from deqfuse.testing import contractive_layer, rel_err
from conftest import needs_triton

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
F_TOL = {torch.bfloat16: 5e-4, torch.float16: 5e-4}  # forward-solve f_tol per dtype (residual floors ~2e-4)
OUT_RATIO = 1.5
OUT_TOL = {torch.bfloat16: 5e-4, torch.float16: 1e-4}
GRAD_RATIO = 1.5
GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2.5e-3}
MODULE_F_TOL = {torch.bfloat16: 3e-3, torch.float16: 1e-3}  # a bf16 / fp16 solver state resolves less
MODULE_TOL = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}
B, N, D = 32, 2, 64


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x64 = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(N)]
    w64 = torch.randn(B, D, generator=g, dtype=torch.float64)
    return x64, w64


def _layer(dtype=torch.float32, **kw):
    kw = dict(dict(f_max_iter=100, b_max_iter=100), **kw)
    return contractive_layer(DEQFusion(D, N, **kw)).to(dtype)


def _grads(layer, x64, w64, autocast=None):
    """(output, grads of sum(out * w) w.r.t. the parameters and the features) in float32 features."""
    x = [t.float().requires_grad_() for t in x64] if autocast else [t.clone().requires_grad_() for t in x64]
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = layer(x)
    (out.to(w64.dtype if not autocast else torch.float32) * (w64.float() if autocast else w64)).sum().backward()
    return out, [p.grad for p in layer.parameters()] + [t.grad for t in x]


def _exact(x64, w64):
    layer = _layer(torch.float64, f_tol=1e-12, b_tol=1e-12, f_max_iter=300, b_max_iter=300)
    return _grads(layer, x64, w64)


def _pytorch_picard(layer, x64, dtype, steps=100):
    """PyTorch's own low-precision fixed point: the reference cell iterated under autocast."""
    x = torch.stack([t.float() for t in x64], 1)
    z = x.new_zeros(B, N + 1, D)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        xf = fuse_inputs(x, layer.weights, layer.bias)
        for _ in range(steps):
            z = cell_forward(z, x, xf, layer.cell.params(), layer.cell.groups).float()
    return z[:, N]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", LOW)
def test_autocast_eval_solve_reaches_the_fixed_point_within_the_dtype_bound(dtype, backend):
    x64, w64 = _problem()
    out64, _ = _exact(x64, w64)
    layer = _layer(f_tol=F_TOL[dtype], backend=backend).eval()
    feats = [t.float() for t in x64]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out, info = layer(feats, return_info=True)
    assert out.dtype == torch.float32 and info.forward_stats.all_converged
    if backend == "auto":  # the C++ CPU cell computes in the features' dtype: autocast changes nothing
        with torch.no_grad():
            assert torch.equal(out, layer(feats))
        return
    err = rel_err(out, out64)
    ref_err = rel_err(_pytorch_picard(layer, x64, dtype), out64)
    assert err <= OUT_RATIO * ref_err and err <= OUT_TOL[dtype], (err, ref_err)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", LOW)
def test_autocast_training_gradients_within_the_dtype_bound(dtype, backend):
    x64, w64 = _problem()
    out64, g64 = _exact(x64, w64)
    layer = _layer(f_tol=F_TOL[dtype], b_tol=1e-6, backend=backend)
    out, g = _grads(layer, x64, w64, autocast=dtype)
    info = layer.info
    assert info.forward_stats.all_converged and info.backward_stats.all_converged
    err = max(rel_err(a, b) for a, b in zip(g, g64))
    unrolled = _layer(grad="unrolled", unrolled_steps=40, backend="reference")
    _, gu = _grads(unrolled, x64, w64, autocast=dtype)
    ref_err = max(rel_err(a, b) for a, b in zip(gu, g64))
    assert err <= GRAD_RATIO * ref_err and err <= GRAD_TOL[dtype], (err, ref_err)
    assert rel_err(out, out64) <= OUT_TOL[dtype]


@needs_triton
@pytest.mark.triton
@pytest.mark.parametrize("variant", ["cublas", "fused"])
def test_autocast_leaves_the_triton_cell_in_float32(variant):
    """The Triton cell (its cuBLAS GEMMs included) ignores autocast like the C++ op: the eval solve gives
    the float32 result bit for bit, and a training step's adjoint reads float32 saved tensors."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = contractive_layer(DEQFusion(16, 2, backend="triton", triton_cell=variant, f_tol=5e-4)).to(dev).eval()
    x = [torch.randn(6, 16, device=dev) for _ in range(2)]
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast(dev, dtype=torch.bfloat16):
            assert torch.equal(layer(x), ref)
    layer.train()
    xg = [t.clone().requires_grad_() for t in x]
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = layer(xg)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in xg)


@pytest.mark.parametrize("dtype", LOW)
def test_module_cast_to_low_precision_converges_on_a_contractive_cell(dtype):
    """A module and features cast to bf16 / fp16 (no autocast): everything in that dtype; the solve
    converges at its dtype's tolerance and lands near the float64 fixed point."""
    x64, w64 = _problem()
    out64, _ = _exact(x64, w64)
    layer = _layer(dtype, f_tol=MODULE_F_TOL[dtype]).eval()
    with torch.no_grad():
        out, info = layer([t.to(dtype) for t in x64], return_info=True)
    assert out.dtype == dtype and info.forward_stats.all_converged
    assert rel_err(out.double(), out64) < MODULE_TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
def test_default_tolerance_follows_the_precision_of_the_solve(dtype):
    """f_tol / b_tol left unset: 1e-4 for a float32 solve (forward and adjoint), 1e-3 for a forward
    under autocast (and its adjoint) and in an fp16 module, where 1e-4 is below the residual floor, 1e-2 in
    a bf16 module (a bf16 state); the defaulted low-precision solves converge, so the default layer does
    not warn. An explicit tolerance is always kept."""
    from deqfuse.layers import BF16_STATE_TOL, DEFAULT_TOL, LOW_PRECISION_TOL
    x64, w64 = _problem()
    feats = [t.float().requires_grad_() for t in x64]
    layer = contractive_layer(DEQFusion(D, N, on_nonconvergence="warn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        layer(feats).sum().backward()
        assert layer.info.forward_stats.tol == DEFAULT_TOL and layer.info.backward_stats.tol == DEFAULT_TOL
        with torch.autocast("cpu", dtype=dtype):
            out = layer(feats)
        out.float().sum().backward()
        st = layer.info
        assert st.forward_stats.tol == LOW_PRECISION_TOL and st.backward_stats.tol == LOW_PRECISION_TOL
        assert st.forward_stats.all_converged
    low = copy.deepcopy(layer).to(dtype).eval()
    with torch.no_grad():
        _, info = low([t.detach().to(dtype) for t in feats], return_info=True)
    assert info.forward_stats.tol == (BF16_STATE_TOL if dtype == torch.bfloat16 else LOW_PRECISION_TOL)
    assert info.forward_stats.all_converged
    explicit = contractive_layer(DEQFusion(D, N, f_tol=2e-4, b_tol=3e-4))
    with torch.autocast("cpu", dtype=dtype):
        explicit(feats).float().sum().backward()
    assert explicit.info.forward_stats.tol == 2e-4 and explicit.info.backward_stats.tol == 3e-4


def test_grad_scaler_with_fp16_autocast_trains():
    """fp16 autocast + torch.amp.GradScaler on a small classifier with a DEQ fusion: finite scaled
    gradients reach every parameter on most steps, the scaler backs off exactly where they overflow, and the
    loss goes down."""
    torch.manual_seed(0)
    enc = torch.nn.ModuleList(torch.nn.Linear(10, 16) for _ in range(2))
    fusion = contractive_layer(DEQFusion(16, 2, f_tol=F_TOL[torch.float16], b_tol=1e-4, on_nonconvergence="ignore"))
    head = torch.nn.Linear(16, 3)
    params = [*enc.parameters(), *fusion.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    x = [torch.randn(64, 10) for _ in range(2)]
    y = (x[0][:, 0] + x[1][:, 1] > 0).long() + (x[0][:, 2] > 1).long()
    losses, taken = [], 0
    for _ in range(40):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(head(fusion([e(v) for e, v in zip(enc, x)])), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        assert all(p.grad is not None for p in params)
        finite = all(torch.isfinite(p.grad).all() for p in params)
        scale = scaler.get_scale()
        scaler.step(opt)      # skipped while the scaled fp16 gradients overflow (the scaler backs off)
        scaler.update()
        assert finite == (scaler.get_scale() >= scale)  # an overflow is seen, and only an overflow backs off
        taken += finite
        losses.append(float(loss.detach()))
    assert taken >= 25 and losses[-1] < 0.7 * losses[0], (taken, losses[0], losses[-1])


# --------------------------------------------------------------------------------------------- DDP
class _DEQNet(torch.nn.Module):
    """A DEQ fusion (contractive, solved to 1e-11) + a linear head: [B, 8] x 2 -> [B, 3]."""

    def __init__(self, jac_reg=0):
        super().__init__()
        self.fusion = contractive_layer(DEQFusion(8, 2, f_tol=1e-11, b_tol=1e-11, f_max_iter=200, b_max_iter=200,
                                                  jac_reg=jac_reg))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, feats):
        return self.head(self.fusion(feats))


def _ddp_worker(rank, world, init_file, out_dir):
    """Each rank: (1) one DDP step of a float64 DEQ classifier on its shard vs a single-process step on
    the whole global batch; (2) train.train_epoch with DDP vs without for two epochs (unequal shards, a
    DEQ with the Jacobian regulariser, DynMM's routing experts), parameters compared."""
    from deqfuse.distributed import wrap
    from deqfuse.train import train_epoch
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # the two runs draw their random numbers on different row sets; make the draws row-independent:
        # Hutchinson probes of ones, Gumbel noise off (this process only)
        torch.randn_like = lambda t, **kw: torch.ones_like(t, **kw)
        F.gumbel_softmax = lambda logits, tau=1.0, hard=False: torch.softmax(logits / tau, -1)
        errs = {}

        def model(kind, seed=0):
            torch.manual_seed(seed)
            if kind == "dynmm":
                experts = [SubsetExpert([0], MLPHead(8, 3)), SubsetExpert([0, 1], MLPHead(16, 3))]
                return DynamicFusion(experts, ConcatGate([8, 8], 2, 4), lambda_cost=0.2).double()

            return _DEQNet(jac_reg=1 if kind == "deq+jac" else 0).double()

        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(23, 8, generator=g, dtype=torch.float64) for _ in range(2)]
        y = torch.randint(0, 3, (23,), generator=g)
        for kind, batch in (("deq", 7), ("deq+jac", 8), ("dynmm", 8)):
            # the Jacobian term and the resource loss are per-rank means: exact with equal shards only
            n = 23 if kind == "deq" else 24
            xk = [torch.cat([v, v[:1]])[:n] for v in xs]
            yk = torch.cat([y, y[:1]])[:n]
            ref, par = model(kind), model(kind)
            extra = {"dynmm": lambda m: m.resource_loss, "deq+jac": lambda m: (lambda: m.fusion.info.jac_loss)}.get(kind)
            opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
            opt_p = torch.optim.SGD(par.parameters(), lr=0.1)
            net = wrap(par)
            for ep in range(2):
                if isinstance(par, DynamicFusion):
                    par.tau = ref.tau = 1.0 - 0.3 * ep
                torch.manual_seed(10 + ep)
                dist_loss = train_epoch(net, opt_p, xk, yk, batch, extra and extra(par))
                torch.manual_seed(10 + ep)
                # single process: no process group for this call
                with _no_group():
                    ref_loss = train_epoch(ref, opt_r, xk, yk, batch, extra and extra(ref))
            errs[kind] = max(rel_err(a, b) for a, b in zip(par.parameters(), ref.parameters()))
            errs[kind + ":loss"] = abs(dist_loss - ref_loss) / abs(ref_loss)
        errs.update(_fsdp_vs_single(xs, y))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(errs, fh)
    finally:
        dist.destroy_process_group()
    # Reached on success only (an exception above goes to mp.spawn as usual). Leave without interpreter
    # finalization: FSDP2's device mesh keeps the gloo process group alive past destroy_process_group, and
    # a gloo worker thread that drops its last reference to a finished all-gather (a tensor with a Python
    # object) while the interpreter finalizes takes the GIL, is unwound by the exiting interpreter and
    # aborts the process ("terminate called without an active exception"; core dump: ~AsyncAllgather-
    # CoalescedWork in ProcessGroupGloo::runLoop -> gil_scoped_acquire -> pthread_exit). About 1 run in 20
    # on a 2-core machine, in torch's teardown after every check here has run and its result is on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fsdp_vs_single(xs, y):
    """FSDP2 (fully_shard, gloo on the CPU) around a DEQ classifier: three Adam steps on the same data
    on every rank equal three single-process steps (the README's FSDP example)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # older torch: FSDP2 absent
        return {}

    torch.manual_seed(0)
    ref = _DEQNet().double()
    torch.manual_seed(0)
    sh = _DEQNet().double()
    fully_shard(sh.fusion)
    fully_shard(sh)
    for model in (ref, sh):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            loss = F.cross_entropy(model(xs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    full = [p.full_tensor() for p in sh.parameters()]
    return {"fsdp": max(rel_err(a, b) for a, b in zip(full, ref.parameters()))}


@contextlib.contextmanager
def _no_group():
    """deqfuse.distributed sees no process group inside (a single-process reference in a DDP worker)."""
    import deqfuse.distributed as d
    saved = d.dist.is_initialized
    d.dist.is_initialized = lambda: False
    try:
        yield
    finally:
        d.dist.is_initialized = saved


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_match_single_process_training(tmp_path):
    """2 CPU processes (gloo): the global batch split across the ranks gives the single-process
    gradients of the same global batch (float64, contractive cell, implicit backward), so the models
    stay equal step by step; unequal shards included; no unused-parameter or buffer errors from
    DEQFusion's solver state / info or DynMM's routing. FSDP2 (fully_shard) likewise."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        errs = json.load(open(tmp_path / f"rank{r}.json"))
        assert {"deq", "deq+jac", "dynmm"} <= set(errs) and ("fsdp" in errs or not hasattr(torch.distributed, "fsdp"))
        for k, v in errs.items():
            assert v < 1e-9, (r, k, v)


# ------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["deq", "dynmm"])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, method):
    from deqfuse.data import load_uci_multifeature, split_standardize
    from deqfuse.train import train_one
    views, labels = load_uci_multifeature()
    data = split_standardize(views, labels, seed=0)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    data = dict(data, train=([v[:256] for v in xtr], ytr[:256]), test=([v[:200] for v in xte], yte[:200]))
    kw = dict(D=16, epochs=3, progress=False, deq_kw=dict(f_max_iter=8, b_max_iter=8), return_model=True)
    full, m_full = train_one(method, data, **kw)
    # (dynmm: 3 epochs of its experts, then its gate's: stopped in either stage)
    for stop in (1, 5) if method == "dynmm" else (1,):
        ck = str(tmp_path / f"{method}{stop}.pt")
        assert train_one(method, data, checkpoint=ck, stop_after=stop, **kw) is None
        assert torch.load(ck, weights_only=True)["epoch"] == stop - 1
        resumed, m_res = train_one(method, data, checkpoint=ck, **kw)
        assert resumed["accuracy"] == full["accuracy"] and resumed["macro_f1"] == full["macro_f1"]
        for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


# ----------------------------------------------------------------------------------- torch.compile
def test_compile_dynamic_batch_does_not_recompile():
    """torch.compile(dynamic=True) of the eval forward and of a training step: new batch sizes reuse the
    graphs (no recompilation); outputs match eager. (Timing: benchmarks/bench_compile.py.)"""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    layer = DEQFusion(16, 2, f_max_iter=6, b_max_iter=6, on_nonconvergence="ignore")
    head = torch.nn.Linear(16, 3)

    def train_step(feats, y):
        loss = F.cross_entropy(head(layer(feats)), y)
        loss.backward()
        return loss.detach()

    for mode in ("eval", "train"):
        torch._dynamo.reset()
        counters.clear()
        layer.train(mode == "train")
        fn = torch.compile(train_step if mode == "train" else layer, dynamic=True, backend="aot_eager")
        graphs = []
        for b in (5, 9, 17):
            feats = [torch.randn(b, 16) for _ in range(2)]
            y = torch.randint(0, 3, (b,))
            if mode == "eval":
                with torch.no_grad():
                    assert rel_err(fn(feats), layer(feats)) < 1e-5
            else:
                head.zero_grad()
                layer.zero_grad()
                fn(feats, y)
                g_c = [p.grad.clone() for p in layer.parameters()]
                layer.zero_grad()
                train_step(feats, y)
                assert max(rel_err(a, p.grad) for a, p in zip(g_c, layer.parameters())) < 1e-4
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[0] == graphs[-1], (mode, graphs)   # compiled once, reused for every batch size
        assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0


# --------------------------------------------------------------------------------------------- NVTX
def test_nvtx_ranges_cover_a_training_step_and_routing():
    seen = []
    was_on = profiling.enabled()
    profiling.set_enabled(True, impl=lambda name: (seen.append(name), contextlib.nullcontext())[1])
    try:
        torch.manual_seed(0)
        layer = DEQFusion(16, 2, on_nonconvergence="ignore")
        x = [torch.randn(5, 16, requires_grad=True) for _ in range(2)]
        layer(x).sum().backward()
        dyn = DynamicFusion([SubsetExpert([0], MLPHead(16, 3)), SubsetExpert([0, 1], MLPHead(32, 3))]).eval()
        with torch.no_grad():
            dyn([t.detach() for t in x])
    finally:
        profiling.set_enabled(was_on)
    names = set(seen)
    for want in ("forward_solve", "solve_iters", "attach_grad", "adjoint_solve", "anderson_step", "route", "unroute"):
        assert f"deqfuse/{want}" in names, (want, names)
    assert any(n.startswith("deqfuse/cell_forward[") for n in names)
    assert any(n.startswith("deqfuse/cell_vjp") for n in names)
    assert any(n.startswith("deqfuse/expert[") for n in names)


def test_nvtx_off_adds_nothing_and_the_nvtx_package_path_runs():
    assert not profiling.enabled() or os.environ.get("DEQFUSE_NVTX") == "1"
    f = lambda: 1  # noqa: E731
    if not profiling.enabled():
        assert profiling.wrap(f, "x") is f and isinstance(profiling.range("x"), contextlib.nullcontext)
    nvtx = pytest.importorskip("nvtx")
    was_on = profiling.enabled()
    profiling.set_enabled(True, impl=lambda name: nvtx.annotate(name, domain="deqfuse"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DEQFusion(8, 2, f_max_iter=3, on_nonconvergence="ignore")([torch.randn(2, 8) for _ in range(2)])
    finally:
        profiling.set_enabled(was_on)


def test_version_is_single_sourced():
    import re
    from deqfuse._version import __version__
    assert deqfuse.__version__ == __version__ and re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    changelog = open(os.path.join(root, "CHANGELOG.md")).read()
    assert f"## {__version__}" in changelog
