"""torch.distributed helpers of the training commands (`torchrun --nproc_per_node=N -m deqfuse train ...`,
`... -m deqfuse eval ...`).

Data parallel: every rank holds the same model (DistributedDataParallel averages the gradients); each
global minibatch is split across the ranks (rank r takes rows r, r + world, ...). This replaces a
DistributedSampler on purpose: a step sees exactly the samples a single process with the same global
batch and seed sees, and train.train_epoch scales the local losses so the averaged gradient equals that
process's gradient (tested: tests/test_training_stack.py), so results do not depend on the world size.
Process group: gloo for CPU training (the commands train on the CPU), NCCL for CUDA. Only rank 0 writes
files or shows progress.

In your own script: DEQFusion and DynamicFusion are ordinary modules for DDP (no buffers; solver state
and `info` are plain attributes; every parameter gets a gradient in a training step, so
find_unused_parameters is not needed). FSDP: see README "Training stack".
"""
import os
from typing import Tuple

import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> Tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun (WORLD_SIZE > 1):
    gloo for device 'cpu', NCCL (and the LOCAL_RANK GPU) for 'cuda'."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global minibatch of indices."""
    if not dist.is_initialized():
        return idx
    return idx[dist.get_rank()::dist.get_world_size()]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around model when a process group runs, else model itself."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_across_ranks(value: float) -> float:
    """A Python number summed over the ranks (itself without a process group). NCCL reduces on the GPU."""
    if not dist.is_initialized():
        return value
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t)
