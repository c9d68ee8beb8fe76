"""Optimiser conventions for models that hold deqfuse layers."""
from torch import nn


def param_groups(model: nn.Module, weight_decay: float = 0.01) -> list:
    """Two optimiser parameter groups for `model`: weight decay on the weight matrices, none on the gains and
    biases -- those a submodule names in its no_weight_decay() (the timm convention; DEQFusion's stacked
    [N, D] GroupNorm gains and biases are among them) and every parameter with fewer than 2 dims. Parameters
    with requires_grad=False are left out. Use: torch.optim.AdamW(deqfuse.param_groups(model, 0.05), lr=1e-3)."""
    skip = set()
    for prefix, mod in model.named_modules():
        names = getattr(mod, "no_weight_decay", None)
        if callable(names):
            skip |= {f"{prefix}.{n}" if prefix else n for n in names()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim < 2 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
