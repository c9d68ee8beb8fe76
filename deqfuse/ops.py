"""Fake (meta) kernels of the compiled ops so torch.compile traces through them without graph breaks."""
import torch

from .flops import register_ext_formulas


def _same_device(op: str, named: dict):
    """Fake kernels run for meta / fake tensors; a mix with real tensors would otherwise compute nothing
    silently, so they check what the real kernels check: one device for every tensor argument."""
    devs = {n: t.device for n, t in named.items() if isinstance(t, torch.Tensor)}
    first = next(iter(devs))
    for n, d in devs.items():
        if d != devs[first]:
            raise RuntimeError(f"{op}: {n} is on {d}, {first} is on {devs[first]} (all tensors must be on one device)")


@torch.library.register_fake("deqfuse::anderson_step")
def _anderson_step_fake(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out,
                        k, beta, lam, tol, stop_rel):
    _same_device("anderson_step", dict(x=x, fx=fx, X=X, G=G, GG=GG, best_x=best_x, best_res=best_res,
                                       converged=converged, nstep=nstep, abs_out=abs_out, rel_out=rel_out))
    if k < 0:
        raise RuntimeError(f"anderson_step: the step index k must be >= 0, got {k}")
    return None


@torch.library.register_fake("deqfuse::cell_forward")
def _cell_forward_fake(z, x, xf, params, groups, save):
    _same_device("cell_forward", dict(z=z, x=x, xf=xf, **{f"params[{i}]": p for i, p in enumerate(params)}))
    B, N1, D = z.shape
    N = N1 - 1
    if not save:
        return z.new_empty(B, N1, D), []
    shapes = [(N, B, D), (N, B, groups), (N, B, D), (N, B, D), (N, B, groups), (N, B, D), (N, B, D),
              (N, B, groups), (B, D), (B, D), (B, D), (B, D), (B, groups)]
    return z.new_empty(B, N1, D), [z.new_empty(s) for s in shapes]


@torch.library.register_fake("deqfuse::cell_vjp")
def _cell_vjp_fake(gbar, saved, params, groups, add=None):
    _same_device("cell_vjp", dict(gbar=gbar, add=add, **{f"saved[{i}]": t for i, t in enumerate(saved)},
                                  **{f"params[{i}]": p for i, p in enumerate(params)}))
    return torch.empty_like(gbar)


@torch.library.register_fake("deqfuse::cell_backward")
def _cell_backward_fake(gout, z, saved, params, groups):
    _same_device("cell_backward", dict(gout=gout, z=z, **{f"saved[{i}]": t for i, t in enumerate(saved)}))
    B, N1, D = gout.shape
    return (torch.empty_like(gout), gout.new_empty(B, N1 - 1, D), gout.new_empty(B, D),
            [torch.empty_like(p) for p in params])


@torch.library.register_fake("deqfuse::cell_jac_backward")
def _cell_jac_backward_fake(v, wbar, z, saved, params, groups):
    _same_device("cell_jac_backward", dict(v=v, wbar=wbar, z=z, **{f"saved[{i}]": t for i, t in enumerate(saved)}))
    B, N1, D = v.shape
    return (torch.empty_like(v), v.new_empty(B, N1 - 1, D), v.new_empty(B, D), [torch.empty_like(p) for p in params])


@torch.library.register_fake("deqfuse::group_by_choice")
def _group_by_choice_fake(choice, num_groups):
    return choice.new_empty(choice.shape[0], dtype=torch.int64), choice.new_empty(num_groups, dtype=torch.int32)


@torch.library.register_fake("deqfuse::gather_rows_multi")
def _gather_rows_multi_fake(srcs, idx):
    _same_device("gather_rows_multi", dict(idx=idx, **{f"srcs[{i}]": t for i, t in enumerate(srcs)}))
    return [s.new_empty(idx.shape[0], s.shape[1]) for s in srcs]


@torch.library.register_fake("deqfuse::scatter_rows")
def _scatter_rows_fake(src, idx, out):
    _same_device("scatter_rows", dict(src=src, idx=idx, out=out))
    return None


register_ext_formulas()  # what the compiled ops cost, for torch.utils.flop_counter (deqfuse/flops.py)
