"""Input and option checks with errors that name the offending argument (as the caller spelled it)."""
import math
import numbers

import torch


def host_sync_allowed(t: torch.Tensor) -> bool:
    """False under torch.compile tracing (a sync is a graph break) and while a CUDA graph is being
    captured on t's device (a sync is illegal there)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_int(name: str, v, lo: int = None, hi: int = None) -> int:
    """v must be an int (not a bool) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be {rng}, got {v}")
    return int(v)


def check_float(name: str, v, lo: float = None, hi: float = None, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """v must be a finite real number in the interval (lo/hi open or closed as given)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        right = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        rng = f"in {left}, {right}" if lo is not None and hi is not None else (
            f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"{'<' if hi_open else '<='} {hi}")
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")
    return v


def check_choice(name: str, v, choices):
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")
    return v


def magnitude_limit(dtype: torch.dtype) -> float:
    """Largest |feature| the cell can take in this dtype: GroupNorm squares deviations from the group
    mean (up to twice the largest value), which must stay finite."""
    return math.sqrt(torch.finfo(dtype).max) / 4


def _autocast_output(f: torch.Tensor) -> bool:
    """f has the dtype torch.autocast gives on its device right now (a feature computed by an autocast
    layer: accepted, and cast to the parameters' dtype by the layer)."""
    dev = f.device.type
    return torch.is_autocast_enabled(dev) and f.dtype == torch.get_autocast_dtype(dev)


def check_rows(features, num_modalities: int, widths, ref: torch.Tensor, mask=None, width_name: str = "dim"):
    """features: a list of N tensors [B, *, widths[i]] with ref's device and dtype (ref: a parameter of the
    layer; under torch.autocast also the autocast dtype), every one with the same number of dims and the
    same leading dims [B, *] up to size-1 dims (broadcast; B itself must match), B >= 1; mask: None or a
    bool tensor of exactly the leading shape on ref's device. width_name: the argument that sets the
    widths (for messages). Returns the (broadcast) leading shape. No host sync."""
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list of {num_modalities} tensors [B, *, D_i], got "
                        f"{type(features).__name__}")
    if len(features) != num_modalities:
        raise ValueError(f"features must hold {num_modalities} tensors (num_modalities), got {len(features)}")
    lead = None
    for i, f in enumerate(features):
        name = f"features[{i}]"
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {f.dtype}")
        if f.dim() < 2:
            raise ValueError(f"{name} must have shape [B, *, {widths[i]}], got {list(f.shape)}")
        if f.shape[-1] != widths[i]:
            src = f"{width_name}[{i}]" if width_name == "in_dims" else width_name
            raise ValueError(f"{name} must have shape [B, *, {widths[i]}] ({src} = {widths[i]}), got "
                             f"{list(f.shape)}" + (" (pass in_dims to project other widths)"
                                                   if width_name == "dim" else ""))
        if f.dtype != ref.dtype and not _autocast_output(f):
            raise TypeError(f"{name} is {f.dtype}, the layer's parameters are {ref.dtype} "
                            f"(cast the features, or the layer with .to({f.dtype}))")
        if f.device != ref.device:
            raise ValueError(f"{name} is on {f.device}, the layer's parameters are on {ref.device}")
        shape = tuple(f.shape[:-1])
        if lead is None:
            lead = shape
            continue
        if shape[:1] != lead[:1]:
            raise ValueError(f"{name} has batch {shape[0]}, features[0] has {lead[0]}")
        ok = len(shape) == len(lead) and all(
            a == b or a == 1 or b == 1 for a, b in zip(shape[1:], lead[1:]))
        if not ok:
            raise ValueError(f"{name} has leading dims {list(shape)}, features[0] has {list(features[0].shape[:-1])}: "
                             f"every modality needs the same [B, *] (size-1 dims broadcast)")
        lead = (lead[0],) + tuple(max(a, b) for a, b in zip(shape[1:], lead[1:]))
    if lead[0] == 0:
        raise ValueError("features have batch size 0")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor [B, *] (True = a real row), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have the features' leading shape {list(lead)}, got {list(mask.shape)}")
        if mask.device != ref.device:
            raise ValueError(f"mask is on {mask.device}, the layer's parameters are on {ref.device}")
    return lead


def check_feature_values(features, dtype: torch.dtype):
    """Every feature finite and within magnitude_limit(dtype). features: the N [B, D_i] tensors, or them
    stacked [B, N, D] (one reduction). One host sync."""
    limit = magnitude_limit(dtype)
    if isinstance(features, torch.Tensor):
        # fast path (every forward): the extremes of the whole stack, one reduction (NaN propagates);
        # the per-modality maxima below only when something is out of range, for the message
        lo, hi = torch.aminmax(features.detach())
        if -float(lo) <= limit and float(hi) <= limit:  # False for NaN
            return
        amaxes = features.abs().amax(dim=(0, 2)).tolist()
    else:
        amaxes = torch.stack([f.detach().abs().amax().to(torch.float64) for f in features]).tolist()
    for i, amax in enumerate(amaxes):
        if not math.isfinite(amax):
            raise ValueError(f"features[{i}] has non-finite values (NaN or Inf)")
        if amax > limit:
            raise ValueError(f"features[{i}] has values up to {amax:.3g}: beyond {limit:.3g}, what "
                             f"{dtype} GroupNorm can square without overflow; rescale the features")


def check_dim_groups(dim: int, groups: int):
    check_int("dim", dim, 1)
    check_int("groups", groups, 1)
    if dim % groups:
        raise ValueError(f"dim ({dim}) must be a positive multiple of groups ({groups}) for GroupNorm")
