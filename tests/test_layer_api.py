"""DEQFusion as a building block of a user's model: raw encoder outputs of any width and scale (in_dims,
input normalisation, the contractive init), structured inputs with masks, the info objects, warnings
and errors, optimiser groups."""
import threading
import warnings

import pytest
import torch

import deqfuse
from deqfuse import ConvergenceError, ConvergenceWarning, DEQFusion
from deqfuse.layers import INPUT_GAIN, OUT_GAIN
from deqfuse.testing import contractive_layer, rel_err


def raw(B, widths, scales, seed=0, lead=()):
    """Encoder-like outputs: per modality an offset and a scale, shape [B, *lead, d]."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, *lead, d, generator=g) + 0.5) * s for d, s in zip(widths, scales)]


@pytest.mark.parametrize("scales", [(0.05, 20.0), (20.0, 0.05), (1.0, 1.0)])
def test_raw_features_of_any_width_and_scale_converge_at_init(scales):
    """in_dims projects, input_norm normalises: every row converges at the default tolerance at init, for
    several seeds, whatever the encoders' output scale (RMS 0.05 to 20)."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = DEQFusion(64, 2, in_dims=[48, 32]).eval()
        with torch.no_grad():
            out, info = layer(raw(128, [48, 32], scales, seed), return_info=True)
        assert out.shape == (128, 64) and info.forward_stats.all_converged, (seed, info)
        assert info.forward_stats.summary()["mean_nstep"] < 20


@pytest.mark.parametrize("kind", ["zeros", "constant", "one_missing", "tiny"])
def test_zero_constant_or_missing_modalities_converge_at_init(kind):
    """A missing modality fed as zeros (or a constant, or features far below LayerNorm's eps) still converges:
    the input LayerNorms' biases inject a signal."""
    for D, N, seed in ((64, 2, 0), (32, 3, 1), (128, 2, 2)):
        torch.manual_seed(seed)
        layer = DEQFusion(D, N).eval()
        g = torch.Generator().manual_seed(seed)
        f = [torch.randn(32, D, generator=g) for _ in range(N)]
        if kind == "zeros":
            f = [torch.zeros(32, D) for _ in range(N)]
        elif kind == "constant":
            f = [torch.full((32, D), 3.0) for _ in range(N)]
        elif kind == "one_missing":
            f[-1] = torch.zeros(32, D)
        else:
            f = [t * 1e-6 for t in f]
        with torch.no_grad():
            _, info = layer(f, return_info=True)
        assert info.forward_stats.all_converged, (kind, D, N, info.forward_stats)


def test_defaults_and_the_paper_exact_cell():
    layer = DEQFusion(32, 3)
    assert layer.proj is None and len(layer.norms) == 3
    assert torch.all(layer.norms[0].weight == INPUT_GAIN)
    assert torch.all(layer.cell.gn3_w == OUT_GAIN) and torch.all(layer.cell.gnf_w == OUT_GAIN)
    assert torch.all(layer.cell.gn1_w == 1) and torch.all(layer.cell.gn2_w == 1)
    for paper in (DEQFusion(32, 3, input_norm=False, init="official"), DEQFusion.official(32, 3)):
        assert paper.norms is None and torch.all(paper.cell.gn3_w == 1) and torch.all(paper.cell.gnf_w == 1)


def test_paper_exact_layer_is_the_reference_cell_on_the_raw_features():
    from deqfuse.reference import cell_forward
    torch.manual_seed(0)
    layer = DEQFusion(16, 2, input_norm=False, init="official", f_tol=1e-12, stop_mode="abs", f_max_iter=200).double()
    contractive_layer(layer).eval()
    f = [t.double() for t in raw(5, [16, 16], (1.0, 3.0))]
    x = torch.stack(f, 1)
    xf = x.sum(1)
    z = torch.zeros(5, 3, 16, dtype=torch.float64)
    for _ in range(200):
        z = cell_forward(z, x, xf, layer.cell.params(), 4)
    assert rel_err(layer(f), z[:, 2].detach()) < 1e-10


def test_in_dims_projection_and_normalisation_are_what_the_solve_sees():
    """With in_dims and input_norm the solve's input is LayerNorm(Linear(f_i)): equal to a paper-exact layer
    with the same cell fed those features."""
    torch.manual_seed(0)
    layer = DEQFusion(16, 2, in_dims=[7, 5], f_tol=1e-12, f_max_iter=200).double().eval()
    paper = DEQFusion(16, 2, input_norm=False, f_tol=1e-12, f_max_iter=200).double().eval()
    paper.load_state_dict({k: v for k, v in layer.state_dict().items() if k in paper.state_dict()})
    f = [t.double() for t in raw(6, [7, 5], (3.0, 0.1))]
    with torch.no_grad():
        x = [ln(p(t)) for ln, p, t in zip(layer.norms, layer.proj, f)]
        assert rel_err(layer(f), paper(x)) < 1e-12


# ------------------------------------------------------------------------------------------- structured inputs
def _layer64(**kw):
    torch.manual_seed(0)
    return contractive_layer(DEQFusion(16, 2, in_dims=None, f_tol=1e-12, b_tol=1e-12, stop_mode="abs",
                                       f_max_iter=200, b_max_iter=200, **kw).double())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_masked_tokens_equal_the_flat_solve_of_the_real_rows(backend):
    layer = _layer64(backend=backend).eval()
    B, T = 3, 7
    f = [t.double() for t in raw(B, [16, 16], (1.0, 2.0), lead=(T,))]
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, 0] = True
    with torch.no_grad():
        out, info = layer(f, mask=mask, return_info=True)
        flat, _ = layer([t[mask] for t in f], return_info=True)
    assert out.shape == (B, T, 16)
    assert rel_err(out[mask], flat) < 1e-12 and torch.all(out[~mask] == 0)
    assert info.forward_stats.summary()["batch"] == int(mask.sum())      # masked rows never evaluated
    assert info.forward_stats.rows <= int(mask.sum()) * info.forward_stats.steps


def test_feature_maps_broadcast_and_no_mask():
    layer = DEQFusion(16, 2, in_dims=[8, 4]).eval()
    maps = torch.randn(2, 5, 6, 8)            # channel-last map [B, H, W, d]
    vec = torch.randn(2, 1, 1, 4)             # one vector per sample, broadcast over the map
    with torch.no_grad():
        out = layer([maps, vec])
        flat = layer([maps.reshape(-1, 8), vec.expand(2, 5, 6, 4).reshape(-1, 4)])
    assert out.shape == (2, 5, 6, 16) and rel_err(out.reshape(-1, 16), flat) < 1e-6


def test_masked_gradients_match_unrolled_autograd():
    """Implicit gradients through a masked sequence (features and every parameter) equal backprop through a
    long unrolled iteration of the same contractive cell (float64)."""
    torch.manual_seed(0)
    imp = _layer64()
    unr = _layer64(grad="unrolled", unrolled_steps=150)
    B, T = 2, 5
    f = [t.double() for t in raw(B, [16, 16], (1.0, 1.0), lead=(T,))]
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    w = torch.randn(B, T, 16, dtype=torch.float64)
    grads = []
    for layer in (imp, unr):
        xs = [t.clone().requires_grad_() for t in f]
        (layer(xs, mask=mask) * w).sum().backward()
        grads.append([t.grad for t in xs] + [p.grad for p in layer.parameters()])
        assert torch.all(grads[-1][0][~mask] == 0)
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-8


def test_all_masked_batch_gives_zeros_and_trains():
    layer = DEQFusion(16, 2, in_dims=[8, 4])
    f = [torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 4)]
    out, info = layer(f, mask=torch.zeros(2, 3, dtype=torch.bool), return_info=True)
    assert out.shape == (2, 3, 16) and torch.all(out == 0) and info.forward_stats is None
    out.sum().backward()  # nothing to differentiate, no error
    assert info.summary()["jac_loss"] == 0.0


@pytest.mark.parametrize("bad,match", [
    (lambda: ([torch.randn(4, 48), torch.randn(4, 30)], None), r"features\[1\] must have shape \[B, \*, 32\] \(in_dims\[1\]"),
    (lambda: ([torch.randn(4, 3, 48), torch.randn(4, 2, 32)], None), r"features\[1\] has leading dims \[4, 2\]"),
    (lambda: ([torch.randn(4, 48), torch.randn(5, 32)], None), r"features\[1\] has batch 5"),
    (lambda: ([torch.randn(4, 3, 48), torch.randn(4, 3, 32)], torch.ones(4, 3)), "mask must be a bool tensor"),
    (lambda: ([torch.randn(4, 3, 48), torch.randn(4, 3, 32)], torch.ones(4, 2, dtype=torch.bool)),
     r"mask must have the features' leading shape \[4, 3\]"),
    (lambda: ([torch.randn(48)] * 2, None), r"features\[0\] must have shape \[B, \*, 48\]"),
])
def test_bad_structured_input_names_the_argument(bad, match):
    layer = DEQFusion(16, 2, in_dims=[48, 32])
    f, mask = bad()
    with pytest.raises((ValueError, TypeError), match=match):
        layer(f, mask=mask)


def test_bad_construction_names_the_argument():
    with pytest.raises(ValueError, match=r"in_dims must be a list of 2 feature widths"):
        DEQFusion(16, 2, 4)  # groups is keyword-only
    with pytest.raises(ValueError, match=r"in_dims must give one width per modality \(2\)"):
        DEQFusion(16, 2, [8])
    with pytest.raises(ValueError, match=r"in_dims\[1\] must be >= 1"):
        DEQFusion(16, 2, [8, 0])
    with pytest.raises(ValueError, match="init must be one of"):
        DEQFusion(16, 2, init="zeros")
    with pytest.raises(ValueError, match="on_nonconvergence must be one of"):
        DEQFusion(16, 2, on_nonconvergence="shout")


# ------------------------------------------------------------------------------------------ info, warnings
def _hard_layer(**kw):
    torch.manual_seed(0)
    return DEQFusion(16, 2, f_max_iter=2, f_tol=1e-12, **kw)


def test_nonconvergence_warning_is_stable_attributed_to_the_caller_and_filterable():
    layer = _hard_layer()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        for B in (3, 5, 7, 3, 9):                          # varying counts: still one warning for this line
            layer([torch.randn(B, 16), torch.randn(B, 16)])
    assert len(rec) == 1 and rec[0].category is ConvergenceWarning
    assert rec[0].filename == __file__ and "f_max_iter=2" in str(rec[0].message)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="deqfuse")
        layer([torch.randn(3, 16), torch.randn(3, 16)])
    assert rec == []


def test_adjoint_warning_attributed_to_backward_and_raise_mode():
    torch.manual_seed(0)
    layer = DEQFusion(16, 2, b_max_iter=1, b_tol=1e-14)
    out = layer([torch.randn(4, 16), torch.randn(4, 16)])
    with pytest.warns(ConvergenceWarning, match="adjoint") as rec:
        out.square().sum().backward()
    assert rec[0].filename == __file__
    with pytest.raises(ConvergenceError, match=r"forward solve: \d+/4 samples did not reach f_tol"):
        _hard_layer(on_nonconvergence="raise")([torch.randn(4, 16), torch.randn(4, 16)])
    strict = DEQFusion(16, 2, b_max_iter=1, b_tol=1e-14, on_nonconvergence="raise")
    with pytest.raises(ConvergenceError, match="adjoint"):
        strict([torch.randn(4, 16), torch.randn(4, 16)]).square().sum().backward()
    quiet = _hard_layer(on_nonconvergence="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet([torch.randn(4, 16), torch.randn(4, 16)])


def test_info_summary_numbers_only_compact_repr_and_backward_stats():
    layer = DEQFusion(16, 2, jac_reg=1)
    out, info = layer([torch.randn(4, 16), torch.randn(4, 16)], return_info=True)
    assert info.backward_stats is None
    out.sum().backward()
    s = info.summary()
    assert info.backward_stats is not None and "backward/steps" in s and "forward/converged_frac" in s
    assert all(type(v) in (int, float) for v in s.values()), s
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "Converting a tensor with requires_grad=True" from jac_loss)
        r = repr(info) + repr(info.forward_stats)
    assert "tensor(" not in r and len(r) < 600
    assert "in_dims=None" in repr(layer) and "grad='implicit'" in repr(layer)


def test_concurrent_calls_get_their_own_info():
    layer = DEQFusion(16, 2).eval()
    errors = []

    def call(B):
        for _ in range(20):
            with torch.no_grad():
                _, info = layer([torch.randn(B, 16), torch.randn(B, 16)], return_info=True)
            if info.forward_stats.summary()["batch"] != B:
                errors.append(B)
    threads = [threading.Thread(target=call, args=(B,)) for B in (3, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_no_weight_decay_and_param_groups():
    model = torch.nn.Sequential(DEQFusion(16, 2, in_dims=[8, 4]), torch.nn.Linear(16, 3))
    names = model[0].no_weight_decay()
    assert {"cell.gn1_w", "cell.gn3_b", "cell.b1", "weights", "bias", "norms.0.weight", "proj.1.bias"} <= names
    assert not names & {"cell.w1", "cell.w2", "cell.wg", "cell.wf", "proj.0.weight"}
    decay, no_decay = deqfuse.param_groups(model, 0.05)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert id(model[0].cell.gn1_w) in ids(no_decay) and id(model[1].bias) in ids(no_decay)
    assert {id(model[0].cell.w1), id(model[1].weight), id(model[0].proj[0].weight)} <= ids(decay)
    assert len(ids(decay)) + len(ids(no_decay)) == len(list(model.parameters()))


def test_solve_options_are_settable_attributes():
    """f_max_iter / b_max_iter / f_tol / b_tol, shown by the repr, can be set after construction: the next solve
    uses them; a bad value is an error naming the attribute; f_tol None is the precision's default again."""
    layer = DEQFusion(16, 2)
    assert (layer.f_max_iter, layer.b_max_iter, layer.f_tol, layer.b_tol) == (55, 56, None, None)
    layer.f_max_iter, layer.f_tol = 3, 1e-12
    _, info = layer([torch.randn(4, 16), torch.randn(4, 16)], return_info=True)
    assert info.forward_stats.steps == 3 and info.forward_stats.tol == 1e-12
    assert "f_max_iter=3" in repr(layer)
    with pytest.raises(ValueError, match="f_max_iter must be in"):
        layer.f_max_iter = 0
    with pytest.raises(ValueError, match="b_tol must be > 0"):
        layer.b_tol = -1.0
    layer.f_tol = None
    assert layer.f_tol is None and "f_tol=default" in repr(layer)
