"""Input checks with errors that name the offending argument."""
import torch


def check_features(features, num_modalities: int, dim: int, ref: torch.Tensor, check_finite: bool = True):
    """features: list of N tensors [B, D] on ref's device, floating point, finite.
    The finiteness check syncs with the host, so it is skipped under torch.compile and while a CUDA graph
    is being captured."""
    if check_finite and (torch.compiler.is_compiling() or (ref.is_cuda and torch.cuda.is_current_stream_capturing())):
        check_finite = False  # a host sync: a graph break under torch.compile, illegal in a CUDA graph
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list of {num_modalities} tensors [B, {dim}], got {type(features).__name__}")
    if len(features) != num_modalities:
        raise ValueError(f"features must hold {num_modalities} tensors (num_modalities), got {len(features)}")
    B = None
    for i, f in enumerate(features):
        name = f"features[{i}]"
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(f).__name__}")
        if f.dim() != 2 or f.shape[1] != dim:
            raise ValueError(f"{name} must have shape [B, {dim}], got {list(f.shape)}")
        B = f.shape[0] if B is None else B
        if f.shape[0] != B:
            raise ValueError(f"{name} has batch {f.shape[0]}, features[0] has {B}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {f.dtype}")
        if f.device != ref.device:
            raise ValueError(f"{name} is on {f.device}, the layer's parameters are on {ref.device}")
        if check_finite and not bool(torch.isfinite(f).all()):
            raise ValueError(f"{name} has non-finite values (NaN or Inf)")
    if B == 0:
        raise ValueError("features have batch size 0")
    return B


def check_dim_groups(dim: int, groups: int):
    if dim <= 0 or groups <= 0 or dim % groups:
        raise ValueError(f"dim ({dim}) must be a positive multiple of groups ({groups}) for GroupNorm")
