"""The fusion cell (op: cell forward f(z, x) and its VJP J^T g; C++ also the full backward) on every
implementation against the plain-PyTorch reference (deqfuse/reference/cell.py), which is itself checked
against a literal transcription of the official per-modality loop and against autograd.

Implementations: 'cpp' (torch.ops.deqfuse.cell_forward / cell_vjp / cell_backward, and cell_jac_backward:
the Jacobian loss's backward, against autograd through the reference VJP; CPU float32/float64),
'triton/cublas' (kernels/cell.py) and 'triton/fused' (kernels/cell_fused.py), on a GPU or the CPU
interpreter. Tolerances: deqfuse.testing.TOL per dtype; GroupNorm groups of two channels make every
backward ill-conditioned, so those get the looser TOL_NARROW_GROUPS.
"""
import pytest
import torch
import torch.nn.functional as F

import deqfuse
from deqfuse import DEQFusion, force_cpu_plan
from deqfuse.cell import FusionCell, cell_apply, cell_path, cell_vjp_apply, ext_cell_with_grad
from deqfuse.reference import CellParams, cell_forward, cell_vjp, gn_backward, gn_forward
from deqfuse.reference.cell import cell_jac_backward
from conftest import contractive_layer, make_inputs, make_params, needs_triton, plan_forced, plan_part, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXT = deqfuse.extension_status()[0] is not None
needs_ext = pytest.mark.skipif(not EXT, reason="compiled extension not built")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
TOL_NARROW_GROUPS = {torch.float64: 1e-10, torch.float32: 2e-2}
# cell_jac_backward differentiates through GroupNorm twice: groups of <= 2 values amplify float32 rounding more
JAC_TOL_NARROW_GROUPS = {torch.float64: 1e-9, torch.float32: 5e-2}


# ------------------------------------------------------------------------------------------- reference
def official_cell(z, x, xf, p, groups=4):
    """Literal transcription of DEQ_fusion.py's SimpleResidualBlock / DEQFusionBlock loops."""
    n = x.shape[1]
    outs = []
    for i in range(n):
        out = F.relu(F.group_norm(z[:, i] @ p.w1[i].T + p.b1[i], groups, p.gn1_w[i], p.gn1_b[i]))
        out = out @ p.w2[i].T + p.b2[i] + x[:, i]
        out = F.group_norm(out, groups, p.gn2_w[i], p.gn2_b[i]) + z[:, i]
        outs.append(F.group_norm(F.relu(out), groups, p.gn3_w[i], p.gn3_b[i]))
    zf = z[:, n]
    extracted = [zf * ((o + zf) @ p.wg.T + p.bg) for o in outs]  # gate(inj_feat + x), per modality
    fused = torch.stack(extracted, 0).sum(0) @ p.wf.T + p.bf + xf
    outs.append(F.group_norm(F.relu(fused), groups, p.gnf_w, p.gnf_b))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("B,N,D", [(1, 2, 8), (3, 3, 12), (37, 5, 20)])
def test_cell_matches_official_loop(B, N, D):
    p = make_params(N, D)
    z, x, xf = make_inputs(B, N, D)
    assert rel_err(cell_forward(z, x, xf, p), official_cell(z, x, xf, p)) < 1e-12


@pytest.mark.parametrize("B,N,D", [(1, 2, 8), (5, 3, 12), (9, 4, 36)])
def test_cell_vjp_matches_autograd(B, N, D):
    p = make_params(N, D)
    z, x, xf = make_inputs(B, N, D)
    z.requires_grad_(True)
    out, saved = cell_forward(z, x, xf, p, save=True)
    gbar = torch.randn_like(out)
    ref = torch.autograd.grad(out, z, gbar)[0]
    saved = {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in saved.items()}
    assert rel_err(cell_vjp(gbar, saved, p), ref) < 1e-10


def test_groupnorm_matches_torch_and_autograd():
    y = torch.randn(6, 3, 16, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    out, saved = gn_forward(y, w, b, 4)
    ref = torch.stack([F.group_norm(y[:, i], 4, w[i], b[i]) for i in range(3)], 1)
    assert rel_err(out, ref) < 1e-13
    d = torch.randn_like(out)
    (g_ref,) = torch.autograd.grad(ref, y, d)
    assert rel_err(gn_backward(d, w, tuple(t.detach() for t in saved), 4), g_ref) < 1e-12


# ---------------------------------------------------------------------------------- Triton variants
SIZES = [(1, 2, 8), (3, 3, 20), (37, 5, 12), (5, 4, 36)]  # D = 4k, not powers of two


def _poison(t):
    return t.fill_(float("nan"))


def _vjp(impl):
    """J^T g of a Triton cell variant (TRITON_CELLS: 'cublas' | 'fused'); either reads either's saved dict."""
    return lambda g, saved, p, groups=4: cell_vjp_apply(g, saved, p, groups, "triton", impl)


def _forward(impl):
    """f(z) of a Triton cell variant: cuBLAS GEMMs + row epilogues, or GEMMs with fused epilogues."""
    def f(z, x, xf, p, groups=4, save=False):
        with torch.no_grad():
            return cell_apply(z, x, xf, p, groups, "triton", save, impl)
    return f


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("impl", ["cublas", "fused"])
@pytest.mark.parametrize("B,N,D", SIZES)
def test_forward_and_vjp_match_reference_fp64(B, N, D, impl):
    p = make_params(N, D, device=DEV)
    z, x, xf = make_inputs(B, N, D, device=DEV)
    ref, saved_ref = cell_forward(z, x, xf, p, save=True)
    out, saved = _forward(impl)(z, x, xf, p, save=True)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-10
    assert rel_err(_forward(impl)(z, x, xf, p), ref) < 1e-10          # the save=False kernels too
    gbar = torch.randn_like(ref)
    # 1e-7 in fp64: groups of 2 channels (D=8) make GroupNorm's backward amplify rounding (2.5e-8 seen
    # on an H100); still 1e5x tighter than any fp32 kernel could reach
    assert rel_err(_vjp(impl)(gbar, saved, p), cell_vjp(gbar, saved_ref, p)) < 1e-7
    other = _forward("fused" if impl == "cublas" else "cublas")(z, x, xf, p, save=True)[1]
    assert rel_err(_vjp(impl)(gbar, other, p), cell_vjp(gbar, saved_ref, p)) < 1e-7  # one saved format


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("impl", ["cublas", "fused"])
@pytest.mark.parametrize("B,N,D", [(3, 3, 20), (6, 2, 64)])
def test_fp32_against_fp64_reference(B, N, D, impl, no_tf32):
    p64 = make_params(N, D, device=DEV)
    z, x, xf = make_inputs(B, N, D, device=DEV)
    p32 = type(p64)(*(t.float() for t in p64))
    ref, sref = cell_forward(z, x, xf, p64, save=True)
    out, saved = _forward(impl)(z.float(), x.float(), xf.float(), p32, save=True)
    assert rel_err(out.double(), ref) < 1e-5
    gbar = torch.randn_like(ref)
    assert rel_err(_vjp(impl)(gbar.float(), saved, p32).double(), cell_vjp(gbar, sref, p64)) < 1e-4


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("impl", ["cublas", "fused"])
def test_bf16_inputs_fp32_accumulation(impl):
    """bf16 state and inputs (fp32 parameters, fp32 accumulation) stay within bf16 rounding of fp64."""
    p64 = make_params(3, 64, device=DEV)
    z, x, xf = make_inputs(5, 3, 64, device=DEV)
    ref = cell_forward(z, x, xf, p64)
    p32 = type(p64)(*(t.float() for t in p64))
    out, saved = _forward(impl)(z.bfloat16(), x.bfloat16(), xf.bfloat16(), p32, save=True)
    assert out.dtype == torch.bfloat16 and rel_err(out.double(), ref) < 3e-2
    gbar = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=z.dtype).to(DEV)
    vjp_ref = cell_vjp(gbar, cell_forward(z, x, xf, p64, save=True)[1], p64)
    # bf16 rounding of the saved activations is amplified by three GroupNorm backwards: ~5% here; a
    # wrong kernel is off by O(1) (the interpreter's broken bf16 dot gave 1.2)
    assert rel_err(_vjp(impl)(gbar.bfloat16(), saved, p32).double(), vjp_ref) < 0.1


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("impl", ["cublas", "fused"])
def test_outputs_fully_written(impl):
    """Every output element is written: NaN-poisoned buffers from the caching allocator never leak."""
    p = make_params(3, 20, device=DEV)
    z, x, xf = make_inputs(4, 3, 20, device=DEV)
    for save in (False, True):
        _poison(torch.empty(1 << 14, dtype=torch.float64, device=DEV))
        out = _forward(impl)(z, x, xf, p, save=save)
        tensors = [out[0], *(t for t in out[1].values() if torch.is_tensor(t))] if save else [out]
        assert all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.triton
@needs_triton
def test_variant_is_an_argument_resolved_once_and_limited_by_group_width(monkeypatch):
    """triton_cell picks the Triton variant at construction (default 'cublas', every width); 'fused' takes
    groups up to 256 wide: asked beyond that it raises."""
    from deqfuse.kernels import cell_fused
    assert FusionCell(1024, 2, 4, triton_cell="fused").triton_cell == "fused"
    with pytest.raises(ValueError, match="triton_cell='fused' needs dim / groups <= 256"):
        FusionCell(2048, 2, 4, triton_cell="fused")
    with pytest.raises(ValueError, match="triton_cell must be one of"):
        FusionCell(16, 2, 4, triton_cell="cutlass")
    assert FusionCell(16, 2).triton_cell == "cublas" and FusionCell(2048, 2).triton_cell == "cublas"
    calls = []
    real = cell_fused.cell_forward_fused
    monkeypatch.setattr(cell_fused, "cell_forward_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    cell = FusionCell(16, 2, triton_cell="fused").double().to(DEV)
    p = make_params(2, 16, device=DEV)
    z, x, xf = make_inputs(3, 2, 16, device=DEV)
    with torch.no_grad():
        for name, t in zip(p._fields, p):
            getattr(cell, name).copy_(t)
        out = cell(z, x, xf, "triton")
    assert calls and rel_err(out, cell_forward(z, x, xf, p)) < 1e-10
    with pytest.raises(ValueError, match="exceeds 256"):
        real(*make_inputs(1, 1, 1028, device=DEV), make_params(1, 1028, device=DEV), groups=2)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("gemm", ["cublas", "fused"])
def test_layer_uses_triton_cell_and_matches_reference(gemm):
    torch.manual_seed(0)
    # fixed iteration counts (tol 1e-30): the same algorithm on both backends, so the results agree to
    # rounding whether or not 15 iterations converge (and the interpreter stays fast)
    layers = [contractive_layer(DEQFusion(12, 3, backend=b, f_tol=1e-30, b_tol=1e-30, stop_mode="abs",
                                          f_max_iter=15, b_max_iter=15, on_nonconvergence="ignore",
                                          triton_cell=gemm).double().to(DEV))
              for b in ("reference", "triton")]
    feats = [torch.randn(3, 12, dtype=torch.float64, device=DEV) for _ in range(3)]
    outs, grads = [], []
    for layer in layers:
        out = layer(feats)
        out.square().sum().backward()
        outs.append(out)
        grads.append(torch.cat([q.grad.flatten() for q in layer.parameters()]))
    assert rel_err(outs[1], outs[0]) < 1e-8
    assert rel_err(grads[1], grads[0]) < 1e-7


@pytest.mark.triton
@needs_triton
def test_autotune_wrappers_build_for_every_fused_kernel():
    """The GPU path wraps each fused kernel in triton.autotune (not exercised by the interpreter): the
    key names exist in every kernel's signature and each group width keeps some configs."""
    from deqfuse.kernels import cell_fused as cf
    kernels = [cf._l1_kernel, cf._l2_kernel, cf._gate_kernel, cf._fusion_kernel,
               cf._vjp_q_kernel, cf._vjp_s_kernel, cf._vjp_h_kernel, cf._vjp_z_kernel]
    for k in kernels:
        tuned = cf._autotuned(k, 256)
        assert {"B", "D"} <= set(tuned.keys) and {"BM", "BK", "BN"} <= set(k.arg_names)
    assert all(len(cf._configs(bn)) >= 3 for bn in (16, 64, 128, 256))


@pytest.mark.triton
@needs_triton
def test_autotuned_launch_path_runs_and_matches_reference(monkeypatch, no_tf32):
    """The GPU's launch path (triton.autotune over every config, grid from the chosen config), run on
    the interpreter: fp32 forward with save and the fused VJP against the fp64 reference."""
    from deqfuse.kernels import cell_fused as cf
    monkeypatch.setattr(cf, "_AUTOTUNE_IN_INTERPRETER", True)
    monkeypatch.setattr(deqfuse.backend, "_TRITON_AUTOTUNE", True)
    monkeypatch.setattr(cf, "_TUNED", {})
    p64 = make_params(2, 16, device=DEV)
    z, x, xf = make_inputs(5, 2, 16, device=DEV)
    p32 = type(p64)(*(t.float() for t in p64))
    ref, sref = cell_forward(z, x, xf, p64, save=True)
    out, saved = cf.cell_forward_fused(z.float(), x.float(), xf.float(), p32, save=True)
    gbar = torch.randn_like(ref)
    assert rel_err(out.double(), ref) < 1e-5
    assert rel_err(cf.cell_vjp_fused(gbar.float(), saved, p32).double(), cell_vjp(gbar, sref, p64)) < 1e-4
    assert len(cf._TUNED) == 8  # every kernel went through its autotuner


# ------------------------------------------------------------------------------- C++ (CPU) cell op
SHAPES = [  # (N, B, D, groups): N = 1..5, odd B and D, group widths 2/4/6/8/16/32/64 and a generic one;
    # D = 16 k <= 64 (the AVX-512 GEMM: 1..4 column vectors per tile), D = 8 k <= 128 (the AVX2 one where
    # there is no AVX-512: 16-column panels, an 8-column one for D = 8, 40) and the rest (the BLAS)
    (1, 1, 8, 4), (2, 5, 12, 4), (3, 37, 20, 4), (5, 7, 36, 6), (4, 3, 16, 1), (2, 65, 64, 4),
    (3, 130, 40, 2), (1, 129, 128, 2), (2, 63, 256, 4), (2, 9, 60, 3), (2, 6, 48, 4), (3, 7, 32, 4),
    (1, 11, 80, 5),
    # AVX2 GroupNorm (groups % 4 == 0, width % 8 == 0), its group width compiled in for 8/16/32/64 and read
    # at run time otherwise (width 24), 4-row groups and a remainder
    (2, 13, 128, 4), (2, 9, 96, 4)]


def reference_grads(z, x, xf, p, groups, gout):
    leaves = [t.clone().requires_grad_() for t in (z, x, xf, *p)]
    out = cell_forward(*leaves[:3], CellParams(*leaves[3:]), groups)
    out.backward(gout)
    return out.detach(), [t.grad for t in leaves]


@needs_ext
@pytest.mark.parametrize("N,B,D,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_vjp_backward_match_reference(N, B, D, groups, dtype):
    p64 = make_params(N, D)
    z64, x64, xf64 = make_inputs(B, N, D)
    g64 = torch.randn(B, N + 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out_r, saved_r = cell_forward(z64, x64, xf64, p64, groups, save=True)
    vjp_r = cell_vjp(g64, saved_r, p64, groups)
    _, grads_r = reference_grads(z64, x64, xf64, p64, groups, g64)
    p = [t.to(dtype) for t in p64]
    z, x, xf, g = (t.to(dtype) for t in (z64, x64, xf64, g64))
    tol = TOL[dtype]
    vtol = TOL_NARROW_GROUPS[dtype] if D // groups <= 2 else tol
    out_n, none = torch.ops.deqfuse.cell_forward(z, x, xf, p, groups, False)
    out, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, groups, True)
    assert none == [] and len(saved) == 13
    assert rel_err(out_n, out_r) < tol and torch.equal(out_n, out)
    assert rel_err(torch.ops.deqfuse.cell_vjp(g, saved, p, groups), vjp_r) < vtol
    add = torch.randn_like(g)
    assert rel_err(torch.ops.deqfuse.cell_vjp(g, saved, p, groups, add), vjp_r + add.double()) < vtol
    dz, dx, dxf, dp = torch.ops.deqfuse.cell_backward(g, z, saved, p, groups)
    for name, a, r in zip(["z", "x", "xf"] + list(CellParams._fields), [dz, dx, dxf, *dp], grads_r):
        assert a.shape == r.shape and a.dtype == dtype, name
        assert rel_err(a, r) < vtol, name
    # the Jacobian loss's backward: d<wbar, J^T v> w.r.t. everything, against autograd through cell_vjp
    w64 = torch.randn(B, N + 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    jz, jx, jxf, jp = cell_jac_backward(g64, w64, z64, x64, xf64, p64, groups)
    got = torch.ops.deqfuse.cell_jac_backward(g, w64.to(dtype), z, saved, p, groups)
    jtol = JAC_TOL_NARROW_GROUPS[dtype] if D // groups <= 2 else tol
    for name, a, r in zip(["z", "x", "xf"] + list(CellParams._fields), [*got[:3], *got[3]], [jz, jx, jxf, *jp]):
        assert a.shape == r.shape and a.dtype == dtype, name
        assert rel_err(a, r) < jtol, name


# (N, B, D): 16-column panels and an 8-column one (D = 40, 8), row tiles of 6 and their remainders (blocks
# of 33, 37, 13, 35, 9 rows), D past the tiles' auto range (128 on AVX-512 CPUs, 256), D % 8 != 0 (the BLAS)
GEMM_SHAPES = [(2, 66, 64), (3, 37, 40), (1, 13, 8), (2, 70, 128), (2, 9, 256), (1, 7, 20)]


def _gemm_results():
    """{(N, B, D): (kernel name the op reports, float32 [forward, VJP + z, cell_backward's grads])} under the
    kernel plan in force."""
    out = {}
    for N, B, D in GEMM_SHAPES:
        p = [t.float() for t in make_params(N, D)]
        z, x, xf = (t.float() for t in make_inputs(B, N, D))
        g = torch.randn(B, N + 1, D, generator=torch.Generator().manual_seed(5))
        f, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, 4, True)
        v = torch.ops.deqfuse.cell_vjp(g, saved, p, 4, z)
        dz, dx, dxf, dp = torch.ops.deqfuse.cell_backward(g, z, saved, p, 4)
        out[(N, B, D)] = (plan_part("gemm", D), [f, v, dz, dx, dxf, *dp])
    return out


@needs_ext
def test_gemm_kernels_agree_with_the_reference_and_the_tile_kernels_with_each_other():
    """The cell ops' float32 GEMM kernels (csrc/cpu/gemm_small.h), each forced by force_cpu_plan(gemm=) where this
    CPU has it: forward, VJP and full backward within float32 tolerance of the float64 reference (no kernel is
    held to another's summation order); 'auto' picks by the stated rules."""
    cap = torch.backends.cpu.get_cpu_capability()
    has = {"avx512": cap == "AVX512", "avx2": cap in ("AVX2", "AVX512"), "blas": True}
    res = {}
    for k in ("auto", "avx512", "avx2", "blas"):
        with force_cpu_plan(gemm=k):
            res[k] = _gemm_results()
    for N, B, D in GEMM_SHAPES:
        p64, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
        g = torch.randn(B, N + 1, D, generator=torch.Generator().manual_seed(5)).double()
        ref, saved = cell_forward(z, x, xf, p64, 4, save=True)
        _, grads = reference_grads(z, x, xf, p64, 4, g)
        want = [ref, cell_vjp(g, saved, p64, 4) + z, *grads]
        for kernel, by_shape in res.items():
            name, got = by_shape[(N, B, D)]
            width_ok = {"avx512": D % 16 == 0, "avx2": D % 8 == 0, "blas": True}
            if kernel != "auto":  # forced: any D the kernel's vector width divides, on a CPU that has it
                assert name == (kernel if has[kernel] and width_ok[kernel] else "blas"), (kernel, D)
            else:
                auto = ("avx512" if has["avx512"] and D % 16 == 0 and D <= 64 else
                        "avx2" if has["avx2"] and not has["avx512"] and D % 8 == 0 and D <= 128 else "blas")
                assert name == auto, D
            vtol = TOL_NARROW_GROUPS[torch.float32] if D // 4 <= 2 else 1e-4
            for i, (a, r) in enumerate(zip(got, want)):
                assert a.dtype == torch.float32 and rel_err(a, r) < (TOL[torch.float32] if i == 0 else vtol), \
                    (kernel, name, N, B, D, i)


@needs_ext
def test_cpu_plan_and_the_suites_cpu_plan_option_check_their_arguments():
    import conftest
    for args, match in [(("64",), "dim must be an int"), ((64, 4, torch.float32, -1), "batch must be >= 0"),
                        ((64, 5), r"groups \(5\) must divide dim \(64\)"), ((64, 4, torch.bfloat16), "dtype must be")]:
        with pytest.raises(ValueError, match=match):
            deqfuse.cpu_plan(*args)
    assert conftest._parse_cpu_plan("rows=base,gemm=blas,chunk=8") == dict(rows="base", gemm="blas", chunk=8)
    for bad, match in [("bogus", "is not PART=NAME"), ("rows=foo", "rows must be one of"),
                       ("chunk=-1", "chunk must be a whole number")]:
        with pytest.raises(pytest.UsageError, match=match):
            conftest._parse_cpu_plan(bad)


@needs_ext
def test_force_cpu_plan_checks_its_arguments_restores_the_plan_and_retired_variables_warn(monkeypatch):
    from deqfuse import backend
    with pytest.raises(ValueError, match="gemm must be one of"):
        with force_cpu_plan(gemm="avx3"):
            pass
    with pytest.raises(ValueError, match="chunk must be an int >= 0"):
        with force_cpu_plan(chunk=-1):
            pass
    before = deqfuse._C.get_cpu_plan()
    with pytest.raises(KeyError):
        with force_cpu_plan(gemm="blas", rows="ymm", layout="rows", chunk=24):
            assert deqfuse._C.get_cpu_plan() == dict(gemm="blas", rows="ymm", layout="rows", chunk=24)
            assert backend.cpu_plan(64, 4) == "gemm=blas rows=ymm layout=rows chunk=24"
            raise KeyError  # the previous plan comes back on the way out of an error too
    assert deqfuse._C.get_cpu_plan() == before
    if not plan_forced() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert backend.cpu_plan(64, 4, torch.float64).startswith("gemm=blas rows=ymm layout=rows")
    monkeypatch.setenv("DEQFUSE_CPU_GEMM", "avx2")
    monkeypatch.setenv("DEQFUSE_DIST_TIMEOUT", "5")
    backend.extension_status.cache_clear()
    try:
        with pytest.warns(RuntimeWarning) as got:
            assert backend.extension_status()[0] is not None
        msgs = [str(w.message) for w in got]
        assert any(m.startswith("DEQFUSE_CPU_GEMM is no longer read: use deqfuse.force_cpu_plan(gemm=") for m in msgs)
        assert any(m.startswith("DEQFUSE_DIST_TIMEOUT is no longer read: use the --dist-timeout option") for m in msgs)
        assert all(w.filename == "<environment>" for w in got)
    finally:
        monkeypatch.delenv("DEQFUSE_CPU_GEMM")
        monkeypatch.delenv("DEQFUSE_DIST_TIMEOUT")
        backend.extension_status.cache_clear()
        backend.extension_status()


# (N, B, D, groups, dtype): group widths 16 (the AVX-512 GroupNorm), 8 and 32 (AVX2), 12 (groups of 3: the
# generic GroupNorm, whose omp simd reductions follow the vector width) and float64
ROWS_SHAPES = [(2, 37, 64, 4, "float32"), (3, 21, 32, 4, "float32"), (1, 11, 128, 4, "float32"),
               (2, 9, 36, 3, "float32"), (2, 19, 64, 4, "float64")]


def _rows_results():
    """{(N, B, D): (row variant the op reports, every output of the cell ops and both whole solves)} under the
    kernel plan in force."""
    from deqfuse.solvers import Results
    out, ops = {}, torch.ops.deqfuse
    for N, B, D, G, dt in ROWS_SHAPES:
        dt = getattr(torch, dt)
        p = [t.to(dt) for t in make_params(N, D)]
        z, x, xf = (t.to(dt) for t in make_inputs(B, N, D))
        g = torch.randn(B, N + 1, D, generator=torch.Generator().manual_seed(5)).to(dt)
        f, saved = ops.cell_forward(z, x, xf, p, G, True)
        res = [f, ops.cell_forward(z, x, xf, p, G, False)[0], ops.cell_vjp(g, saved, p, G, z)]
        dz, dx, dxf, dp = ops.cell_backward(g, z, saved, p, G)
        jz, jx, jxf, jp = ops.cell_jac_backward(g, 0.3 * z, z, saved, p, G)
        res += [dz, dx, dxf, *dp, jz, jx, jxf, *jp]
        z0 = torch.zeros(B, (N + 1) * D, dtype=dt)
        for solve, args in ((ops.anderson_cell_solve, (z0, x, xf)),
                            (ops.anderson_vjp_solve, (z0, g.reshape(B, -1), saved))):
            r = Results(z0, 12)
            solve(*args, p, G, *r.buffers(), 5, 1.0, 1e-4, 1e-30, True, 12)
            res += list(r.buffers())
        out[(N, B, D)] = (plan_part("rows", D, G), res)
    return out


SOLVE_OUTPUTS = 6  # len(Results(...).buffers())


@needs_ext
def test_row_pass_variants_agree():
    """The C++ cell's row passes (forward_block / vjp_block), one file per instruction set (csrc/cpu/rows_*.cpp),
    each forced by force_cpu_plan(rows=): x86-64-v4's 512-bit vectors (zmm), x86-64-v3's 256-bit ones (ymm) and
    the build's baseline (base). The cell ops, the Jacobian loss's backward and both whole solves agree within the
    dtype's rounding with the float64 reference's check (the default plan, checked elsewhere); a forced
    instruction set the CPU lacks falls back to the plan's own."""
    cap = torch.backends.cpu.get_cpu_capability()
    runs = {"zmm": cap == "AVX512", "ymm": cap in ("AVX2", "AVX512"), "base": True}
    res = {}
    for rows in runs:
        with force_cpu_plan(rows=rows):
            res[rows] = _rows_results()
    default = _rows_results()
    for N, B, D, G, dt in ROWS_SHAPES:
        for rows, has in runs.items():
            assert res[rows][(N, B, D)][0] == (rows if has else default[(N, B, D)][0]), (rows, N, B, D)
            got, want = res[rows][(N, B, D)][1], default[(N, B, D)][1]
            n_ops = len(got) - 2 * SOLVE_OUTPUTS  # the cell ops' outputs, then both solves' buffers
            for i, (a, b) in enumerate(zip(got, want)):
                if not a.is_floating_point():  # flags, step counts: a sample at its tolerance's edge may tip
                    continue
                a, b = a.nan_to_num(7.0).double(), b.nan_to_num(7.0).double()
                # the solves stop at 12 steps, some samples short of their tolerance: there the roundings of two
                # plans (under --cpu-plan the other parts differ too) grow with each step
                tol = (1e-3 if i < n_ops else 1e-2) if dt == "float32" else 1e-9
                assert (a - b).abs().max() <= tol * (1 + b.abs().max()), (rows, N, B, D, G, dt, i)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_threads_or_blocking(threads):
    """Rows are split into blocks per thread count; every row's result stays the same (float64)."""
    N, B, D = 2, 203, 32
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, True)
        v = torch.ops.deqfuse.cell_vjp(z, saved, list(p), 4)
    finally:
        torch.set_num_threads(old)
    ref, saved_r = cell_forward(z, x, xf, p, 4, save=True)
    assert rel_err(out, ref) < 1e-13 and rel_err(v, cell_vjp(z, saved_r, p, 4)) < 1e-12
    # a sub-batch (another blocking) gives the same rows
    sub = torch.arange(5, 180, 3)
    out_s = torch.ops.deqfuse.cell_forward(z[sub], x[sub], xf[sub], list(p), 4, False)[0]
    assert rel_err(out_s, out[sub]) < 1e-13


@needs_ext
def test_rows_are_independent_and_nan_stays_in_its_row():
    """NaN propagates like the reference (ReLU keeps NaN, as torch.relu does) and only within its row."""
    N, B, D = 2, 9, 16
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    z[4, 1, 3] = float("nan")
    out = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, False)[0]
    ref = cell_forward(z, x, xf, p, 4)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[4]).any()
    keep = [b for b in range(B) if b != 4]
    assert torch.isfinite(out[keep]).all()


@needs_ext
def test_non_contiguous_inputs():
    N, B, D = 3, 6, 12
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)   # same values, other strides
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    w1t = p.w1.transpose(1, 2).contiguous().transpose(1, 2)
    pt = list(p._replace(w1=w1t))
    assert not zt.is_contiguous() and not w1t.is_contiguous()
    assert rel_err(torch.ops.deqfuse.cell_forward(zt, xt, xf, pt, 4, False)[0], cell_forward(z, x, xf, p, 4)) < 1e-13


@pytest.mark.parametrize("bad,match", [
    (lambda z, x, xf, p: (z[:, :1], x, xf, p, 4), r"z must hold N >= 1"),
    (lambda z, x, xf, p: (z, x[:, :1], xf, p, 4), r"x must have shape \[5, 2, 12\]"),
    (lambda z, x, xf, p: (z, x, xf.float(), p, 4), r"xf must have z's dtype"),
    (lambda z, x, xf, p: (z, x, xf, p[:15], 4), r"params must hold the 16"),
    (lambda z, x, xf, p: (z, x, xf, p[:3] + [p[3][:, :5]] + p[4:], 4), r"params\[3\] \(b2\) must have shape \[2, 12\]"),
    (lambda z, x, xf, p: (z, x, xf, p, 5), r"groups \(5\) must divide D \(12\)"),
    (lambda z, x, xf, p: (z.bfloat16(), x, xf, p, 4), r"z must be float32 or float64"),
])
@needs_ext
def test_forward_errors_name_the_argument(bad, match):
    p, (z, x, xf) = make_params(2, 12), make_inputs(5, 2, 12)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deqfuse.cell_forward(*bad(z, x, xf, list(p)), False)


@needs_ext
def test_vjp_and_backward_errors_name_the_argument():
    p, (z, x, xf) = make_params(2, 12), make_inputs(5, 2, 12)
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, True)
    with pytest.raises(RuntimeError, match="saved must hold the 13"):
        torch.ops.deqfuse.cell_vjp(z, saved[:12], list(p), 4)
    with pytest.raises(RuntimeError, match=r"saved\[5\] must have shape \[2, 5, 12\]"):
        torch.ops.deqfuse.cell_vjp(z, saved[:5] + [saved[5][:, :4]] + saved[6:], list(p), 4)
    with pytest.raises(RuntimeError, match="add must be a CPU tensor of gbar's shape"):
        torch.ops.deqfuse.cell_vjp(z, saved, list(p), 4, z[:2])
    with pytest.raises(RuntimeError, match="cell_backward: z .* must be a CPU tensor of gbar's shape"):
        torch.ops.deqfuse.cell_backward(z, z[:2], saved, list(p), 4)
    for args, name in [((z[:2], z), "wbar"), ((z, z.float()), "z")]:
        with pytest.raises(RuntimeError, match=f"cell_jac_backward: {name} must be a CPU tensor of v's shape"):
            torch.ops.deqfuse.cell_jac_backward(z, *args, saved, list(p), 4)
    with pytest.raises(RuntimeError, match="cell_jac_backward: saved must hold the 13"):
        torch.ops.deqfuse.cell_jac_backward(z, z, z, saved[:12], list(p), 4)
    with pytest.raises(RuntimeError, match=r"cell_jac_backward: v must be \[B, N\+1, D\]"):
        torch.ops.deqfuse.cell_jac_backward(z[0], z, z, saved, list(p), 4)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_floor_timer_runs_both_kernels_and_checks_its_arguments(dtype):
    """deqfuse._C.cell_gemm_floor_seconds (benchmarks/bench_small.py's floor): a positive time per cell
    evaluation with the ops' GEMM kernels and with the BLAS; bad arguments raise with the function's name."""
    ext = deqfuse.extension_status()[0]
    p = list(make_params(2, 16, dtype))
    z = torch.randn(37, 3 * 16, dtype=dtype)
    assert ext.cell_gemm_floor_seconds(z, p, 3) > 0 and ext.cell_gemm_floor_seconds(z, p, 3, True) > 0
    with pytest.raises(RuntimeError, match=r"cell_gemm_floor_seconds: z must be \[B, \(N\+1\) D\]"):
        ext.cell_gemm_floor_seconds(z[:, :40], p, 3)
    with pytest.raises(RuntimeError, match="reps must be >= 1"):
        ext.cell_gemm_floor_seconds(z, p, 0)
    with pytest.raises(RuntimeError, match="must have z's dtype"):
        ext.cell_gemm_floor_seconds(z.to(torch.float64 if dtype == torch.float32 else torch.float32), p, 1)


@needs_ext
def test_ops_are_not_differentiable_through_autograd_but_the_wrapper_is_twice():
    p = [t.requires_grad_() for t in make_params(2, 8)]
    z, x, xf = make_inputs(3, 2, 8)
    out, _ = torch.ops.deqfuse.cell_forward(z, x, xf, p, 4, False)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()
    # the autograd wrapper: gradcheck against finite differences (float64), every input
    zr, xr, xfr = (t.clone().requires_grad_() for t in (z, x, xf))
    pr = [t.detach().clone().requires_grad_() for t in p]
    assert torch.autograd.gradcheck(lambda z, x, xf, *q: ext_cell_with_grad(z, x, xf, list(q), 4)[0],
                                    (zr, xr, xfr, *pr), atol=1e-7, rtol=1e-6)
    # twice differentiable: a create_graph backward differentiates the reference cell (gradgradcheck; group
    # width 8: the width-2 groups above are too ill-conditioned for second differences)
    p2 = [t.detach().requires_grad_() for t in make_params(2, 16)]
    z2, x2, xf2 = make_inputs(3, 2, 16)
    torch.manual_seed(0)
    assert torch.autograd.gradgradcheck(lambda z, w1: ext_cell_with_grad(z, x2, xf2, [w1] + p2[1:], 2)[0],
                                        (z2.requires_grad_(), p2[0]), atol=1e-6, rtol=1e-5)


@needs_ext
def test_cell_path_choice():
    z = torch.zeros(2, 3, 8)
    assert cell_path("auto", z) == "ext" and cell_path("cuda", z.double()) == "ext"
    assert cell_path("auto", z.bfloat16()) == "reference"  # the C++ op is float32/float64 only
    assert cell_path("reference", z) == "reference"


@needs_ext
@pytest.mark.parametrize("grad,jac_reg", [("implicit", 0), ("phantom", 0), ("unrolled", 0), ("implicit", 2),
                                          ("phantom", 1)])
def test_layer_on_the_cpp_path_matches_the_reference_path(grad, jac_reg):
    """DEQFusion with backend='auto' (C++ cell forward, VJP and backward on the CPU; with jac_reg, the
    C++ Jacobian loss) gives the outputs and every gradient of backend='reference' (float64, fixed
    iterations; the Jacobian loss's probes from the same RNG state)."""
    kw = dict(f_max_iter=40, b_max_iter=40, f_tol=1e-12, b_tol=1e-12, stop_mode="abs", grad=grad,
              on_nonconvergence="ignore", jac_reg=jac_reg)
    layers = [contractive_layer(DEQFusion(12, 3, backend=b, **kw).double()) for b in ("auto", "reference")]
    feats = [torch.randn(7, 12, dtype=torch.float64) for _ in range(3)]
    res = []
    for ly in layers:
        xs = [t.clone().requires_grad_() for t in feats]
        torch.manual_seed(11)
        out, info = ly(xs, return_info=True)
        assert (info.jac_loss > 0) == (jac_reg > 0)
        ((out * torch.linspace(-1, 1, 12, dtype=torch.float64)).sum() + 3 * info.jac_loss).backward()
        res.append([out.detach(), info.jac_loss.detach()] + [q.grad for q in ly.parameters()] + [t.grad for t in xs])
    for a, b in zip(*res):
        assert rel_err(a, b) < 1e-10


@needs_ext
def test_jacobian_loss_runs_on_the_cpp_ops_and_equals_the_double_backward():
    """ext_jacobian_reg (C++ VJP + cell_jac_backward) gives implicit.jacobian_reg's value (same probes from
    the same RNG state) and its gradients (autograd's double backward through the reference cell), float64;
    and the layer's Jacobian loss is the C++ one on the C++ path."""
    from deqfuse.cell import ext_jacobian_reg
    from deqfuse.implicit import jacobian_reg
    B, N, D = 7, 3, 16
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    leaves = [t.clone().requires_grad_() for t in (x, xf, *p)]
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, True)
    torch.manual_seed(5)
    got = ext_jacobian_reg(z, *leaves[:2], leaves[2:], 4, saved, 2)
    g_got = torch.autograd.grad(got, leaves)
    torch.manual_seed(5)
    zz = z.clone().requires_grad_()
    ref = jacobian_reg(cell_forward(zz, *leaves[:2], CellParams(*leaves[2:])), zz, 2)
    g_ref = torch.autograd.grad(ref, leaves, allow_unused=True)
    assert rel_err(got, ref) < 1e-13
    for a, r, t in zip(g_got, g_ref, leaves):
        assert rel_err(a, torch.zeros_like(t) if r is None else r) < 1e-11
    ly = DEQFusion(8, 2, jac_reg=1, f_max_iter=8, b_max_iter=8, on_nonconvergence="ignore").double()
    out, info = ly([torch.randn(3, 8, dtype=torch.float64) for _ in range(2)], return_info=True)
    assert type(info.jac_loss.grad_fn).__name__ == "_ExtJacLossBackward"
    (out.sum() + info.jac_loss).backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in ly.parameters())


@needs_ext
def test_backward_takes_any_strided_state():
    """cell_backward reads z through raw pointers: a non-contiguous z gives the contiguous z's gradients."""
    N, B, D = 2, 9, 16
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), 4, True)
    g = torch.randn_like(z)
    z_strided = z.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (D (N+1), 1, N+1)
    assert not z_strided.is_contiguous()
    got = torch.ops.deqfuse.cell_backward(g, z_strided, saved, list(p), 4)
    ref = torch.ops.deqfuse.cell_backward(g, z, saved, list(p), 4)
    for a, b in zip([*got[:3], *got[3]], [*ref[:3], *ref[3]]):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("N,B,D", [(2, 70, 64), (1, 19, 40), (3, 9, 24)])
def test_backward_in_tiles_gives_the_same_gradients_on_any_thread_count(N, B, D):
    """Where the float32 cell runs in the tile kernels, cell_backward's weight gradients (gemm_tn_avx2) and
    its bias / affine column sums add the batch rows in order whatever slice of columns a thread owns: the
    same floats on 1, 2 and 3 threads. Elsewhere (the BLAS) only within float32 rounding."""
    p = [t.float() for t in make_params(N, D)]
    z, x, xf = (t.float() for t in make_inputs(B, N, D))
    g = torch.randn(B, N + 1, D, generator=torch.Generator().manual_seed(3))
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, 4, True)
    before, res = torch.get_num_threads(), []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            dz, dx, dxf, dp = torch.ops.deqfuse.cell_backward(g, z, saved, p, 4)
            res.append([dz, dx, dxf, *dp])
    finally:
        torch.set_num_threads(before)
    tiles = plan_part("gemm", D) != "blas"
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert torch.equal(a, b) if tiles else rel_err(a, b) < 1e-5


@needs_ext
def test_cell_ops_pass_opcheck():
    """Schemas, fake kernels (deqfuse/ops.py: torch.compile traces through them) and autograd registration
    of the C++ cell ops agree with the real kernels (torch.library.opcheck)."""
    p, (z, x, xf) = list(make_params(2, 16)), make_inputs(5, 2, 16)
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, 4, True)
    v = torch.randn_like(z)
    ops = torch.ops.deqfuse
    for op, args in [(ops.cell_forward.default, (z, x, xf, p, 4, True)), (ops.cell_vjp.default, (v, saved, p, 4, z)),
                     (ops.cell_backward.default, (v, z, saved, p, 4)),
                     (ops.cell_jac_backward.default, (v, v, z, saved, p, 4))]:
        res = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        assert set(res.values()) == {"SUCCESS"}, (op, res)


@needs_ext
def test_jacobian_loss_gradient_passes_gradcheck():
    """The C++ Jacobian loss's gradient (cell_jac_backward) against finite differences of the loss itself
    (float64): the saved tensors recomputed at every perturbed point, the probes fixed."""
    from deqfuse.cell import ext_jacobian_reg
    B, N, D = 3, 2, 8
    p, (z, x, xf) = make_params(N, D), make_inputs(B, N, D)

    def loss(x, xf, w1, gn2_w, wf):
        q = list(p)
        q[0], q[6], q[12] = w1, gn2_w, wf
        saved = torch.ops.deqfuse.cell_forward(z, x.detach(), xf.detach(), [t.detach() for t in q], 2, True)[1]
        torch.manual_seed(3)  # the same probes at every point
        return ext_jacobian_reg(z, x, xf, q, 2, saved, 1)
    args = [t.clone().requires_grad_() for t in (x, xf, p.w1, p.gn2_w, p.wf)]
    assert torch.autograd.gradcheck(loss, args, eps=1e-6, atol=1e-7, rtol=1e-5)




@needs_ext
@pytest.mark.parametrize("D", [64, 32])
def test_groupnorm_widths_16_and_8_match_float64(D):
    """The C++ cell's float32 GroupNorm at group widths 16 and 8 (D = 64 / 32, 4 groups: the kernels this CPU
    runs) against GN1 computed in float64 from the same float32 inputs: the saved 1/std [B, G] and normalised
    values [B, D] of modality 0 within float32 rounding (a kernel may sum in any order)."""
    B, N, G = 9, 1, 4  # 9 rows: the kernels' 4-row steps and a single row
    p = [t.float() for t in make_params(N, D)]
    z, x, xf = (t.float() for t in make_inputs(B, N, D))
    _, saved = torch.ops.deqfuse.cell_forward(z, x, xf, p, G, True)
    yh1, rs1 = saved[0][0], saved[1][0]
    a = (z[:, 0].double() @ p[0][0].double().T + p[1][0].double()).view(B, G, D // G)
    d = a - a.mean(-1, keepdim=True)
    r = 1.0 / torch.sqrt(d.square().mean(-1) + 1e-5)
    assert rel_err(rs1, r) < 1e-5
    assert rel_err(yh1, (d * r[..., None]).view(B, D)) < 1e-5


@needs_ext
def test_a_build_from_other_sources_is_refused_with_the_rebuild_command(monkeypatch):
    """A checkout whose csrc/ changed after the build (git pull without a rebuild): no AttributeError from a
    missing binding but one warning naming the rebuild, and the reference path."""
    from deqfuse import backend
    assert deqfuse._C.sources_sha() == backend.sources_sha(str(__import__("pathlib").Path(deqfuse.__file__).parents[1]))
    monkeypatch.setattr(backend, "sources_sha", lambda root: "0" * 15)
    backend.extension_status.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"stale: .*pip install --no-build-isolation -e \."):
            ext, why = backend.extension_status()
        assert ext is None and why.startswith("stale")
    finally:
        monkeypatch.undo()
        backend.extension_status.cache_clear()
        backend.extension_status()
