"""Fake (meta) kernels of the compiled ops so torch.compile traces through them without graph breaks."""
import torch


@torch.library.register_fake("deqfuse::anderson_step")
def _anderson_step_fake(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out,
                        k, beta, lam, tol, stop_rel):
    return None


@torch.library.register_fake("deqfuse::cell_forward")
def _cell_forward_fake(z, x, xf, params, groups, save):
    B, N1, D = z.shape
    N = N1 - 1
    if not save:
        return z.new_empty(B, N1, D), []
    shapes = [(N, B, D), (N, B, groups), (N, B, D), (N, B, D), (N, B, groups), (N, B, D), (N, B, D),
              (N, B, groups), (B, D), (B, D), (B, D), (B, D), (B, groups)]
    return z.new_empty(B, N1, D), [z.new_empty(s) for s in shapes]


@torch.library.register_fake("deqfuse::cell_vjp")
def _cell_vjp_fake(gbar, saved, params, groups, add=None):
    return torch.empty_like(gbar)


@torch.library.register_fake("deqfuse::cell_backward")
def _cell_backward_fake(gout, z, saved, params, groups):
    B, N1, D = gout.shape
    return (torch.empty_like(gout), gout.new_empty(B, N1 - 1, D), gout.new_empty(B, D),
            [torch.empty_like(p) for p in params])


@torch.library.register_fake("deqfuse::modality_epilogue")
def _modality_epilogue_fake(a2, x, z, b2, gn2_w, gn2_b, gn3_w, gn3_b, groups):
    N, B, D = a2.shape
    return a2.new_empty(B, N, D), a2.new_empty(N, B, D)


@torch.library.register_fake("deqfuse::group_by_choice")
def _group_by_choice_fake(choice, num_groups):
    return choice.new_empty(choice.shape[0], dtype=torch.int64), choice.new_empty(num_groups, dtype=torch.int32)


@torch.library.register_fake("deqfuse::gather_rows_multi")
def _gather_rows_multi_fake(srcs, idx):
    return [s.new_empty(idx.shape[0], s.shape[1]) for s in srcs]


@torch.library.register_fake("deqfuse::scatter_rows")
def _scatter_rows_fake(src, idx, out):
    return None


def modality_epilogue(a2, x, z, b2, gn2_w, gn2_b, gn3_w, gn3_b, groups: int = 4, backend: str = "auto"):
    """Fused epilogue (see reference/epilogue.py): the CUDA op when available, else the reference."""
    from .backend import resolve
    if resolve(backend, a2.device, "modality_epilogue") == "cuda" and a2.device.type == "cuda":
        return torch.ops.deqfuse.modality_epilogue(a2, x, z, b2, gn2_w, gn2_b, gn3_w, gn3_b, groups)
    from .reference.epilogue import modality_epilogue_ref
    return modality_epilogue_ref(a2, x, z, b2, gn2_w, gn2_b, gn3_w, gn3_b, groups)
