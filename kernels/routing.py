"""Row gather / scatter for dynamic routing: move the samples routed to one expert into a contiguous
sub-batch and put the expert's outputs back in batch order (contract: reference in deqfuse/dynamic.py,
`gather_rows_ref` / `scatter_rows_ref`)."""
import triton
import triton.language as tl


@triton.jit
def _move_rows_kernel(src_ptr, idx_ptr, dst_ptr, D, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    """GATHER: dst[r] = src[idx[r]]; else (scatter): dst[idx[r]] = src[r]. One program per row r."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.load(idx_ptr + r).to(tl.int64)
    src_row = j if GATHER else r
    dst_row = r if GATHER else j
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        m = offs < D
        v = tl.load(src_ptr + src_row * D + offs, mask=m)
        tl.store(dst_ptr + dst_row * D + offs, v, mask=m)


def _launch(src, idx, dst, gather):
    rows = idx.numel()
    if rows == 0:
        return dst
    D = src.shape[1]
    _move_rows_kernel[(rows,)](src, idx, dst, D, GATHER=gather, BLOCK=min(1024, triton.next_power_of_2(D)))
    return dst


def gather_rows_triton(src, idx):
    """src: [B, D], idx: [R] int -> [R, D] with row r = src[idx[r]]."""
    src = src.contiguous()
    return _launch(src, idx.contiguous(), src.new_empty(idx.numel(), src.shape[1]), True)


def scatter_rows_triton(src, idx, out):
    """out[idx[r]] = src[r] in place. src: [R, D], out: [B, D] contiguous."""
    return _launch(src.contiguous(), idx.contiguous(), out, False)
