"""Plain-PyTorch GroupNorm forward/backward over the last dim, batched over any leading dims.

Shapes: y: [..., D] with D divisible by ``groups``; gamma/beta broadcast against y (e.g. [N, D]
for a stack of N modalities laid out as [B, N, D]).
"""
import torch

EPS = 1e-5  # nn.GroupNorm's default


def gn_stats(y: torch.Tensor, groups: int, eps: float = EPS):
    """Per-(row, group) mean and 1/std. Returns (mean, rstd), each [..., groups, 1]."""
    yg = y.unflatten(-1, (groups, -1))
    mean = yg.mean(-1, keepdim=True)
    var = (yg - mean).square().mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def gn_forward(y, gamma, beta, groups: int, eps: float = EPS):
    """GroupNorm of y over its last dim. Returns (out, yhat) with yhat the normalised input."""
    mean, rstd = gn_stats(y, groups, eps)
    yhat = ((y.unflatten(-1, (groups, -1)) - mean) * rstd).flatten(-2)
    return yhat * gamma + beta, (yhat, rstd)


def gn_backward(dout, gamma, saved, groups: int):
    """d(input) of GroupNorm given d(output); saved = (yhat, rstd) from gn_forward."""
    yhat, rstd = saved
    dyhat = (dout * gamma).unflatten(-1, (groups, -1))
    yh = yhat.unflatten(-1, (groups, -1))
    dy = rstd * (dyhat - dyhat.mean(-1, keepdim=True) - yh * (dyhat * yh).mean(-1, keepdim=True))
    return dy.flatten(-2)
