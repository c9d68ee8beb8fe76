"""Plain-PyTorch references of the routing ops of dynamic fusion (the contract the Triton kernels in
kernels/routing.py and the compiled ops deqfuse::group_by_choice / gather_rows_multi / scatter_rows meet).

  group_by_choice(choice [B] int, E) -> (order [B] int64, counts [E]): a stable sort of the batch by
      chosen group (group 0's samples first, each group in batch order); choices outside [0, E) are left
      out of counts (they sum to less than B) and order past sum(counts) is unspecified.
  gather_rows_multi([src_k [B, D_k]], idx [R] int64) -> [src_k[idx]]  (any dtypes; one call for all)
  scatter_rows(src [R, D], idx [R] int64, out [B, D]): out[idx[r]] = src[r], in place; returns out.
"""
import torch


def group_by_choice_ref(choice, num_groups: int):
    valid = (choice >= 0) & (choice < num_groups)
    order = torch.argsort(torch.where(valid, choice, num_groups), stable=True)
    return order, torch.bincount(choice[valid], minlength=num_groups)


def gather_rows_multi_ref(srcs, idx):
    return [s.index_select(0, idx) for s in srcs]


def scatter_rows_ref(src, idx, out):
    return out.index_copy_(0, idx, src)
