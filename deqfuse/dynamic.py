"""Dynamic multimodal fusion (Xue & Marculescu, "Dynamic Multimodal Fusion", DynMM).

Modality-level: a gate on the raw features picks one expert per sample (experts = networks over
subsets of the modalities). Training relaxes the choice with Gumbel-softmax (soft, or hard
straight-through) and adds the resource-aware loss lambda * sum_e g_e C(E_e); inference takes the
hard top-1 and really runs each expert only on its own sub-batch (gather -> expert -> scatter back),
reporting the realised cost. Fusion-level: DepthGatedFusion picks a depth per sample for a stack of
fusion stages; at inference the batch shrinks to the samples still active at each stage.
Costs C are MACs per sample, counted with torch.utils.flop_counter (FLOPs / 2).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import backend as _backend
from . import profiling
from ._validate import check_bool, check_choice, check_float, check_int
from .reference.routing import gather_rows_multi_ref, group_by_choice_ref, scatter_rows_ref


# ---------------------------------------------------------------- routing (references: reference/routing.py)
def _scatter_rows_op(src, idx, out):
    torch.ops.deqfuse.scatter_rows(src, idx, out)
    return out


def _router(device, backend, experts: int = None):
    """(group_by_choice, gather_rows_multi, scatter_rows) for this device, backend and expert count."""
    b = _backend.select("routing", backend, device, experts=experts)
    if b == "cuda":
        ops = torch.ops.deqfuse
        return ops.group_by_choice, ops.gather_rows_multi, _scatter_rows_op
    if b == "triton":
        from .kernels.routing import gather_rows_multi_triton, group_by_choice_triton, scatter_rows_triton
        return group_by_choice_triton, gather_rows_multi_triton, scatter_rows_triton
    return group_by_choice_ref, gather_rows_multi_ref, scatter_rows_ref


def group_by_choice(choice, num_groups: int, backend: str = "reference"):
    """(order [B], counts list[int]); the one host sync of routed inference (the counts size the
    sub-batches). Raises if a choice lies outside [0, num_groups)."""
    order, counts = _router(choice.device, backend, num_groups)[0](choice, num_groups)
    counts = counts.tolist()
    if sum(counts) != choice.numel():
        raise ValueError(f"choice: every entry must lie in [0, {num_groups}); "
                         f"{choice.numel() - sum(counts)} of {choice.numel()} do not")
    return order, counts


# ---------------------------------------------------------------- cost counting
def count_macs(module: nn.Module, example_inputs: Sequence, per_sample: bool = True) -> float:
    """MACs of one forward (FLOPs / 2 by torch.utils.flop_counter), divided by the batch if per_sample."""
    was_training = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*example_inputs)
    module.train(was_training)
    macs = fc.get_total_flops() / 2
    first = example_inputs[0]
    batch = (first[0] if isinstance(first, (list, tuple)) else first).shape[0]
    return macs / batch if per_sample else macs


# ---------------------------------------------------------------- built-in experts and gate
class SubsetExpert(nn.Module):
    """Applies `net` to the chosen modalities: net(list of those features) -> [B, out]."""

    def __init__(self, modalities: Sequence[int], net: nn.Module):
        super().__init__()
        modalities = list(modalities)
        if not modalities:
            raise ValueError("modalities must name at least one modality")
        for j, i in enumerate(modalities):
            check_int(f"modalities[{j}]", i, 0)
        self.modalities, self.net = modalities, net

    def forward(self, features):
        return self.net([features[i] for i in self.modalities])


class MLPHead(nn.Module):
    """Concatenate the given features and apply a 2-layer MLP. in_dim = sum of their widths."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, feats):
        return self.net(feats[0] if len(feats) == 1 else torch.cat(list(feats), 1))


class DEQHead(nn.Module):
    """Project each modality to `dim`, fuse with DEQFusion: a full-fusion expert."""

    def __init__(self, in_dims: Sequence[int], dim: int, **deq_kw):
        super().__init__()
        from .layers import DEQFusion
        self.proj = nn.ModuleList(nn.Linear(d, dim) for d in in_dims)
        self.deq = DEQFusion(dim, len(in_dims), **{"on_nonconvergence": "ignore", **deq_kw})

    def forward(self, feats):
        return self.deq([p(f) for p, f in zip(self.proj, feats)])


class GumbelSchedule:
    """Temperature tau(epoch) = max(tau_min, tau0 * decay^epoch) for the Gumbel-softmax gate."""

    def __init__(self, tau0: float = 1.0, decay: float = 0.9, tau_min: float = 0.1):
        check_float("tau0", tau0, 0, lo_open=True)
        check_float("decay", decay, 0, 1, lo_open=True)
        check_float("tau_min", tau_min, 0, lo_open=True)
        self.tau0, self.decay, self.tau_min = tau0, decay, tau_min

    def __call__(self, epoch: int) -> float:
        return max(self.tau_min, self.tau0 * self.decay ** epoch)


@dataclass
class RoutingInfo:
    probs: torch.Tensor           # [B, E] gate weights used (relaxed in training, one-hot in eval)
    choice: torch.Tensor          # [B] chosen expert (argmax)
    counts: List[int]             # samples per expert (eval), [] in training
    expected_cost: torch.Tensor   # scalar: mean_b sum_e g_be C_e (MACs per sample; differentiable)
    realized_macs: float          # eval: sum_e counts_e C_e ; training: B * sum_e C_e (all experts ran)
    full_macs: float              # B * sum_e C_e: running every expert


class DynamicFusion(nn.Module):
    """Per-sample expert selection over modality subsets.

    Args:
      experts: modules taking the full feature list [B, D_i] and returning [B, out] (wrap subset
        networks in SubsetExpert).
      in_dims: widths D_i of the modalities (the default gate reads their concatenation).
      gate: optional module: concatenated features [B, sum D_i] -> logits [B, E] (default: a 2-layer MLP).
      costs: MACs per sample of each expert; None = count them with example inputs on first forward.
      tau, hard: Gumbel-softmax temperature and straight-through hard sampling in training.
      lambda_cost, budget: resource loss lambda * E[cost] / max(C), or lambda * max(0, E[cost] - budget)/max(C).
      backend: routing kernels ('auto' | 'cuda' (compiled ops, also on the CPU) | 'triton' | 'reference').
    forward(features) -> [B, out]; `self.info` holds RoutingInfo; `resource_loss()` the cost term.
    """

    def __init__(self, experts: Sequence[nn.Module], in_dims: Sequence[int], gate: Optional[nn.Module] = None,
                 costs: Optional[Sequence[float]] = None, tau: float = 1.0, hard: bool = False,
                 lambda_cost: float = 0.0, budget: Optional[float] = None, gate_hidden: int = 64,
                 backend: str = "auto"):
        super().__init__()
        if len(experts) < 1:
            raise ValueError("experts must hold at least one module")
        in_dims = list(in_dims)
        if not in_dims:
            raise ValueError("in_dims must give the width of at least one modality")
        for i, d in enumerate(in_dims):
            check_int(f"in_dims[{i}]", d, 1)
        for e, ex in enumerate(experts):
            for i in getattr(ex, "modalities", ()):
                if i >= len(in_dims):
                    raise ValueError(f"experts[{e}] reads modality {i}, but in_dims has {len(in_dims)} modalities")
        if costs is not None:
            costs = list(costs)
            if len(costs) != len(experts):
                raise ValueError(f"costs must give one cost per expert ({len(experts)}), got {len(costs)}")
            for e, c in enumerate(costs):
                check_float(f"costs[{e}]", c, 0)
        check_float("lambda_cost", lambda_cost, 0)
        if budget is not None:
            check_float("budget", budget, 0)
        check_int("gate_hidden", gate_hidden, 1)
        check_choice("backend", backend, _backend.BACKENDS)
        check_bool("hard", hard)
        self.experts = nn.ModuleList(experts)
        self.in_dims = in_dims
        self.gate = gate or nn.Sequential(nn.Linear(sum(in_dims), gate_hidden), nn.ReLU(),
                                          nn.Linear(gate_hidden, len(experts)))
        self.register_buffer("costs", torch.tensor(list(costs), dtype=torch.float64) if costs is not None
                             else torch.full((len(experts),), float("nan"), dtype=torch.float64))
        self.tau, self.hard, self.lambda_cost, self.budget, self.backend = tau, hard, lambda_cost, budget, backend
        self.info: Optional[RoutingInfo] = None

    tau = property(lambda self: self._tau, lambda self, v: setattr(self, "_tau", check_float("tau", v, 0, lo_open=True)),
                   doc="Gumbel-softmax temperature (> 0; set per epoch by a GumbelSchedule)")

    def __getstate__(self):  # copies/pickles leave out the last forward's graph-attached info
        state = self.__dict__.copy()
        state["info"] = None
        return state

    def _check(self, features):
        if not isinstance(features, (list, tuple)) or len(features) != len(self.in_dims):
            raise ValueError(f"features must be a list of {len(self.in_dims)} tensors, got "
                             f"{len(features) if isinstance(features, (list, tuple)) else type(features).__name__}")
        for i, f in enumerate(features):
            if not isinstance(f, torch.Tensor) or not f.is_floating_point():
                raise TypeError(f"features[{i}] must be a floating-point tensor, got "
                                f"{getattr(f, 'dtype', type(f).__name__)}")
        B = features[0].shape[0]
        for i, (f, d) in enumerate(zip(features, self.in_dims)):
            if f.dim() != 2 or f.shape != (B, d):
                raise ValueError(f"features[{i}] must have shape [{B}, {d}], got {list(f.shape)}")
            if f.dtype != features[0].dtype or f.device != features[0].device:
                raise TypeError(f"features[{i}] is {f.dtype} on {f.device}, features[0] is "
                                f"{features[0].dtype} on {features[0].device}")
        if B == 0:
            raise ValueError("features have batch size 0")

    def measure_costs(self, features):
        """Count each expert's MACs per sample on (a slice of) these features."""
        ex = [f[:1] for f in features]
        self.costs = torch.tensor([count_macs(e, (ex,)) for e in self.experts], dtype=torch.float64,
                                  device=self.costs.device)

    def forward(self, features):
        self._check(features)
        if torch.isnan(self.costs).any():
            self.measure_costs(features)
        logits = self.gate(torch.cat(list(features), 1))
        B, E = logits.shape
        costs = self.costs.to(logits.dtype)
        full = float(self.costs.sum()) * B
        if self.training:
            probs = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard)
            outs = torch.stack([e(features) for e in self.experts], 1)   # [B, E, out]: gate gradients
            out = (probs.unsqueeze(-1) * outs).sum(1)
            self.info = RoutingInfo(probs, probs.argmax(1), [], (probs * costs).sum(1).mean(), full, full)
            return out
        choice = logits.argmax(1)
        out, counts = self.route(features, choice)
        realized = float(sum(c * float(k) for c, k in zip(self.costs.tolist(), counts)))
        probs = F.one_hot(choice, E).to(logits.dtype)
        self.info = RoutingInfo(probs, choice, counts, (probs * costs).sum(1).mean(), realized, full)
        return out

    def route(self, features, choice):
        """Run expert e only on the samples with choice == e. Returns (outputs in batch order, counts).
        The batch is sorted by expert once (every modality in one gather), so each expert reads a
        contiguous slice; the outputs go back to batch order in one scatter."""
        _, gather_multi, scatter = _router(features[0].device, self.backend, len(self.experts))
        with profiling.range("route"):
            order, counts = group_by_choice(choice, len(self.experts), self.backend)
            grouped = gather_multi(list(features), order)
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n:
                with profiling.range(f"expert[{e}]"):
                    ys.append(self.experts[e]([f[start:start + n] for f in grouped]))
            start += n
        if not ys:  # empty batch: an expert on 0 rows gives the output width
            ys = [self.experts[0]([f[:0] for f in grouped])]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        with profiling.range("unroute"):
            return scatter(y, order, y.new_empty(choice.shape[0], y.shape[1])), counts

    def resource_loss(self):
        """lambda * E[cost] / max_e C_e (or the hinge max(0, E[cost] - budget) form)."""
        if self.info is None:
            raise RuntimeError("resource_loss() needs a forward pass first")
        scale = float(self.costs.max())
        c = self.info.expected_cost
        if self.budget is not None:
            c = torch.clamp(c - self.budget, min=0)
        return self.lambda_cost * c / scale


class DepthGatedFusion(nn.Module):
    """Fusion-level gating: a gate picks a depth k in 1..K per sample for a stack of stages
    (h_0 = stem(features), h_j = stage_j(h_{j-1}), output head(h_k)). Training mixes the K depths with
    Gumbel weights; inference runs stage j only on the samples whose depth is >= j (the batch
    shrinks) and reports the realised MACs."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], gate: nn.Module, tau: float = 1.0,
                 hard: bool = False):
        super().__init__()
        if len(stages) < 1:
            raise ValueError("stages must hold at least one module")
        check_bool("hard", hard)
        self.stem, self.stages, self.gate = stem, nn.ModuleList(stages), gate
        self.tau, self.hard = tau, hard
        self.stage_costs: Optional[List[float]] = None
        self.info: Optional[RoutingInfo] = None

    tau = DynamicFusion.tau
    __getstate__ = DynamicFusion.__getstate__  # copies/pickles leave out the last forward's info

    def forward(self, features):
        h = self.stem(features)
        if h.shape[0] == 0:
            raise ValueError("features have batch size 0")
        logits = self.gate(h)                       # [B, K]
        K = len(self.stages)
        if self.stage_costs is None:
            self.stage_costs = [count_macs(s, (h[:1],)) for s in self.stages]
        depth_cost = torch.tensor(self.stage_costs, dtype=h.dtype, device=h.device).cumsum(0)  # cost of depth k
        B = h.shape[0]
        full = float(depth_cost[-1]) * B
        if self.training:
            w = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard)
            out = torch.zeros_like(h)
            for j, s in enumerate(self.stages):
                h = s(h)
                out = out + w[:, j:j + 1] * h
            self.info = RoutingInfo(w, w.argmax(1), [], (w * depth_cost).sum(1).mean(), full, full)
            return out
        depth = logits.argmax(1)                    # stage index of the exit, 0..K-1
        out = torch.empty_like(h)
        active = torch.arange(B, device=h.device)
        d_act = depth
        realized = 0.0
        counts = torch.bincount(depth, minlength=K).tolist()
        for j, s in enumerate(self.stages):
            if active.numel() == 0:
                break
            h = s(h)
            realized += self.stage_costs[j] * active.numel()
            done = d_act == j
            out.index_copy_(0, active[done], h[done])
            keep = ~done
            active, h, d_act = active[keep], h[keep], d_act[keep]
        probs = F.one_hot(depth, K).to(h.dtype)
        self.info = RoutingInfo(probs, depth, counts, (probs * depth_cost).sum(1).mean(), realized, full)
        return out
