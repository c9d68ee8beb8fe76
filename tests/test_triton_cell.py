"""Triton cell forward and VJP against the reference (TRITON_INTERPRET=1 on the CPU)."""
import pytest
import torch

from deqfuse.reference import cell_forward, cell_vjp
from conftest import make_inputs, make_params, needs_triton, rel_err

pytestmark = [pytest.mark.triton, needs_triton]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(1, 2, 8), (3, 3, 20), (37, 5, 12), (5, 4, 36)]  # D = 4k, not powers of two


def _poison(t):
    return t.fill_(float("nan"))


def _vjp(impl):
    if impl == "fused":
        from deqfuse.kernels.cell_fused import cell_vjp_fused
        return cell_vjp_fused
    from deqfuse.kernels.cell import cell_vjp_triton
    return cell_vjp_triton


def _forward(impl):
    """The two Triton cell forwards: cuBLAS GEMMs + row epilogues, or GEMMs with fused epilogues."""
    if impl == "fused":
        from deqfuse.kernels.cell_fused import cell_forward_fused
        return cell_forward_fused
    from deqfuse.kernels.cell import cell_forward_triton
    return cell_forward_triton


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


@pytest.mark.parametrize("impl", ["cublas", "fused"])
@pytest.mark.parametrize("B,N,D", [(3, 3, 20), (6, 2, 64)])
def test_fp32_against_fp64_reference(B, N, D, impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    p64 = make_params(N, D, device=DEV)
    z, x, xf = make_inputs(B, N, D, device=DEV)
    p32 = type(p64)(*(t.float() for t in p64))
    ref, sref = cell_forward(z, x, xf, p64, save=True)
    out, saved = _forward(impl)(z.float(), x.float(), xf.float(), p32, save=True)
    assert rel_err(out.double(), ref) < 1e-5
    gbar = torch.randn_like(ref)
    assert rel_err(_vjp(impl)(gbar.float(), saved, p32).double(), cell_vjp(gbar, sref, p64)) < 1e-4


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


def test_fused_path_selected_by_env_and_limited_by_group_width(monkeypatch):
    from deqfuse import cell as cell_mod
    from deqfuse.kernels import cell_fused
    calls = []
    real = cell_fused.cell_forward_fused
    monkeypatch.setattr(cell_fused, "cell_forward_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("DEQFUSE_CELL_GEMM", "fused")
    assert cell_mod.cell_gemm(1024, 4) == "fused" and cell_mod.cell_gemm(2048, 4) == "cublas"  # 512-wide groups
    p = make_params(2, 16, device=DEV)
    z, x, xf = make_inputs(3, 2, 16, device=DEV)
    with torch.no_grad():
        out, saved = cell_mod.cell_apply(z, x, xf, p, 4, backend="triton", save=True)
    assert calls and rel_err(out, cell_forward(z, x, xf, p)) < 1e-10
    vjp_calls = []
    real_vjp = cell_fused.cell_vjp_fused
    monkeypatch.setattr(cell_fused, "cell_vjp_fused", lambda *a, **k: vjp_calls.append(1) or real_vjp(*a, **k))
    gbar = torch.randn_like(z)
    vjp = cell_mod.cell_vjp_apply(gbar, saved, p, 4, backend="triton")
    assert vjp_calls and rel_err(vjp, cell_vjp(gbar, cell_forward(z, x, xf, p, save=True)[1], p)) < 1e-10
    monkeypatch.setenv("DEQFUSE_CELL_GEMM", "cutlass")
    with pytest.raises(ValueError, match="DEQFUSE_CELL_GEMM"):
        cell_mod.cell_gemm(16, 4)
    with pytest.raises(ValueError, match="exceeds 256"):
        real(*make_inputs(1, 1, 1028, device=DEV), make_params(1, 1028, device=DEV), groups=2)


@pytest.mark.parametrize("gemm", ["cublas", "fused"])
def test_layer_uses_triton_cell_and_matches_reference(gemm, monkeypatch):
    monkeypatch.setenv("DEQFUSE_CELL_GEMM", gemm)
    from deqfuse import DEQFusion
    from conftest import contractive_layer
    torch.manual_seed(0)
    # fixed iteration counts (tol 1e-30): the same algorithm on both backends, so the results agree to
    # rounding whether or not 15 iterations converge (and the interpreter stays fast)
    layers = [contractive_layer(DEQFusion(12, 3, backend=b, f_tol=1e-30, b_tol=1e-30, stop_mode="abs",
                                          f_max_iter=15, b_max_iter=15, on_nonconvergence="ignore").double().to(DEV))
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


def test_autotuned_launch_path_runs_and_matches_reference(monkeypatch):
    """The GPU's launch path (triton.autotune over every config, grid from the chosen config), run on
    the interpreter: fp32 forward with save and the fused VJP against the fp64 reference."""
    from deqfuse.kernels import cell_fused as cf
    monkeypatch.setattr(cf, "_AUTOTUNE_IN_INTERPRETER", True)
    monkeypatch.setenv("DEQFUSE_AUTOTUNE", "1")
    monkeypatch.setattr(cf, "_TUNED", {})
    torch.backends.cuda.matmul.allow_tf32 = False
    p64 = make_params(2, 16, device=DEV)
    z, x, xf = make_inputs(5, 2, 16, device=DEV)
    p32 = type(p64)(*(t.float() for t in p64))
    ref, sref = cell_forward(z, x, xf, p64, save=True)
    out, saved = cf.cell_forward_fused(z.float(), x.float(), xf.float(), p32, save=True)
    gbar = torch.randn_like(ref)
    assert rel_err(out.double(), ref) < 1e-5
    assert rel_err(cf.cell_vjp_fused(gbar.float(), saved, p32).double(), cell_vjp(gbar, sref, p64)) < 1e-4
    assert len(cf._TUNED) == 8  # every kernel went through its autotuner
