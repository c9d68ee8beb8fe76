"""Bounded property-based fuzzing of the user-facing surfaces: structured inputs and masks of DEQFusion,
raw-input DynMM, the command line's options and data files. Each input either works (and gives what the
plain computation gives) or raises a ValueError / TypeError (the CLI: a usage error, exit status 2) --
never another exception, a hang or a silent wrong answer."""
import os

import numpy as np
import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from deqfuse import DEQFusion, DynamicFusion, SubsetExpert  # noqa: E402

FAST = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(B=st.integers(1, 3), lead=st.lists(st.integers(1, 4), max_size=2), widths=st.lists(st.integers(1, 9), min_size=1,
       max_size=3), project=st.booleans(), broadcast=st.booleans(), p_mask=st.sampled_from([None, 0.0, 0.5, 1.0]),
       seed=st.integers(0, 2 ** 16))
def test_structured_inputs_and_masks(B, lead, widths, project, broadcast, p_mask, seed):
    g = torch.Generator().manual_seed(seed)
    N, D = len(widths), 8
    layer = DEQFusion(D, N, in_dims=widths if project else None, groups=2, f_max_iter=40,
                      on_nonconvergence="ignore").eval()
    shape = (B, *lead)
    feats = []
    for i, w in enumerate(widths if project else [D] * N):
        s = (B, *[1] * len(lead)) if broadcast and i == 1 else shape
        feats.append(torch.randn(*s, w, generator=g))
    mask = None if p_mask is None else torch.rand(shape, generator=g) >= p_mask
    with torch.no_grad():
        out, info = layer(feats, mask=mask, return_info=True)
        assert out.shape == (*shape, D) and torch.isfinite(out).all()
        keep = torch.ones(shape, dtype=torch.bool) if mask is None else mask
        assert torch.all(out[~keep] == 0)
        if keep.any():
            flat = layer([f.expand(*shape, f.shape[-1])[keep] for f in feats])
            assert (out[keep] - flat).abs().max() <= 1e-5 * (1 + flat.abs().max())
            assert info.forward_stats.summary()["batch"] == int(keep.sum())
        else:
            assert info.forward_stats is None
    bad_mask = torch.ones(*shape[:-1], shape[-1] + 1, dtype=torch.bool) if lead else torch.ones(B + 1, dtype=torch.bool)
    with pytest.raises((ValueError, TypeError)):
        layer(feats, mask=bad_mask)


class _Tok(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.emb, self.out = nn.EmbeddingBag(50, 6), nn.Linear(6, out)

    def forward(self, xs):
        return self.out(self.emb(xs[0]))


class _Any(nn.Module):
    """Flattens each named input, concatenates, Linear."""

    def __init__(self, width, out):
        super().__init__()
        self.lin = nn.Linear(width, out)

    def forward(self, xs):
        return self.lin(torch.cat([x.float().reshape(x.shape[0], -1) for x in xs], 1))


@FAST
@given(B=st.integers(1, 12), subsets=st.lists(st.sets(st.sampled_from(["ids", "img", "vec"]), min_size=1), min_size=1,
       max_size=4), seed=st.integers(0, 2 ** 16))
def test_raw_input_dynmm_routes_like_running_every_expert(B, subsets, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inputs = dict(ids=torch.randint(0, 50, (B, 5), generator=g), img=torch.randn(B, 2, 3, 3, generator=g),
                  vec=torch.randn(B, 4, generator=g))
    width = dict(ids=5, img=18, vec=4)
    experts = []
    for names in subsets:
        names = sorted(names)
        experts.append(SubsetExpert(names, _Tok(3) if names == ["ids"] else _Any(sum(width[n] for n in names), 3)))
    dyn = DynamicFusion(experts).eval()
    with torch.no_grad():
        out, info = dyn(inputs, return_info=True)
        choice = info.choice
        ref = torch.stack([e([inputs[n] for n in e.modalities]) for e in experts], 1)[torch.arange(B), choice]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert sum(info.counts) == B and info.realized_macs >= 0
    dyn.train()
    dyn(inputs).sum().backward()


_CLI_FLAGS = ["--epochs", "--dim", "--seed", "--f-max-iter", "--dynmm-lambda", "--dynmm-target"]


@FAST
@given(flag=st.sampled_from(_CLI_FLAGS), value=st.one_of(st.text(max_size=6), st.sampled_from(
       ["-1", "0", "nan", "inf", "-inf", "1e400", "3.5", "", " ", "1,2", "2"])))
def test_cli_train_options_never_traceback(flag, value, tmp_path_factory):
    """A bad option value is a usage error (SystemExit 2) before anything trains; a good one is not
    rejected (the run itself is skipped here by an unwritable --out checked last)."""
    from deqfuse.__main__ import main
    out = "/proc/deqfuse-fuzz-unwritable"
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-progress", "--out", out, flag, value])
    assert e.value.code == 2


@FAST
@given(kind=st.sampled_from([".npz", ".csv"]), blob=st.binary(max_size=200), seed=st.integers(0, 2 ** 16))
def test_cli_eval_data_files_never_traceback(kind, blob, seed, tmp_path_factory):
    """Random and almost-right data files: a usage error naming the file, or (valid by chance) accepted."""
    from deqfuse.__main__ import main
    d = tmp_path_factory.mktemp("data")
    path = str(d / f"data{kind}")
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:  # almost right: a valid-looking structure with a random defect
        n = int(rng.integers(1, 12))
        arrays = dict(view0=rng.normal(size=(n, 3)), y=rng.integers(0, 2, n))
        if seed % 2:
            arrays["view0"][0, 0] = np.nan
        if kind == ".npz":
            np.savez(path, **arrays)
        else:
            with open(path, "w") as fh:
                fh.write("label,a_0,a_1,a_2\n" + "".join(f"{y},{r[0]},{r[1]},{r[2]}\n"
                                                         for y, r in zip(arrays["y"], arrays["view0"])))
    else:
        with open(path, "wb") as fh:
            fh.write(blob)
    argv = ["eval", "--no-progress", "--seeds", "1", "--epochs", "1", "--methods", "concat", "--data", path,
            "--out", str(d / "out")]
    if kind == ".csv":
        argv += ["--view-prefixes", "a_"]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2 or (code == 0 and seed % 3 == 0), code  # random bytes are never a data set
    assert os.path.exists(path)
