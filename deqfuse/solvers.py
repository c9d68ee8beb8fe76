"""Batched root solvers for z = f(z): per-sample residuals, best iterate, freezing, early exit and
active-set compaction.

Every solver takes ``f: [B, L] -> [B, L]`` and ``x0: [B, L]`` (never written) and returns ``(z, SolverStats)``: z is
each sample's best iterate (lowest residual by ``stop_mode``). A sample whose residual drops below
``tol`` is frozen: its state stops changing.

Adaptive compute (the defaults):
  * early exit: every ``check_every`` steps one host sync asks "has every sample converged?" and the
    solve stops if so. ``check_every=None`` picks a per-device default (DEFAULT_CHECK_EVERY, chosen
    from measurements in benchmarks/RESULTS.md); ``check_every=0`` runs exactly ``max_iter`` steps with
    no host sync at all (what a CUDA-graph capture or torch.compile of a whole solve needs).
  * compaction: at a check, when the still-active samples are at most a fraction ``compact`` of the
    batch being iterated (and enough steps are left to repay the move, COMPACT_COST), their whole solver state (iterate, histories, Gram matrices, best iterate,
    counters, traces) is gathered into a smaller batch and only those rows are evaluated from then on;
    results are scattered back into the full batch at the next compaction and at the end. Needs a
    row-wise f (deqfuse.rowwise: ``f.subset(idx)``); a plain callable gets early exit only.
    ``compact=None`` is DEFAULT_COMPACT for row-wise f and off otherwise; ``compact=0`` turns it off.
A compacted solve gives, per sample, the iterate, residual, step count, flag and trace of the
fixed-shape solve (tests/test_adaptive.py); SolverStats.rows counts the rows f was evaluated on.

Whole solves: a map with a compiled whole Anderson solve (rowwise.WholeSolve: the C++ cell and its adjoint
on the CPU, csrc/solve_cpu.cpp) runs it in one call instead of this module's loop where the registry's
'anderson_solve' op selects it (``whole_solve`` says when): the same per-sample answer, no per-iteration Python or allocation, and each
step evaluates f only on the samples still moving (tests/test_fused_solve.py).
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from . import backend as _backend
from . import profiling
from ._validate import check_choice, check_float, check_int, host_sync_allowed
from .precision import full_precision
from .reference.anderson import record_residual_ref
from .rowwise import WholeSolve, is_rowwise

# Early-exit interval per device type (steps between host syncs). CPU: a sync costs ~nothing, so every
# step (benchmarks/bench_adaptive.py). CUDA: a sync drains the launch queue; 4 is a first guess that
# bounds the wasted steps to 3 -- not yet timed on a GPU (issue 13 sets it from measurements).
DEFAULT_CHECK_EVERY = {"cpu": 1, "cuda": 4}
DEFAULT_COMPACT = 0.5  # compact when <= half of the iterated rows are still active (bench_adaptive.py)
# A compaction gathers the whole solver state of the kept rows (the Anderson rings dominate: 2 m L values
# per row); on the CPU that costs about as much as 1-2 iterations of those rows (bench_adaptive.py,
# main-job model: ~1.3). So compact only if the rows dropped, times the steps left, outweigh it.
COMPACT_COST = 2.0


@dataclass
class SolverStats:
    """Device tensors; nothing here forces a sync until you read it.

    abs_trace/rel_trace: [T, B] residual of each sample at each step (NaN once frozen);
    best_res: [B] residual of the returned iterate (by stop_mode); nstep: [B] step it came from;
    converged: [B] bool; steps: steps run (host int); rows: rows f was evaluated on, summed over the
    steps (B * steps without compaction); compactions: how often the batch was shrunk; plan: what ran the
    solve ('per-iteration loop', 'CUDA graph replay', or a compiled whole solve and its kernel plan, e.g. 'C++
    whole solve: gemm=avx512 rows=ymm layout=rows', see deqfuse.cpu_plan).
    """
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    best_res: torch.Tensor
    nstep: torch.Tensor
    converged: torch.Tensor
    steps: int
    tol: float
    stop_mode: str
    rows: int = -1
    compactions: int = 0
    plan: str = "per-iteration loop"

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> dict:
        """Numbers only (one host sync), loggable as is: steps run, samples and how many converged (and
        their fraction), the largest returned residual, the mean step of the returned iterates, rows the
        map was evaluated on, compactions, the tolerance."""
        n = self.converged.numel()
        conv = int(self.converged.sum())
        return dict(steps=self.steps, batch=n, converged=conv, converged_frac=conv / n if n else 1.0,
                    max_res=float(self.best_res.max()) if n else 0.0,
                    mean_nstep=float(self.nstep.float().mean()) if n else 0.0,
                    rows=self.rows, compactions=self.compactions, tol=self.tol)

    def __repr__(self):
        s = self.summary()
        return (f"SolverStats(steps={s['steps']}, converged={s['converged']}/{s['batch']}, "
                f"max_res={s['max_res']:.3g} ({self.stop_mode}, tol={self.tol:g}), mean_nstep={s['mean_nstep']:.1f}, "
                f"rows={s['rows']}, compactions={s['compactions']}, plan={self.plan!r})")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Results:
    """Per-sample outputs of a solve: best_x [B, L], best_res [B] (acc dtype), nstep [B] int32,
    converged [B] bool, abs_trace/rel_trace [T, B] (acc dtype, NaN where a sample was frozen)."""
    FIELDS = ("best_x", "best_res", "nstep", "converged")  # batch on dim 0
    TRACES = ("abs_trace", "rel_trace")                   # batch on dim 1

    def __init__(self, x0, max_iter):
        B, dev, acc = x0.shape[0], x0.device, _acc_dtype(x0)
        self.best_x = x0.clone(memory_format=torch.contiguous_format)
        self.best_res = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.nstep = torch.zeros(B, dtype=torch.int32, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.abs_trace = torch.full((max_iter, B), float("nan"), dtype=acc, device=dev)
        self.rel_trace = torch.full((max_iter, B), float("nan"), dtype=acc, device=dev)

    def reset(self, x0):
        """Back to the state of a fresh solve from x0, in place (CUDA-graph replays reuse the buffers)."""
        self.best_x.copy_(x0)
        self.best_res.fill_(float("inf"))
        self.nstep.zero_()
        self.converged.zero_()
        self.abs_trace.fill_(float("nan"))
        self.rel_trace.fill_(float("nan"))

    def buffers(self):
        """(best_x, best_res, converged, nstep, abs_trace, rel_trace): what a compiled whole solve updates in
        place, in its ops' argument order (csrc/solve_cpu.cpp)."""
        return self.best_x, self.best_res, self.converged, self.nstep, self.abs_trace, self.rel_trace

    def gather(self, idx):
        new = object.__new__(Results)
        for n in self.FIELDS:
            setattr(new, n, getattr(self, n).index_select(0, idx))
        for n in self.TRACES:
            setattr(new, n, getattr(self, n).index_select(1, idx))
        return new

    def write_back(self, idx, part):
        """self[idx] = part (part holds the rows idx of this batch, in that order)."""
        for n in self.FIELDS:
            getattr(self, n).index_copy_(0, idx, getattr(part, n))
        for n in self.TRACES:
            getattr(self, n).index_copy_(1, idx, getattr(part, n))

    def record(self, k, x, fx, tol, stop_rel):
        """Residual of x (whose image is fx) at step k, best iterate, freezing (reference.anderson.
        record_residual_ref: the bookkeeping the fused Anderson steps do in-kernel). Returns the mask of
        samples still moving."""
        record_residual_ref(x, fx, self.best_x, self.best_res, self.converged, self.nstep, self.abs_trace[k],
                            self.rel_trace[k], k, tol, stop_rel)
        return ~self.converged


def _result_property(name):
    return property(lambda self: getattr(self.res, name))


class _State:
    """Working buffers of one solve over a batch of rows, plus its Results.

    ROW_FIELDS: buffers with the batch on dim 0, gathered on compaction. iterate(f, k) performs step k
    in place: exactly one evaluation of f on this state's batch, no host sync.
    """
    ROW_FIELDS = ()

    def __init__(self, x0, max_iter):
        self.x = x0.clone(memory_format=torch.contiguous_format)  # the kernels want contiguous rows
        self.res = Results(x0, max_iter)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def gather(self, idx):
        """A state holding only rows idx (int64 [b]) of this one, in that order."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for n in self.ROW_FIELDS:
            setattr(new, n, getattr(self, n).index_select(0, idx))
        new.res = self.res.gather(idx)
        return new

    def reset(self, x0):
        """In place: the state of a fresh solve from x0 (same shape)."""
        self.x.copy_(x0)
        for n in self.ROW_FIELDS:
            if n != "x":
                getattr(self, n).zero_()
        self.res.reset(x0)

    def _checked(self, fx, k):
        if k == 0 and (fx.shape != self.x.shape or fx.dtype != self.x.dtype or fx.device != self.x.device):
            raise ValueError(f"f(x) must match x0: got {tuple(fx.shape)} {fx.dtype} {fx.device}, "
                             f"x0 is {tuple(self.x.shape)} {self.x.dtype} {self.x.device}")
        return fx

    def iterate(self, f, k: int):
        raise NotImplementedError


for _n in Results.FIELDS + Results.TRACES:
    setattr(_State, _n, _result_property(_n))


class AndersonState(_State):
    """Device buffers of one Anderson solve (see reference.anderson for the step contract):
    x [B, L]; rings X, G [B, m, L] (history_dtype); Gram matrix GG [B, m, m] (acc dtype)."""
    ROW_FIELDS = ("x", "X", "G", "GG")

    def __init__(self, x0, m, max_iter, history_dtype=None, *, step_fn=None, beta=1.0, lam=1e-4,
                 tol=1e-4, stop_rel=True):
        super().__init__(x0, max_iter)
        B, L = x0.shape
        dev, hd = x0.device, history_dtype or x0.dtype
        self.X = torch.zeros(B, m, L, dtype=hd, device=dev)
        self.G = torch.zeros(B, m, L, dtype=hd, device=dev)
        self.GG = torch.zeros(B, m, m, dtype=_acc_dtype(x0), device=dev)
        self.step_fn, self.beta, self.lam, self.tol, self.stop_rel = step_fn, beta, lam, tol, stop_rel

    def step(self, step_fn, fx, k, beta, lam, tol, stop_rel):
        """One fused step given f(x) (low level: the kernels' contract)."""
        r = self.res
        step_fn(self.x, fx, self.X, self.G, self.GG, r.best_x, r.best_res, r.converged, r.nstep,
                r.abs_trace[k], r.rel_trace[k], k, beta, lam, tol, stop_rel)

    def iterate(self, f, k):
        fx = self._checked(f(self.x), k)
        self.step(self.step_fn, fx, k, self.beta, self.lam, self.tol, self.stop_rel)


class FixedPointState(_State):
    ROW_FIELDS = ("x",)

    def __init__(self, x0, max_iter, *, tau=1.0, tol=1e-4, stop_rel=True):
        super().__init__(x0, max_iter)
        self.tau, self.tol, self.stop_rel = tau, tol, stop_rel

    def iterate(self, f, k):
        x = self.x
        fx = self._checked(f(x), k)
        active = self.res.record(k, x, fx, self.tol, self.stop_rel)
        x.copy_(torch.where(active[:, None], (1 - self.tau) * x + self.tau * fx, x))


@full_precision
def _jinv_matvec(v, Us, VTs):
    return -v + torch.einsum("blm,bm->bl", Us, torch.einsum("bml,bl->bm", VTs, v))


@full_precision
def _jinv_rmatvec(v, Us, VTs):
    return -v + torch.einsum("bm,bml->bl", torch.einsum("bl,blm->bm", v, Us), VTs)


class BroydenState(_State):
    """Limited-memory ("good") Broyden on g(x) = f(x) - x, inverse Jacobian started at -I; its low-rank
    factors live in rings of m columns per sample: Us [B, L, m], VTs [B, m, L]."""
    ROW_FIELDS = ("x", "fx", "gx", "Us", "VTs")

    def __init__(self, x0, m, max_iter, *, tol=1e-4, stop_rel=True):
        super().__init__(x0, max_iter)
        B, L = x0.shape
        self.fx, self.gx = torch.zeros_like(self.x), torch.zeros_like(self.x)
        self.Us = x0.new_zeros(B, L, m)
        self.VTs = x0.new_zeros(B, m, L)
        self.m, self.tol, self.stop_rel = m, tol, stop_rel

    def _matvec(self, v):  # J^-1 v with J^-1 = -I + Us VTs ; v: [B, L]
        return _jinv_matvec(v, self.Us, self.VTs)

    def _rmatvec(self, v):  # v^T J^-1
        return _jinv_rmatvec(v, self.Us, self.VTs)

    def iterate(self, f, k):
        x = self.x
        if k == 0:
            self.fx.copy_(self._checked(f(x), k))
            self.gx.copy_(self.fx - x)
        else:  # the quasi-Newton step from step k-1's point, then one evaluation of f
            active = ~self.res.converged
            dx = torch.where(active[:, None], -self._matvec(self.gx), torch.zeros_like(x))
            x.add_(dx)
            fx_new = f(x)
            gx_new = fx_new - x
            dg = gx_new - self.gx
            vT = self._rmatvec(dx)
            denom = (vT * dg).sum(1, keepdim=True)
            ok = active[:, None] & (denom.abs() > 1e-30)
            u = torch.where(ok, (dx - self._matvec(dg)) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
            slot = (k - 1) % self.m
            self.Us[:, :, slot] = torch.where(ok, u, self.Us[:, :, slot])
            self.VTs[:, slot] = torch.where(ok, vT, self.VTs[:, slot])
            self.fx.copy_(fx_new)
            self.gx.copy_(gx_new)
        self.res.record(k, x, self.fx, self.tol, self.stop_rel)


# ---------------------------------------------------------------------------------------------- driver

def resolve_check_every(check_every, x) -> int:
    """The early-exit interval for a solve on x's device (0 = fixed iterations, no host sync)."""
    if check_every is None:
        if not host_sync_allowed(x):
            return 0
        return DEFAULT_CHECK_EVERY.get(x.device.type, DEFAULT_CHECK_EVERY["cuda"])
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
        raise ValueError(f"check_every must be None (per-device default), 0 (fixed iterations) or a "
                         f"positive int, got {check_every!r}")
    if check_every and x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("check_every > 0 syncs with the host, which a CUDA graph capture forbids: pass "
                         "check_every=0 (fixed iterations) or use DEQFusion(cuda_graph=True)")
    return check_every


def resolve_compact(compact, f, check_every: int) -> float:
    """The compaction threshold (0 = off) for a solve of f with the given (resolved) check interval."""
    if compact is None:
        return DEFAULT_COMPACT if (check_every and is_rowwise(f)) else 0.0
    if isinstance(compact, bool) or not isinstance(compact, (int, float)) or not 0 <= compact <= 1:
        raise ValueError(f"compact must be None (default), 0 (off) or a fraction in (0, 1], got {compact!r}")
    if compact and not check_every:
        raise ValueError("compact > 0 needs check_every > 0: compaction happens at the convergence checks")
    if compact and not is_rowwise(f):
        raise ValueError("compact > 0 needs a row-wise f (deqfuse.rowwise.RowwiseFn or any callable with "
                         "subset(idx)); pass compact=0 for a plain callable")
    return float(compact)


def _count(flags: torch.Tensor) -> int:
    """Number of True entries (a host sync; on the CPU read through numpy: ~1 us, no ATen dispatch)."""
    if flags.device.type == "cpu" and not torch.compiler.is_compiling():
        return int(np.count_nonzero(flags.numpy()))
    return int(flags.sum())


class _ChunkRange:
    """The NVTX range of the iterations between two convergence checks (deqfuse.profiling)."""

    def __init__(self):
        self.cm = None

    def open(self):
        if self.cm is None:
            self.cm = profiling.range("solve_iters")
            self.cm.__enter__()

    def close(self):
        if self.cm is not None:
            cm, self.cm = self.cm, None
            cm.__exit__(None, None, None)


def run(state: _State, f: Callable, max_iter: int, check_every: int, compact: float, tol: float,
        stop_mode: str):
    """Drive state.iterate for up to max_iter steps with early exit and compaction (see module doc).
    Returns (best iterate [B, L], SolverStats) of the full batch."""
    full, idx = state.res, None       # idx: rows of the full batch that `state` holds (None = all)
    steps = rows = compactions = 0
    chunk = _ChunkRange() if profiling.enabled() else None  # NVTX: one range per chunk of iterations
    try:
        for k in range(max_iter):
            if chunk is not None:
                chunk.open()
            state.iterate(f, k)
            rows += state.batch
            steps = k + 1
            if not check_every or steps % check_every or steps == max_iter:
                continue
            if chunk is not None:
                chunk.close()
            n_keep = state.batch - _count(state.res.converged)  # the one host sync of this check
            if n_keep == 0:
                break
            n_drop = state.batch - n_keep
            if compact and n_keep <= compact * state.batch and n_drop * (max_iter - steps) >= COMPACT_COST * n_keep:
                keep = (~state.res.converged).nonzero()[:, 0]
                if idx is not None:
                    full.write_back(idx, state.res)
                idx = keep if idx is None else idx.index_select(0, keep)
                state, f = state.gather(keep), f.subset(keep)
                compactions += 1
    finally:
        if chunk is not None:
            chunk.close()
    if idx is not None:
        full.write_back(idx, state.res)
    stats = SolverStats(full.abs_trace[:steps], full.rel_trace[:steps], full.best_res, full.nstep,
                        full.converged, steps, tol, stop_mode, rows=rows, compactions=compactions)
    return full.best_x, stats


HISTORY_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MAX_ITER = 10_000  # solver steps: the residual traces are [max_iter, B] (16 bytes per sample and step)


def _check_option(key: str, v, name: str, solver: str):
    """One solver option (key as the solver spells it; name as the caller spelled it, for the message).
    Skipped while torch.compile traces (options are then symbolic; the layer checked them when built).
    A hashable value that passed once is not checked again (every solve checks its options)."""
    if torch.compiler.is_compiling():
        return
    try:
        _option_passed(key, v, name, solver)
    except TypeError as e:  # unhashable value: checked without the cache (the check's own TypeError re-raises)
        if "unhashable" not in str(e):
            raise
        _check_option_value(key, v, name, solver)


@functools.lru_cache(maxsize=512, typed=True)  # typed: True and 1, 1 and 1.0 are checked apart
def _option_passed(key: str, v, name: str, solver: str):
    _check_option_value(key, v, name, solver)  # a failed check raises and is not cached


def _check_option_value(key: str, v, name: str, solver: str):
    if key == "max_iter":  # (traces hold max_iter x batch residuals)
        check_int(name, v, 1, MAX_ITER)
    elif key == "tol":
        check_float(name, v, 0, lo_open=True)
    elif key == "stop_mode":
        check_choice(name, v, ("abs", "rel"))
    elif key == "check_every":
        if v is not None:
            check_int(name, v, 0)
    elif key == "compact":
        if v is not None:
            check_float(name, v, 0, 1)
    elif key == "m":
        check_int(name, v, 1)
    elif key == "lam":  # > 0: the compiled bordered solves pivot on GG + lam' I (no pivoting search)
        check_float(name, v, 0, lo_open=True)
    elif key == "beta":
        check_float(name, v, 0, lo_open=True)
    elif key == "tau":  # damped fixed point: x <- (1 - tau) x + tau f(x)
        check_float(name, v, 0, 2, lo_open=True)
    elif key == "history_dtype":
        if v is not None and v not in HISTORY_DTYPES:
            raise ValueError(f"{name} must be None or one of {HISTORY_DTYPES}, got {v!r}")
    elif key == "backend":
        check_choice(name, v, _backend.BACKENDS)
    else:
        raise ValueError(f"{name}: not an option of solver {solver!r}")


def check_options(solver: str, names: Optional[dict] = None, **kw):
    """Validate solver options up front; names maps an option to the name the caller used for it
    (e.g. {'max_iter': 'f_max_iter'}) so that the message names what the user typed."""
    check_solver(solver)
    allowed = solver_options(solver)
    names = names or {}
    for key, v in kw.items():
        name = names.get(key, key)
        if key not in allowed:
            raise ValueError(f"{name}: not an option of solver {solver!r} (options: {sorted(allowed)})")
        _check_option(key, v, name, solver)


def _check_x0(x0):
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a [B, L] tensor, got {getattr(x0, 'shape', type(x0))}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be floating point, got {x0.dtype}")


def _check(x0, max_iter, tol, stop_mode):
    _check_x0(x0)
    _check_option("max_iter", max_iter, "max_iter", "")
    _check_option("tol", tol, "tol", "")
    _check_option("stop_mode", stop_mode, "stop_mode", "")


def _check_anderson(x0, m, lam, beta, max_iter, tol, stop_mode, history_dtype, backend):
    """Checks every Anderson option; returns the step function (reference.anderson contract). Options and
    step function are looked up once per combination and device (every solve of a layer passes the same
    ones; checking them one by one cost ~9 us a solve)."""
    _check_x0(x0)
    if history_dtype in HISTORY_DTYPES and history_dtype not in (x0.dtype, torch.bfloat16, torch.float16):
        raise ValueError(f"history_dtype (a layer's solver_kw['history_dtype']) must be None, the solve's dtype "
                         f"({x0.dtype}), torch.bfloat16 or torch.float16 for this solve, got {history_dtype}")
    opts = (m, lam, beta, max_iter, tol, stop_mode, history_dtype, backend)
    if not torch.compiler.is_compiling():  # (options are symbolic while torch.compile traces)
        try:
            return _anderson_options(x0.device, *opts)
        except TypeError as e:  # an unhashable option: checked without the cache (the check's TypeError re-raises)
            if "unhashable" not in str(e):
                raise
    return _anderson_options.__wrapped__(x0.device, *opts)


@functools.lru_cache(maxsize=256, typed=True)  # typed: True and 1 are checked apart; a failed check is not cached
def _anderson_options(device, m, lam, beta, max_iter, tol, stop_mode, history_dtype, backend):
    """The Anderson options checked, and the step function for tensors on `device`."""
    for key, v in (("max_iter", max_iter), ("tol", tol), ("stop_mode", stop_mode), ("m", m), ("lam", lam),
                   ("beta", beta), ("history_dtype", history_dtype), ("backend", backend)):
        _check_option(key, v, key, "anderson")
    return _backend.anderson_step_fn_for(backend, device, m)


def anderson_state(x0, *, m: int = 5, lam: float = 1e-4, beta: float = 1.0, max_iter: int = 50,
                   tol: float = 1e-4, stop_mode: str = "rel", history_dtype: Optional[torch.dtype] = None,
                   backend: str = "auto") -> AndersonState:
    """A checked AndersonState ready to iterate (the solver minus its driver; graphs.py replays it)."""
    step_fn = _check_anderson(x0, m, lam, beta, max_iter, tol, stop_mode, history_dtype, backend)
    return _anderson_state(x0, step_fn, m, lam, beta, max_iter, tol, stop_mode, history_dtype)


def _anderson_state(x0, step_fn, m, lam, beta, max_iter, tol, stop_mode, history_dtype) -> AndersonState:
    """An AndersonState from options _check_anderson accepted and the step function it returned."""
    return AndersonState(x0, m, max_iter, history_dtype, step_fn=profiling.wrap(step_fn, "anderson_step"),
                         beta=beta, lam=lam, tol=tol, stop_rel=stop_mode == "rel")


def whole_solve(f, x0, backend: str, m: int, history_dtype, check_every: int) -> Optional[WholeSolve]:
    """f when its compiled whole Anderson solve (rowwise.WholeSolve) runs this solve, else None (the
    per-iteration loop): where the registry's 'anderson_solve' op selects its compiled implementation for
    this backend, device, dtype and m, with the state's dtype as history and early exit on (check_every > 0;
    0 asks for the fixed-shape loop), outside autograd, torch.compile and NVTX profiling (whose per-iteration
    ranges it would not have). It runs the compiled step's math (anderson_rows) sample by sample, evaluating
    f only on the samples still moving."""
    if (not isinstance(f, WholeSolve) or backend not in ("auto", "cuda") or not check_every
            or history_dtype not in (None, x0.dtype) or x0.shape[0] == 0 or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or profiling.enabled()):
        return None
    return f if _backend.select("anderson_solve", "auto", x0.device, x0.dtype, m=m) == "cuda" else None


def reported_steps(run: int, check_every: int, max_iter: int) -> int:
    """SolverStats.steps of a whole solve that ran `run` steps: what the per-iteration driver reports (it
    stops at the first convergence check after every sample converged)."""
    return min(max_iter, -(-run // check_every) * check_every)


def fixed_point_state(x0, *, tau: float = 1.0, max_iter: int = 50, tol: float = 1e-4,
                      stop_mode: str = "rel") -> FixedPointState:
    _check(x0, max_iter, tol, stop_mode)
    _check_option("tau", tau, "tau", "fixed_point")
    return FixedPointState(x0, max_iter, tau=tau, tol=tol, stop_rel=stop_mode == "rel")


def broyden_state(x0, *, m: int = 30, max_iter: int = 50, tol: float = 1e-4,
                  stop_mode: str = "rel") -> BroydenState:
    _check(x0, max_iter, tol, stop_mode)
    _check_option("m", m, "m", "broyden")
    return BroydenState(x0, m, max_iter, tol=tol, stop_rel=stop_mode == "rel")


def anderson(f: Callable, x0: torch.Tensor, *, m: int = 5, lam: float = 1e-4, beta: float = 1.0,
             max_iter: int = 50, tol: float = 1e-4, stop_mode: str = "rel", check_every: Optional[int] = None,
             compact: Optional[float] = None, history_dtype: Optional[torch.dtype] = None,
             backend: str = "auto"):
    """Anderson acceleration (bordered least-squares form), one fused step per iteration.

    m: history size; lam: Tikhonov term on the Gram matrix; beta: mixing (1 = use f(x) only);
    history_dtype: dtype of the [B, m, L] ring buffers (e.g. bf16 to halve their traffic);
    check_every/compact: early exit and active-set compaction (module doc).
    """
    step_fn = _check_anderson(x0, m, lam, beta, max_iter, tol, stop_mode, history_dtype, backend)
    ce = resolve_check_every(check_every, x0)
    cp = resolve_compact(compact, f, ce)
    whole = whole_solve(f, x0, backend, m, history_dtype, ce)
    if whole is not None:  # one compiled call; it skips converged samples itself (no compaction needed)
        res = Results(x0, max_iter)
        run_steps, rows = whole.anderson_solve(x0, res, m=m, beta=beta, lam=lam, tol=tol,
                                               stop_rel=stop_mode == "rel", max_iter=max_iter)
        steps = reported_steps(run_steps, ce, max_iter)
        plan = whole.solve_plan()
        return res.best_x, SolverStats(res.abs_trace[:steps], res.rel_trace[:steps], res.best_res, res.nstep,
                                       res.converged, steps, tol, stop_mode, rows=rows, plan=plan)
    st = _anderson_state(x0, step_fn, m, lam, beta, max_iter, tol, stop_mode, history_dtype)
    return run(st, f, max_iter, ce, cp, tol, stop_mode)


def fixed_point(f: Callable, x0: torch.Tensor, *, tau: float = 1.0, max_iter: int = 50,
                tol: float = 1e-4, stop_mode: str = "rel", check_every: Optional[int] = None,
                compact: Optional[float] = None):
    """Damped fixed-point iteration x <- (1 - tau) x + tau f(x), frozen per sample once converged."""
    st = fixed_point_state(x0, tau=tau, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    ce = resolve_check_every(check_every, x0)
    return run(st, f, max_iter, ce, resolve_compact(compact, f, ce), tol, stop_mode)


def broyden(f: Callable, x0: torch.Tensor, *, m: int = 30, max_iter: int = 50, tol: float = 1e-4,
            stop_mode: str = "rel", check_every: Optional[int] = None, compact: Optional[float] = None):
    """Limited-memory Broyden (see BroydenState)."""
    st = broyden_state(x0, m=m, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    ce = resolve_check_every(check_every, x0)
    return run(st, f, max_iter, ce, resolve_compact(compact, f, ce), tol, stop_mode)


@full_precision
def _official_mix(X, F, n: int, lam: float, beta: float, acc):
    """The official Anderson mixing of the last n iterates (whole batch, absolute Tikhonov lam)."""
    B = X.shape[0]
    G = F[:, :n] - X[:, :n]
    H = torch.zeros(B, n + 1, n + 1, dtype=acc, device=X.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    H[:, 1:, 1:] = (torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=X.dtype, device=X.device)).to(acc)
    y = torch.zeros(B, n + 1, 1, dtype=acc, device=X.device)
    y[:, 0] = 1
    alpha = torch.linalg.solve(H, y)[:, 1:n + 1, 0].to(X.dtype)
    return beta * (alpha[:, None] @ F[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]


def anderson_official(f: Callable, x0: torch.Tensor, *, m: int = 6, lam: float = 1e-4, beta: float = 1.0,
                      max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "rel"):
    """The official DEQ-fusion code's Anderson solver (locuslab/deq's `anderson`, as DEQFusion's solver.py
    runs it), for faithful reproduction: whole-batch semantics -- the residual is the Frobenius norm over
    the whole batch (rel: / (1e-5 + ||F||)), the solve stops when that batch residual is below tol and
    returns the batch's best iterate; absolute Tikhonov term lam * I; the first two steps are plain
    fixed-point steps (x1 = f(x0)); mixing beta. No per-sample freezing, early exit or compaction.
    Stats: per-sample residuals of the returned iterate, nstep / converged the batch's for every sample.
    The deqfuse `anderson` is per sample (see its docstring); this one is for comparison with the paper."""
    _check(x0, max_iter, tol, stop_mode)
    for key, v in (("m", m), ("lam", lam), ("beta", beta)):
        _check_option(key, v, key, "anderson_official")
    B, L = x0.shape
    acc = _acc_dtype(x0)
    T = max_iter
    res = Results(x0, T)
    X = x0.new_zeros(B, m, L)
    F = x0.new_zeros(B, m, L)

    def norms(x, fx):  # (batch abs, batch rel, per-sample abs, per-sample rel)
        g = (fx - x).to(acc)
        per = g.norm(dim=1)
        per_rel = per / (fx.to(acc).norm(dim=1) + 1e-5)
        a = g.norm()
        return a, a / (1e-5 + fx.to(acc).norm()), per, per_rel

    best = (float("inf"), x0.clone(), 0, None, None)
    steps = 0
    for k in range(T):
        if k < 2:  # X0 = x0, F0 = f(x0); X1 = F0, F1 = f(F0)
            x = x0 if k == 0 else F[:, 0]
        else:
            x = _official_mix(X, F, min(k, m), lam, beta, acc)
        s = k % m
        X[:, s] = x
        F[:, s] = f(x)
        steps = k + 1
        a, r, per, per_rel = norms(X[:, s], F[:, s])
        res.abs_trace[k], res.rel_trace[k] = per, per_rel
        batch = float(r if stop_mode == "rel" else a)
        if k >= 2 or T <= 2:  # (the official loop tracks the best iterate from its third step on)
            if batch < best[0]:
                best = (batch, X[:, s].clone(), k + 1, per, per_rel)
            if batch < tol:
                break
    res.best_x.copy_(best[1])
    res.best_res.copy_(best[4] if stop_mode == "rel" else best[3])
    res.nstep.fill_(best[2])
    res.converged.fill_(best[0] < tol)
    stats = SolverStats(res.abs_trace[:steps], res.rel_trace[:steps], res.best_res, res.nstep, res.converged,
                        steps, tol, stop_mode, rows=B * steps)
    return res.best_x, stats


SOLVERS = {"anderson": anderson, "broyden": broyden, "fixed_point": fixed_point, "anderson_official": anderson_official}
STATES = {"anderson": anderson_state, "broyden": broyden_state, "fixed_point": fixed_point_state}


def check_solver(name: str):
    check_choice("solver", name, sorted(SOLVERS))


def solver_options(name: str) -> set:
    """Keyword options the named solver accepts (besides f and x0)."""
    check_solver(name)
    return {p for p in inspect.signature(SOLVERS[name]).parameters if p not in ("f", "x0")}


def solve(name: str, f: Callable, x0: torch.Tensor, **kw):
    """Dispatch by name ('anderson' | 'broyden' | 'fixed_point')."""
    check_solver(name)
    return SOLVERS[name](f, x0, **kw)
