"""torch.distributed helpers of the training commands (`torchrun --nproc_per_node=N -m deqfuse train ...`,
`... -m deqfuse eval ...`).

Data parallel: every rank holds the same model (DistributedDataParallel averages the gradients); each
global minibatch is split across the ranks (rank r takes rows r, r + world, ...). This replaces a
DistributedSampler on purpose: a step sees exactly the samples a single process with the same global
batch and seed sees, and train.train_epoch scales the local losses so the averaged gradient equals that
process's gradient (tested: tests/test_training_stack.py), so results do not depend on the world size.
Process group: gloo for CPU training (the commands train on the CPU), NCCL for CUDA. Only rank 0 writes
files or shows progress.

Stalls: every collective waits at most timeout_s() seconds (default 300; `--dist-timeout` of the commands,
set_timeout in a script, before init_from_env) for its peers (and so does the start-up for the ranks to join). When one fails for that (or because a peer died), the rank raises
PeerStalled naming the collective and the ranks that stalled, found by a roll call in the process group's
store after one more timeout (`python -m deqfuse` prints it and exits with status 1; torchrun then stops
the other ranks).

In your own script: DEQFusion and DynamicFusion are ordinary modules for DDP (no buffers; solver state
and `info` are plain attributes; every parameter gets a gradient in a training step, so
find_unused_parameters is not needed). FSDP: see README "Training stack".
"""
import contextlib
import datetime
import os
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ._validate import check_float

DEFAULT_TIMEOUT_S = 300.0
_timeout_s = DEFAULT_TIMEOUT_S


def set_timeout(seconds: float) -> float:
    """How long each collective (and the start-up, in init_from_env) waits for its peers, in seconds (a positive
    number); process-wide. Returns the previous value."""
    global _timeout_s
    before, _timeout_s = _timeout_s, check_float("seconds", seconds, 0, lo_open=True)
    return before


def timeout_s() -> float:
    """Seconds a collective waits for its peers (set_timeout; default DEFAULT_TIMEOUT_S)."""
    return _timeout_s


class PeerStalled(RuntimeError):
    """A collective failed because a peer rank stalled past the timeout or died."""


def init_from_env(device: str = "cpu") -> Tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun (WORLD_SIZE > 1):
    gloo for device 'cpu', NCCL (and the LOCAL_RANK GPU) for 'cuda'; collectives time out after timeout_s()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s()))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _peer_failure(e: BaseException) -> bool:
    """e is a collective's failure: a timeout or a lost connection (gloo raises plain RuntimeErrors)."""
    msg = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in msg for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer"))


def _roll_call(wait_s: float) -> Optional[List[int]]:
    """The ranks that do not join a roll call in the process group's store within wait_s seconds (None: the
    store is unreachable). A rank blocked in a collective fails within one timeout, then joins: the ranks
    still missing after that are the stalled ones."""
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = [f"deqfuse/roll_call/{r}" for r in range(dist.get_world_size())]
        store.set(keys[dist.get_rank()], "1")
        end = time.monotonic() + wait_s
        while not store.check(keys) and time.monotonic() < end:
            time.sleep(0.1)
        return [r for r, k in enumerate(keys) if not store.check([k])]
    except Exception:  # the store's host (rank 0 outside torchrun) may be the stalled rank
        return None


@contextlib.contextmanager
def collective(what: str):
    """Around a collective, or a step that holds one (DDP's gradient all-reduce in backward): its failure
    for a stalled or dead peer raises PeerStalled naming `what`, this rank, and the ranks that stalled."""
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized() or isinstance(e, PeerStalled) or not _peer_failure(e):
            raise
        t = timeout_s()
        missing = _roll_call(t)
        if missing is None:
            who = "a peer stalled or died (the store for a roll call is unreachable)"
        elif missing:
            who = f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} stalled (missing from a roll call)"
        else:
            who = "a peer failed (every rank answered a roll call)"
        raise PeerStalled(f"rank {dist.get_rank()}: {what} failed after waiting up to {t:g} s (--dist-timeout) "
                          f"for its peers: {who} ({str(e).strip()})") from e


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global minibatch of indices."""
    if not dist.is_initialized():
        return idx
    return idx[dist.get_rank()::dist.get_world_size()]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around model when a process group runs, else model itself."""
    if not dist.is_initialized():
        return model
    with collective("DDP's parameter broadcast"):
        return torch.nn.parallel.DistributedDataParallel(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if dist.is_initialized():
        with collective("barrier"):
            dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_across_ranks(value: float) -> float:
    """A Python number summed over the ranks (itself without a process group). NCCL reduces on the GPU."""
    if not dist.is_initialized():
        return value
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    with collective("the loss all-reduce"):
        dist.all_reduce(t)
    return float(t)
