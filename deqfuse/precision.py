"""torch.autocast boundaries (the mixed-precision policy in DEQFusion's docstring): a solver's own
arithmetic and the kernel paths (Triton, C++) run in their inputs' dtype; only ATen cell GEMMs of the
reference path follow autocast."""
import contextlib
import functools

import torch

_NULL = contextlib.nullcontext()


def no_autocast(t: torch.Tensor):
    """A context with torch.autocast off on t's device (a shared null context when it is off already)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else _NULL


def full_precision(fn):
    """fn with torch.autocast off on its first argument's device."""
    @functools.wraps(fn)
    def wrapped(x, *args, **kw):
        with no_autocast(x):
            return fn(x, *args, **kw)
    return wrapped
