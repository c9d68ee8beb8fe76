"""Plain-PyTorch references that every kernel in kernels/ and csrc/ is checked against."""
from .anderson import anderson_step_ref, bordered_solve, record_residual_ref
from .cell import CellParams, cell_forward, cell_vjp, fuse_inputs, stacked_linear
from .groupnorm import gn_backward, gn_forward, gn_stats
from .routing import gather_rows_multi_ref, group_by_choice_ref, scatter_rows_ref

__all__ = ["anderson_step_ref", "bordered_solve", "record_residual_ref", "CellParams", "cell_forward", "cell_vjp",
           "fuse_inputs", "stacked_linear", "gn_backward", "gn_forward", "gn_stats",
           "group_by_choice_ref", "gather_rows_multi_ref", "scatter_rows_ref"]
