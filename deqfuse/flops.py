"""What deqfuse's compiled ops and Triton kernels cost, told to torch.utils.flop_counter.

FlopCounterMode counts ATen's matrix products only, so without this a solve on the C++ or Triton path
would count as free. Each compiled op gets a FLOP formula (register_flop_formula); a Triton kernel
launched from Python reports through `hint` (a no-op op with a formula, called only while a FlopCounterMode
is active). The numbers are those FlopCounterMode counts for the reference path doing the same work, so
a layer costs the same on every backend:
  cell forward or VJP on B rows: (2N + 2) B D^2 MACs (the N W1 / W2 products, W_g, W_f);
  the full backward (input and parameter gradients): twice that; the Jacobian loss's backward: 3x;
  an Anderson step on B rows of width L with m history slots: 2 B m L (the Gram row and the mixing);
  a whole solve (anderson_cell_solve / anderson_vjp_solve): per row it evaluated (its second output),
  one cell (or VJP) and one Anderson step -- what the reference loop counts per row and step.
"""
import torch
from torch.utils.flop_counter import register_flop_formula

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
except ImportError:  # pragma: no cover  (private API moved: no hints, the compiled ops still count)
    _get_current_dispatch_mode_stack = lambda: ()  # noqa: E731

_lib = torch.library.Library("deqfuse", "FRAGMENT")
_lib.define("flop_hint(Tensor anchor, int flops) -> ()")
_lib.impl("flop_hint", lambda anchor, flops: None, "CompositeExplicitAutograd")


@register_flop_formula(torch.ops.deqfuse.flop_hint)
def _hint_flops(anchor_shape, flops, *args, out_shape=None, **kw):
    return flops


def counting() -> bool:
    """A FlopCounterMode is active (and this is not a torch.compile trace)."""
    if torch.compiler.is_compiling():
        return False
    return any(type(m).__name__ == "_FlopCounterMode" for m in _get_current_dispatch_mode_stack())


def hint(anchor: torch.Tensor, macs: float):
    """Report `macs` multiply-adds to an active FlopCounterMode (else nothing, ~1 us)."""
    if counting():
        torch.ops.deqfuse.flop_hint(anchor, int(2 * macs))


def cell_macs(rows: int, N: int, D: int) -> int:
    return (2 * N + 2) * rows * D * D


def anderson_macs(rows: int, m: int, L: int) -> int:
    return 2 * rows * m * L


def register_ext_formulas():
    """Formulas of the compiled extension's ops (called once it is loaded)."""
    ops = torch.ops.deqfuse

    def _cell_formula(flops_per_mac: int):
        """FLOPs of a cell op whose first argument is a [B, N+1, D] state: flops_per_mac cell passes' worth
        (2: one pass, forward or VJP; 4: the VJP and the parameter gradients; 6: the Jacobian loss's backward)."""
        def formula(state_shape, *args, out_shape=None, **kw):
            B, N1, D = state_shape
            return flops_per_mac * cell_macs(B, N1 - 1, D)
        return formula

    for op, flops_per_mac in ((ops.cell_forward, 2), (ops.cell_vjp, 2), (ops.cell_backward, 4),
                              (ops.cell_jac_backward, 6)):
        register_flop_formula(op)(_cell_formula(flops_per_mac))

    @register_flop_formula(ops.anderson_step)
    def _anderson_step(x_shape, fx_shape, X_shape, *args, out_shape=None, **kw):
        B, m, L = X_shape
        return 2 * anderson_macs(B, m, L)

    def _solve(rows, L, N, D, m):
        return 2 * (cell_macs(rows, N, D) + anderson_macs(rows, m, L))

    @register_flop_formula(ops.anderson_cell_solve, get_raw=True)
    def _cell_solve(z0, x, xf, params, groups, *args, out_val=None, **kw):
        m = args[6] if len(args) > 6 else kw["m"]
        _, N, D = x.shape
        return _solve(int(out_val[1]), z0.shape[1], N, D, m)

    @register_flop_formula(ops.anderson_vjp_solve, get_raw=True)
    def _vjp_solve(g0, add, saved, params, groups, *args, out_val=None, **kw):
        m = args[6] if len(args) > 6 else kw["m"]
        D = params[0].shape[-1]
        N = g0.shape[1] // D - 1
        return _solve(int(out_val[1]), g0.shape[1], N, D, m)
