"""Dynamic-routing kernels (contracts: deqfuse/reference/routing.py).

- group_by_choice_triton: stable counting sort of the batch by chosen expert in one launch (replaces
  argsort + bincount, ~6 launches): order [B] and counts [E].
- gather_rows_multi_triton: every modality's rows in that order in one launch, so each expert's
  sub-batch is a contiguous slice (no per-expert gathers).
- scatter_rows_triton: the experts' (concatenated) outputs back to batch order.
At small batches routing is launch-bound on a GPU, hence the fusion into as few launches as possible.
"""
import torch
import triton
import triton.language as tl

MAX_SOURCES = 4  # modalities moved per gather launch (more: several launches)


@triton.jit
def _group_kernel(choice_ptr, order_ptr, counts_ptr, B, E, EP: tl.constexpr, BLOCK: tl.constexpr):
    """One program. Pass 1: histogram of choices; pass 2: stable rank of each sample inside its group
    plus the group's start -> order[pos] = sample. Choices outside [0, E) are dropped (counts then sum
    to less than B, which the caller checks)."""
    e = tl.arange(0, EP)
    hist = tl.zeros([EP], tl.int32)
    for b0 in range(0, B, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        c = tl.load(choice_ptr + offs, mask=offs < B, other=-1)
        hist += tl.sum((c[None, :] == e[:, None]).to(tl.int32), 1)
    tl.store(counts_ptr + e, hist, mask=e < E)
    base = tl.cumsum(hist, 0) - hist                            # exclusive prefix: group starts
    for b0 in range(0, B, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        c = tl.load(choice_ptr + offs, mask=offs < B, other=-1)
        hot = (c[None, :] == e[:, None]).to(tl.int32)         # [EP, BLOCK]
        rank = tl.cumsum(hot, 1) - hot                          # earlier samples of the same group
        pos = tl.sum(hot * (base[:, None] + rank), 0)
        tl.store(order_ptr + pos, offs.to(tl.int64), mask=(offs < B) & (c >= 0) & (c < E))
        base += tl.sum(hot, 1)


def group_by_choice_triton(choice, num_groups: int):
    """choice: [B] int -> (order [B] int64, counts [E] int32 on the device). No host sync."""
    B = choice.numel()
    order = torch.empty(B, dtype=torch.int64, device=choice.device)
    counts = torch.empty(num_groups, dtype=torch.int32, device=choice.device)
    block = min(1024, max(16, triton.next_power_of_2(B)))
    _group_kernel[(1,)](choice.contiguous(), order, counts, B, num_groups,
                        EP=max(2, triton.next_power_of_2(num_groups)), BLOCK=block)
    return order, counts


@triton.jit
def _copy_row(src_ptr, dst_ptr, src_row, dst_row, D, BLOCK: tl.constexpr):
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        m = offs < D
        tl.store(dst_ptr + dst_row * D + offs, tl.load(src_ptr + src_row * D + offs, mask=m), mask=m)


@triton.jit
def _move_rows_kernel(src_ptr, idx_ptr, dst_ptr, D, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    """GATHER: dst[r] = src[idx[r]]; else (scatter): dst[idx[r]] = src[r]. One program per row r."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.load(idx_ptr + r).to(tl.int64)
    _copy_row(src_ptr, dst_ptr, j if GATHER else r, r if GATHER else j, D, BLOCK)


@triton.jit
def _gather_multi_kernel(idx_ptr, s0, s1, s2, s3, d0, d1, d2, d3, D0, D1, D2, D3,
                         NSRC: tl.constexpr, BLOCK: tl.constexpr):
    """dst_k[r] = src_k[idx[r]] for the NSRC (<= 4) sources; one program per row r."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.load(idx_ptr + r).to(tl.int64)
    _copy_row(s0, d0, j, r, D0, BLOCK)
    if NSRC > 1:
        _copy_row(s1, d1, j, r, D1, BLOCK)
    if NSRC > 2:
        _copy_row(s2, d2, j, r, D2, BLOCK)
    if NSRC > 3:
        _copy_row(s3, d3, j, r, D3, BLOCK)


def _block(D):
    return min(1024, triton.next_power_of_2(max(D, 1)))


def _launch(src, idx, dst, gather):
    rows = idx.numel()
    if rows == 0:
        return dst
    D = src.shape[1]
    _move_rows_kernel[(rows,)](src, idx, dst, D, GATHER=gather, BLOCK=_block(D))
    return dst


def gather_rows_multi_triton(srcs, idx):
    """[src_k: [B, D_k]], idx: [R] -> [dst_k: [R, D_k]] with dst_k[r] = src_k[idx[r]]; one launch per
    MAX_SOURCES sources."""
    srcs = [s.contiguous() for s in srcs]
    idx = idx.contiguous()
    dsts = [s.new_empty(idx.numel(), s.shape[1]) for s in srcs]
    if idx.numel() == 0:
        return dsts
    for k0 in range(0, len(srcs), MAX_SOURCES):
        ss, dd = srcs[k0:k0 + MAX_SOURCES], dsts[k0:k0 + MAX_SOURCES]
        n = len(ss)
        pad = MAX_SOURCES - n                    # unused slots: any valid pointer, width 0
        widths = [s.shape[1] for s in ss] + [0] * pad
        _gather_multi_kernel[(idx.numel(),)](idx, *ss, *[ss[0]] * pad, *dd, *[dd[0]] * pad, *widths,
                                             NSRC=n, BLOCK=_block(max(widths)))
    return dsts


def scatter_rows_triton(src, idx, out):
    """out[idx[r]] = src[r] in place. src: [R, D], out: [B, D] contiguous."""
    return _launch(src.contiguous(), idx.contiguous(), out, False)
