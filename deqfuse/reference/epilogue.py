"""Reference of the fused modality epilogue (the CUDA op deqfuse::modality_epilogue checks against it)."""
import torch

from .groupnorm import gn_forward


def modality_epilogue_ref(a2, x, z, b2, gn2_w, gn2_b, gn3_w, gn3_b, groups: int = 4):
    """a2: [N, B, D] (W2 GEMM output), x: [B, N, D], z: [B, N+1, D] -> (out [B, N, D], u [N, B, D]).

    a = a2 + b2_i + x_i ; u = GN2_i(a) + z_i ; out = GN3_i(ReLU(u)).
    """
    n = a2.shape[0]
    acc = torch.float64 if a2.dtype == torch.float64 else torch.float32
    a = a2.transpose(0, 1).to(acc) + b2 + x.to(acc)
    u = gn_forward(a, gn2_w, gn2_b, groups)[0] + z[:, :n].to(acc)
    out = gn_forward(torch.relu(u), gn3_w, gn3_b, groups)[0]
    return out.to(a2.dtype), u.transpose(0, 1).contiguous().to(a2.dtype)
