"""Dynamic multimodal fusion (Xue & Marculescu, "Dynamic Multimodal Fusion", DynMM).

Modality level (DynamicFusion): a gate over the raw inputs picks one expert per sample; an expert is a
whole network over the modalities it names (their encoders, a fusion, a head). Training relaxes the
choice with Gumbel-softmax and adds the resource-aware loss lambda * sum_e g_e C_e / max C; inference
takes the hard top-1 and runs each expert -- its encoders included -- only on its own samples (sort by
expert -> run -> scatter back), reporting the realised cost. Encoders given to DynamicFusion itself
(`encoders=`) are shared: each runs once per forward, on the samples whose expert needs it. A compute
target (target_macs / target_saving) replaces a guessed lambda: a dual update moves lambda during
training until the gate's hard choices cost the target. fit_gate() is the paper's second stage (experts
trained and frozen, the gate trained with the resource loss).
Fusion level (DepthGatedFusion): a gate picks a depth per sample for a stack of fusion stages; at
inference the batch shrinks to the samples still active at each stage.
Costs are MACs per sample counted with torch.utils.flop_counter (FLOPs / 2); deqfuse's compiled ops and
Triton kernels report theirs to it (deqfuse/ops.py), so a DEQ expert costs the same on every backend.
"""
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import backend as _backend
from . import profiling
from ._validate import check_bool, check_choice, check_float, check_int
from .errors import warn
from .reference.routing import gather_rows_multi_ref, group_by_choice_ref, scatter_rows_ref

Key = Union[int, str]


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
def count_macs(module: Callable, example_inputs: Sequence, per_sample: bool = True, batch: Optional[int] = None) -> float:
    """MACs of one no-grad eval forward module(*example_inputs) (FLOPs / 2 by torch.utils.flop_counter), divided
    by the batch if per_sample (batch: the first dim of the first tensor found in the inputs unless given)."""
    was_training = getattr(module, "training", None)
    if was_training is not None:
        module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.Transformer*'s fused eval op is invisible to the counter
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(*example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if was_training is not None:
            module.train(was_training)
    macs = fc.get_total_flops() / 2
    if not per_sample:
        return macs
    return macs / (batch if batch is not None else _batch_of(example_inputs))


def _batch_of(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    items = x.values() if isinstance(x, Mapping) else x
    for v in items:
        try:
            return _batch_of(v)
        except ValueError:
            pass
    raise ValueError("no tensor in the inputs")


# ---------------------------------------------------------------- experts, heads, gate
class SubsetExpert(nn.Module):
    """An expert over the modalities it names (indices into a list of inputs, or keys of a dict):
    net(list of those modalities' inputs, in this order) -> [b, out]. DynamicFusion hands it only those
    inputs, and only for its samples (a modality with a shared encoder arrives encoded)."""

    def __init__(self, modalities: Sequence[Key], net: nn.Module):
        super().__init__()
        modalities = list(modalities)
        if not modalities:
            raise ValueError("modalities must name at least one modality")
        for j, i in enumerate(modalities):
            if not isinstance(i, str):
                check_int(f"modalities[{j}]", i, 0)
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must not repeat a modality, got {modalities}")
        self.modalities, self.net = modalities, net

    def forward(self, inputs):
        return self.net(list(inputs))


class MLPHead(nn.Module):
    """Concatenate the given features [b, d_i] and apply a 2-layer MLP. in_dim = sum of their widths."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, feats):
        return self.net(feats[0] if len(feats) == 1 else torch.cat(list(feats), 1))


class DEQHead(nn.Module):
    """DEQFusion over features of widths in_dims (each projected to `dim` by the layer), then optionally a
    Linear(dim, out_dim): a full-fusion expert's head."""

    def __init__(self, in_dims: Sequence[int], dim: int, out_dim: Optional[int] = None, **deq_kw):
        super().__init__()
        from .layers import DEQFusion
        self.deq = DEQFusion(dim, len(in_dims), in_dims=list(in_dims), **{"on_nonconvergence": "ignore", **deq_kw})
        self.out = None if out_dim is None else nn.Linear(dim, out_dim)

    def forward(self, feats):
        z = self.deq(list(feats))
        return z if self.out is None else self.out(z)


class PooledGate(nn.Module):
    """The default gate: cheap fixed-size summaries of the raw inputs -> LayerNorm -> MLP -> E logits.
    Per modality 2 * bins numbers: a floating input [B, ...] flattened, averaged over `bins` equal chunks,
    and the chunks' root mean squares; an integer input (token ids [B, T]) a histogram of id mod 2 * bins,
    normalised by its length. The summaries have no parameters and cost O(input size) adds, far below any
    encoder; the MLP is tiny."""

    def __init__(self, num_modalities: int, num_experts: int, hidden: int = 32, bins: int = 8):
        super().__init__()
        check_int("num_modalities", num_modalities, 1)
        check_int("gate_hidden", hidden, 1)
        self.bins = check_int("bins", bins, 1)
        width = 2 * bins * num_modalities
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def summary(self, t: torch.Tensor) -> torch.Tensor:
        B, k = t.shape[0], 2 * self.bins
        if t.is_floating_point():
            flat = t.reshape(B, 1, -1).float()
            return torch.cat([F.adaptive_avg_pool1d(flat, self.bins),
                              F.adaptive_avg_pool1d(flat.square(), self.bins).sqrt()], 2).view(B, k)
        ids = t.reshape(B, -1).long().remainder(k)
        hist = torch.zeros(B, k, device=t.device).scatter_add_(1, ids, torch.ones(ids.shape, device=t.device))
        return hist / max(ids.shape[1], 1)

    def forward(self, inputs: List[torch.Tensor]):
        s = torch.cat([self.summary(t) for t in inputs], 1)
        w = self.net[1].weight
        return self.net(s if s.dtype == w.dtype else s.to(w.dtype))


class ConcatGate(nn.Module):
    """A gate over vector inputs: the concatenated inputs [B, sum d_i] -> MLP -> E logits (for small vector
    modalities, where the full features are cheap to read)."""

    def __init__(self, in_dims: Sequence[int], num_experts: int, hidden: int = 32):
        super().__init__()
        in_dims = [check_int(f"in_dims[{i}]", d, 1) for i, d in enumerate(in_dims)]
        self.net = nn.Sequential(nn.Linear(sum(in_dims), hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, inputs: List[torch.Tensor]):
        return self.net(torch.cat([t.reshape(t.shape[0], -1) for t in inputs], 1))


class GumbelSchedule:
    """Temperature tau(epoch) = max(tau_min, tau0 * decay^epoch) for the Gumbel-softmax gate."""

    def __init__(self, tau0: float = 1.0, decay: float = 0.9, tau_min: float = 0.1):
        check_float("tau0", tau0, 0, lo_open=True)
        check_float("decay", decay, 0, 1, lo_open=True)
        check_float("tau_min", tau_min, 0, lo_open=True)
        self.tau0, self.decay, self.tau_min = tau0, decay, tau_min

    def __call__(self, epoch: int) -> float:
        return max(self.tau_min, self.tau0 * self.decay ** epoch)


@dataclass(repr=False)
class RoutingInfo:
    """What one DynamicFusion / DepthGatedFusion forward did. MACs are per batch unless named per sample.
    probs [B, E]: the gate weights used (relaxed in training, one-hot in eval); choice [B]: the pick;
    counts: samples per expert (eval; [] in training, where every expert runs); expected_cost: mean_b
    sum_e g_be C_e (per sample, differentiable: the resource loss's); realized_macs: eval: the gate plus
    each expert on its samples, training: the gate plus every expert on every sample; full_macs: the
    costliest expert (the full network) on every sample; lambda_cost: the resource weight in force."""
    probs: torch.Tensor
    choice: torch.Tensor
    counts: List[int]
    expected_cost: torch.Tensor
    realized_macs: float
    full_macs: float
    lambda_cost: float = 0.0

    @property
    def saving(self) -> float:
        """1 - realized / full: the fraction of the full network's MACs this batch did not spend."""
        return 1.0 - self.realized_macs / self.full_macs if self.full_macs else 0.0

    def summary(self) -> dict:
        """Numbers only (one host sync): realized_macs, full_macs, saving, expected_cost (per sample),
        lambda_cost and, per expert e, expert{e}_frac (the share of samples it got: eval counts, or the
        mean gate weight in training)."""
        B = self.choice.numel()
        frac = ([c / B for c in self.counts] if self.counts else self.probs.detach().float().mean(0).tolist()) if B else []
        out = dict(realized_macs=float(self.realized_macs), full_macs=float(self.full_macs), saving=self.saving,
                   expected_cost=float(self.expected_cost.detach()), lambda_cost=float(self.lambda_cost))
        out.update({f"expert{e}_frac": float(f) for e, f in enumerate(frac)})
        return out

    def __repr__(self):
        s = self.summary()
        counts = f"counts={self.counts}" if self.counts else "training (every expert ran)"
        return (f"RoutingInfo({counts}, saving={s['saving']:.3f}, realized_macs={s['realized_macs']:.4g}, "
                f"full_macs={s['full_macs']:.4g}, lambda_cost={s['lambda_cost']:.4g})")


def _check_outputs(outs, experts, batch=None, counts=None):
    """Each expert's output is a tensor with one row per sample it got, all of one shape (names the expert)."""
    shape = None
    for y, e in zip(outs, experts):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"experts[{e}] returned a {type(y).__name__}; an expert must return a tensor [b, *] "
                            f"(return only the output, e.g. not (output, info))")
        rows = batch if counts is None else counts[e]
        if y.dim() < 1 or y.shape[0] != rows:
            raise ValueError(f"experts[{e}] returned shape {list(y.shape)} for {rows} samples; it must return [b, *]")
        if shape is None:
            shape, first = y.shape[1:], e
        elif y.shape[1:] != shape:
            raise ValueError(f"experts[{e}] returns [b, {', '.join(map(str, y.shape[1:]))}] but experts[{first}] "
                             f"[b, {', '.join(map(str, shape))}]: every expert must return one shape")


def _as_list(inputs, keys):
    """The inputs (a list / tuple, or a dict of named modalities) as a list in `keys` order, checked."""
    if isinstance(inputs, Mapping):
        missing = [k for k in keys if k not in inputs]
        if missing:
            raise ValueError(f"inputs has no modality {missing[0]!r} (the experts name {list(keys)}; "
                             f"inputs has {list(inputs)})")
        items = [(f"inputs[{k!r}]", inputs[k]) for k in keys]
    elif isinstance(inputs, (list, tuple)):
        if any(isinstance(k, str) for k in keys):
            raise TypeError(f"inputs must be a dict: the experts name modalities by key ({list(keys)})")
        if len(inputs) <= max(keys):
            raise ValueError(f"inputs holds {len(inputs)} modalities, the experts read modality {max(keys)}")
        items = [(f"inputs[{k}]", inputs[k]) for k in keys]
    else:
        raise TypeError(f"inputs must be a list of per-modality tensors or a dict of them, got {type(inputs).__name__}")
    B = dev = None
    for name, t in items:
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise TypeError(f"{name} must be a tensor with the batch first, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else 'a 0-d tensor'}")
        if B is None:
            B, dev, first = t.shape[0], t.device, name
        elif t.shape[0] != B:
            raise ValueError(f"{name} has batch {t.shape[0]}, {first} has {B}: every modality needs the same batch")
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device}, {first} is on {dev}: every modality needs the same device")
    if B == 0:
        raise ValueError("inputs have batch size 0")
    return [t for _, t in items], B


class DynamicFusion(nn.Module):
    """Per-sample expert selection over modality subsets (DynMM, modality level).

    forward(inputs, return_info=False): inputs are the user's per-modality tensors, untouched, batch first
    (token ids, images [B, C, H, W], sequences [B, T, d], vectors ...), as a list or a dict of named
    modalities. -> the chosen expert's output per sample [B, *] (and the call's RoutingInfo).

    Args:
      experts: modules with a `modalities` attribute naming what they read (SubsetExpert(modalities, net));
        each gets the list of those inputs for its samples only, and returns a tensor [b, *] (one shape for
        all experts).
      gate: module over the raw inputs (the list, in the modalities' order: sorted keys / indices) ->
        logits [B, E]. Default: PooledGate (cheap summaries of each input -> small MLP). Its MACs count in
        the realised cost.
      encoders: {modality: module} shared by the experts that name the modality: run once per forward on
        the samples that need it; those experts receive its output. (An expert may equally own its encoders.)
      costs: MACs per sample of each expert (its encoders included); None = counted on the first forward
        (on up to 8 of its samples) with torch.utils.flop_counter. measure_costs(inputs) recounts.
      tau, hard: Gumbel-softmax temperature and straight-through hard sampling in training.
      lambda_cost: resource weight: loss term lambda * E[cost] / max_e C_e (resource_loss()).
      target_macs / target_saving: a compute target per sample (MACs in (0, full cost], or the fraction
        of the full network's MACs to save, in (0, 1)). In training lambda follows a dual update, lambda <-
        max(0, lambda + dual_lr * (E[cost] - target) / max C) after each forward (E[cost]: the batch's mean
        cost under the gate's softmax); calibrate(inputs) then sets the inference cost shift with which the
        gate's hard choices meet the target (fit_gate does both).
      budget: the hinge form lambda * max(0, E[cost] - budget) / max C (a fixed lambda, no dual update).
      backend: routing kernels ('auto' | 'cuda' (compiled ops, also on the CPU) | 'triton' | 'reference').
    """

    def __init__(self, experts: Sequence[nn.Module], gate: Optional[nn.Module] = None, *,
                 encoders: Optional[Mapping[Key, nn.Module]] = None, costs: Optional[Sequence[float]] = None,
                 tau: float = 1.0, hard: bool = False, lambda_cost: float = 0.0, target_macs: Optional[float] = None,
                 target_saving: Optional[float] = None, dual_lr: float = 0.05, budget: Optional[float] = None,
                 gate_hidden: int = 32, backend: str = "auto"):
        super().__init__()
        if isinstance(gate, (list, tuple)):
            raise TypeError("DynamicFusion(experts, gate=None, ...): the second argument is the gate module; the "
                            "inputs pass through untouched, so no in_dims is needed")
        experts = list(experts)
        if not experts:
            raise ValueError("experts must hold at least one module")
        encoders = dict(encoders or {})
        names = [list(getattr(e, "modalities", [])) for e in experts]
        unnamed = [e for e, n in enumerate(names) if not n]
        if unnamed and len(unnamed) < len(experts):
            raise ValueError(f"experts[{unnamed[0]}] names no modalities while others do: wrap it in "
                             f"SubsetExpert([...], net) naming the inputs it reads")
        keys = sorted({k for n in names for k in n} | set(encoders), key=lambda k: (isinstance(k, str), k))
        if not keys:
            raise ValueError("the experts name no modality: give them a `modalities` attribute (SubsetExpert)")
        if len({type(k) for k in keys}) > 1:
            raise ValueError(f"modalities must all be indices or all be keys, got {keys}")
        self.reads = [n or keys for n in names]     # each expert's modalities, in its order
        self.keys = keys
        for m in encoders:
            if not any(m in r for r in self.reads):
                raise ValueError(f"encoders[{m!r}]: no expert reads modality {m!r}")
        if costs is not None:
            costs = list(costs)
            if len(costs) != len(experts):
                raise ValueError(f"costs must give one cost per expert ({len(experts)}), got {len(costs)}")
            for e, c in enumerate(costs):
                check_float(f"costs[{e}]", c, 0)
        check_float("lambda_cost", lambda_cost, 0)
        if target_macs is not None and target_saving is not None:
            raise ValueError("give target_macs or target_saving, not both")
        if target_macs is not None:
            check_float("target_macs", target_macs, 0, lo_open=True)
        if target_saving is not None:
            check_float("target_saving", target_saving, 0, 1, lo_open=True, hi_open=True)
        check_float("dual_lr", dual_lr, 0, lo_open=True)
        if budget is not None:
            check_float("budget", budget, 0)
            if target_macs is not None or target_saving is not None:
                raise ValueError("budget (a hinge with a fixed lambda) and a target (a dual update) exclude each other")
        check_int("gate_hidden", gate_hidden, 1)
        check_choice("backend", backend, _backend.BACKENDS)
        check_bool("hard", hard)
        self.experts = nn.ModuleList(experts)
        self.encoders = nn.ModuleDict({str(k): v for k, v in encoders.items()})
        self._enc_keys = {str(k): k for k in encoders}
        self.gate = gate if gate is not None else PooledGate(len(keys), len(experts), gate_hidden)
        self.costs = None if costs is None else [float(c) for c in costs]
        self.gate_cost: Optional[float] = None if costs is None else 0.0
        self.tau, self.hard, self.lambda_cost, self.budget, self.backend = tau, hard, lambda_cost, budget, backend
        self.target_macs, self.target_saving, self.dual_lr = target_macs, target_saving, dual_lr
        self._frozen = False
        self.cost_shift = 0.0  # inference: argmax of logit_e - cost_shift * C_e / max C (calibrate() sets it)
        self.info: Optional[RoutingInfo] = None  # the last forward's (each call also returns its own)

    tau = property(lambda self: self._tau, lambda self, v: setattr(self, "_tau", check_float("tau", v, 0, lo_open=True)),
                   doc="Gumbel-softmax temperature (> 0; set per epoch by a GumbelSchedule)")

    def extra_repr(self) -> str:
        tgt = (f", target_macs={self.target_macs:g}" if self.target_macs is not None else
               f", target_saving={self.target_saving:g}" if self.target_saving is not None else "")
        return (f"modalities={self.keys}, reads={self.reads}, shared_encoders={list(self._enc_keys.values())}, "
                f"lambda_cost={self.lambda_cost:g}{tgt}, tau={self.tau:g}, hard={self.hard}, backend={self.backend!r}")

    def __getstate__(self):  # copies/pickles leave out the last forward's graph-attached info
        state = self.__dict__.copy()
        state["info"] = None
        return state

    def get_extra_state(self):
        """In the state dict: the resource weight (the dual update moves it) and the measured costs."""
        return dict(lambda_cost=float(self.lambda_cost), costs=self.costs, gate_cost=self.gate_cost,
                    cost_shift=float(self.cost_shift))

    def set_extra_state(self, state):
        self.lambda_cost, self.costs, self.gate_cost = state["lambda_cost"], state["costs"], state["gate_cost"]
        self.cost_shift = state.get("cost_shift", 0.0)

    def _encoder(self, key):
        return self.encoders[str(key)] if str(key) in self._enc_keys else None

    # ------------------------------------------------------------------ costs
    def measure_costs(self, inputs, samples: int = 8):
        """Count the gate's and each expert's MACs per sample (an expert: its shared encoders plus itself) on
        the first `samples` samples of these inputs; returns the expert costs."""
        xs, B = _as_list(inputs, self.keys)
        k = min(samples, B)
        xs = [t[:k] for t in xs]
        self.gate_cost = count_macs(self.gate, (xs,), batch=k)
        enc = {m: count_macs(self._encoder(m), (xs[self.keys.index(m)],), batch=k) for m in self._enc_keys.values()}
        costs = []
        for e, ex in enumerate(self.experts):
            args = [self._expert_input(m, xs, None) for m in self.reads[e]]
            costs.append(count_macs(ex, (args,), batch=k) + sum(enc.get(m, 0.0) for m in self.reads[e]))
        self.costs = costs
        return costs

    def _expert_input(self, m, xs, rows):
        t = xs[self.keys.index(m)] if rows is None else rows
        enc = self._encoder(m)
        if enc is None:
            return t
        with torch.no_grad():
            return enc(t)

    @property
    def target(self) -> Optional[float]:
        """The compute target in MACs per sample (None without one, or before the costs are counted)."""
        if self.target_macs is not None:
            return self.target_macs
        if self.target_saving is not None and self.costs is not None:
            return (1.0 - self.target_saving) * max(self.costs)
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, inputs, return_info: bool = False):
        xs, B = _as_list(inputs, self.keys)
        if self.costs is None:
            self.measure_costs(inputs)
            if self.target_macs is not None and not self.target_macs <= max(self.costs):
                raise ValueError(f"target_macs must be in (0, {max(self.costs):.4g}] (the costliest expert's MACs per "
                                 f"sample), got {self.target_macs:g}")
        logits = self.gate(xs)
        E = len(self.experts)
        if logits.dim() != 2 or logits.shape != (B, E):
            raise ValueError(f"gate returned logits of shape {list(logits.shape)}; with {E} experts it must return "
                             f"[B, {E}] = [{B}, {E}]")
        costs = logits.new_tensor(self.costs)
        full = max(self.costs) * B
        gate_macs = (self.gate_cost or 0.0) * B
        if self.training:
            probs = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard)
            outs = torch.stack(self._run_all(xs), 1)                          # [B, E, *]
            out = (probs.view(B, E, *[1] * (outs.dim() - 2)) * outs).sum(1)
            expected = (probs * costs).sum(1).mean()
            self._dual_step(logits)
            info = RoutingInfo(probs, probs.argmax(1), [], expected, gate_macs + sum(self.costs) * B, full,
                               self.lambda_cost)
        else:
            choice = (logits - self.cost_shift * (costs / costs.max())).argmax(1) if self.cost_shift else logits.argmax(1)
            out, counts = self.route(xs, choice)
            bad = ~torch.isfinite(logits).all(1)
            if bool(bad.any()):  # a non-finite gate score (e.g. NaN inputs): that sample's output is NaN
                out = out.masked_fill(bad.view(B, *[1] * (out.dim() - 1)), float("nan"))
            probs = F.one_hot(choice, E).to(logits.dtype)
            realized = gate_macs + sum(c * k for c, k in zip(self.costs, counts))
            info = RoutingInfo(probs, choice, counts, (probs * costs).sum(1).mean(), realized, full, self.lambda_cost)
        object.__setattr__(self, "info", info)
        return (out, info) if return_info else out

    def expert_outputs(self, inputs) -> List[torch.Tensor]:
        """Every expert's output on every sample (shared encoders run once): DynMM's first stage trains
        each expert on its own loss with these."""
        return self._run_all(_as_list(inputs, self.keys)[0])

    def _run_all(self, xs):
        """Every expert on every sample (training: the gate needs all outputs); shared encoders once. With
        frozen experts (fit_gate) without a graph."""
        ctx = torch.no_grad() if self._frozen else torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad()
        with ctx:
            enc = {m: self._encoder(m)(xs[self.keys.index(m)]) for m in self._enc_keys.values()}
            outs = [ex([enc[m] if m in enc else xs[self.keys.index(m)] for m in self.reads[e]])
                    for e, ex in enumerate(self.experts)]
        _check_outputs(outs, range(len(outs)), xs[0].shape[0])
        return outs

    def route(self, xs, choice):
        """Run expert e (and the shared encoders it reads) only on the samples with choice == e. xs: the
        inputs in self.keys order. Returns (outputs in batch order, counts). The batch is sorted by expert
        once (every modality in one gather), so each expert reads a contiguous slice; a shared encoder
        runs once on the concatenated slices of the experts that read it; the outputs go back to batch
        order in one scatter."""
        _, gather_multi, scatter = _router(choice.device, self.backend, len(self.experts))
        # the compiled and Triton routing ops have no autograd formula: where a graph is recorded (inputs
        # or expert parameters that need gradients), ATen's gathers and index_copy record it
        if torch.is_grad_enabled() and any(t.requires_grad for t in xs):
            gather_multi = gather_rows_multi_ref
        with profiling.range("route"):
            order, counts = group_by_choice(choice, len(self.experts), self.backend)
            flat = [t.reshape(t.shape[0], -1) for t in xs]
            grouped = [g.view(-1, *t.shape[1:]) for g, t in zip(gather_multi(flat, order), xs)]
        starts = [sum(counts[:e]) for e in range(len(counts))]
        enc = {}  # modality -> (its encoder's output over the readers' slices, {expert: offset})
        for m in self._enc_keys.values():
            users = [e for e in range(len(counts)) if counts[e] and m in self.reads[e]]
            if not users:
                continue
            g = grouped[self.keys.index(m)]
            rows = torch.cat([g[starts[e]:starts[e] + counts[e]] for e in users]) if len(users) > 1 else \
                g[starts[users[0]]:starts[users[0]] + counts[users[0]]]
            with profiling.range(f"encoder[{m}]"):
                h = self._encoder(m)(rows)
            offs, o = {}, 0
            for e in users:
                offs[e], o = o, o + counts[e]
            enc[m] = (h, offs)
        ys = []
        for e, n in enumerate(counts):
            if not n:
                continue
            args = [enc[m][0][enc[m][1][e]:enc[m][1][e] + n] if m in enc else
                    grouped[self.keys.index(m)][starts[e]:starts[e] + n] for m in self.reads[e]]
            with profiling.range(f"expert[{e}]"):
                ys.append(self.experts[e](args))
        _check_outputs(ys, [e for e, n in enumerate(counts) if n], None, counts)
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        with profiling.range("unroute"):
            flat = y.reshape(y.shape[0], -1)
            out = (scatter_rows_ref if flat.requires_grad else scatter)(
                flat, order, flat.new_empty(choice.shape[0], flat.shape[1]))
        return out.view(choice.shape[0], *y.shape[1:]), counts

    # ------------------------------------------------------------------ the resource loss and its weight
    def _dual_step(self, logits):
        """The dual update of lambda toward the compute target (no-op without one), on the batch's expected
        cost under the gate's softmax (smooth in the gate, unlike its argmax)."""
        target = self.target
        if target is None:
            return
        cmax = max(self.costs)
        spent = float((logits.detach().softmax(1) * logits.new_tensor(self.costs)).sum(1).mean()) + (self.gate_cost or 0.0)
        self.lambda_cost = max(0.0, self.lambda_cost + self.dual_lr * (spent - target) / cmax)

    def calibrate(self, inputs, target: Optional[float] = None, batch: int = 1024) -> float:
        """Set the inference-time cost shift so that the gate's hard choices on `inputs` (e.g. the training
        set) cost at most `target` MACs per sample (default: the model's target), as close to it as they
        can: inference picks argmax_e (logit_e - shift * C_e / max C), and the spend falls as the shift
        grows, so a bisection finds it. Returns the MACs per sample the choices spend on these inputs."""
        xs, B = _as_list(inputs, self.keys)
        if self.costs is None:
            self.measure_costs(inputs)
        target = self.target if target is None else check_float("target", target, 0, lo_open=True)
        if target is None:
            raise ValueError("calibrate needs a target: give target=, or build the model with target_macs / "
                             "target_saving")
        was = self.training
        self.eval()
        with torch.no_grad():
            logits = torch.cat([self.gate([t[i:i + batch] for t in xs]) for i in range(0, B, batch)])
        self.train(was)
        costs = logits.new_tensor(self.costs)
        rel = costs / costs.max()  # (the forward's expression, in its dtype: the same picks)
        c64 = torch.tensor(self.costs, dtype=torch.float64)

        def spent(shift):
            return float(c64[(logits - shift * rel).argmax(1).cpu()].mean()) + (self.gate_cost or 0.0)
        span = float(logits.max() - logits.min()) + 1.0
        gap = float((rel[:, None] - rel[None, :]).abs().masked_fill(rel[:, None] == rel[None, :], 2.0).min())
        lo, hi = -span / gap, span / gap   # lo: every sample to its costliest pick, hi: to the cheapest
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if spent(mid) <= target else (mid, hi)
        # hi: the smallest shift that meets the target. Move it halfway to the next shift that changes a pick,
        # so that a sample at the decision boundary does not tip with the last bits of its logits.
        at, top = spent(hi), span / gap
        a, b = hi, top
        if spent(top) < at:
            for _ in range(60):
                mid = 0.5 * (a + b)
                a, b = (mid, b) if spent(mid) == at else (a, mid)
            hi = 0.5 * (hi + a)
        else:
            hi = hi + 0.5 * (top - hi)
        self.cost_shift = hi
        got = spent(hi)
        if got > target:
            warn(f"calibrate: the target ({target:.4g} MACs per sample) is below what the cheapest picks cost "
                 f"({got:.4g}); every sample takes its cheapest expert")
        return got

    def resource_loss(self):
        """lambda * E[cost] / max_e C_e (or the hinge max(0, E[cost] - budget) form) of the last forward."""
        if self.info is None:
            raise RuntimeError("resource_loss() needs a forward pass first")
        scale = max(self.costs)
        c = self.info.expected_cost
        if self.budget is not None:
            c = torch.clamp(c - self.budget, min=0)
        return self.lambda_cost * c / scale

    # ------------------------------------------------------------------ the paper's second stage
    def freeze_experts(self, frozen: bool = True):
        """Stop training the experts and the shared encoders (requires_grad off, eval mode kept through
        train()); the gate alone trains. frozen=False undoes it."""
        self._frozen = frozen
        for mod in (self.experts, self.encoders):
            for p in mod.parameters():
                p.requires_grad_(not frozen)
        self.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._frozen:
            self.experts.eval()
            self.encoders.eval()
        return self


def fit_gate(model: DynamicFusion, batches, epochs: int = 10, lr: float = 1e-3,
             loss_fn: Callable = F.cross_entropy, schedule: Optional[GumbelSchedule] = None,
             weight_decay: float = 0.0) -> List[dict]:
    """DynMM's second stage: the experts (and shared encoders), trained beforehand, are frozen; the gate is
    trained with loss_fn(mixture output, target) + model.resource_loss() (and lambda follows the compute
    target if the model has one; then, at the end, calibrate() on the first epoch's inputs sets the
    inference cost shift that meets the target). batches: (inputs, target) pairs for one epoch, as a list,
    a DataLoader, or a callable returning a fresh iterable per epoch. Returns per epoch {'loss',
    'lambda_cost'}. The model is left in eval mode with the experts frozen."""
    check_int("epochs", epochs, 1)
    check_float("lr", lr, 0, lo_open=True)
    if not callable(batches):
        if iter(batches) is batches:  # a generator or iterator: one epoch's worth only
            raise TypeError("batches must give a fresh iterable per epoch: a callable (e.g. lambda: iter(loader)), "
                            "a list or a DataLoader, not a one-shot iterator or generator")
        batches = (lambda b: (lambda: b))(batches)
    schedule = schedule or GumbelSchedule(1.0, 0.85, 0.1)
    seen = []
    model.freeze_experts()
    opt = torch.optim.AdamW(model.gate.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for ep in range(epochs):
        model.train()
        model.tau = schedule(ep)
        total, n = 0.0, 0
        for inputs, target in batches():
            if ep == 0 and (model.target_macs is not None or model.target_saving is not None):
                seen.append(inputs)
            out = model(inputs)
            loss = loss_fn(out, target) + model.resource_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()), n + 1
        history.append(dict(loss=total / max(n, 1), lambda_cost=model.lambda_cost))
    if seen:  # the budget met by the hard choices on the training inputs
        model.calibrate(_concat(seen))
    model.eval()
    return history


def _concat(batches):
    """One input (list or dict of tensors) from a list of batches of it."""
    if isinstance(batches[0], Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return [torch.cat([b[i] for b in batches]) for i in range(len(batches[0]))]


class DepthGatedFusion(nn.Module):
    """Fusion-level gating: a gate picks a depth k in 1..K per sample for a stack of stages
    (h_0 = stem(features), h_j = stage_j(h_{j-1}), output h_k). Training mixes the K depths with Gumbel
    weights; inference runs stage j only on the samples whose depth is >= j (the batch shrinks) and
    reports the realised MACs (the stem's and the gate's included). forward(features, return_info=False)."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], gate: nn.Module, tau: float = 1.0,
                 hard: bool = False):
        super().__init__()
        if len(stages) < 1:
            raise ValueError("stages must hold at least one module")
        check_bool("hard", hard)
        self.stem, self.stages, self.gate = stem, nn.ModuleList(stages), gate
        self.tau, self.hard = tau, hard
        self.stage_costs: Optional[List[float]] = None
        self.base_cost: Optional[float] = None   # stem + gate, per sample
        self.info: Optional[RoutingInfo] = None

    tau = DynamicFusion.tau
    __getstate__ = DynamicFusion.__getstate__  # copies/pickles leave out the last forward's info

    def extra_repr(self) -> str:
        return f"depths={len(self.stages)}, tau={self.tau:g}, hard={self.hard}"

    def forward(self, features, return_info: bool = False):
        h = self.stem(features)
        if h.shape[0] == 0:
            raise ValueError("features have batch size 0")
        logits = self.gate(h)                       # [B, K]
        B, K = h.shape[0], len(self.stages)
        if logits.dim() != 2 or logits.shape != (B, K):
            raise ValueError(f"gate returned logits of shape {list(logits.shape)}; with {K} stages it must return "
                             f"[B, {K}] = [{B}, {K}]")
        if self.stage_costs is None:
            k = min(B, 8)
            self.base_cost = count_macs(self.stem, (_head(features, k),), batch=k) + count_macs(self.gate, (h[:k],))
            hk, costs = h[:k].detach(), []
            for s in self.stages:
                costs.append(count_macs(s, (hk,)))
                with torch.no_grad():
                    hk = s(hk)
            self.stage_costs = costs
        depth_cost = torch.tensor(self.stage_costs, dtype=h.dtype, device=h.device).cumsum(0)  # cost of depth k
        full = (float(depth_cost[-1]) + self.base_cost) * B
        if self.training:
            w = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard)
            out = torch.zeros_like(h)
            for j, s in enumerate(self.stages):
                h = s(h)
                out = out + w[:, j:j + 1] * h
            info = RoutingInfo(w, w.argmax(1), [], (w * depth_cost).sum(1).mean(), full, full)
        else:
            depth = logits.argmax(1)                    # stage index of the exit, 0..K-1
            out = torch.empty_like(h)
            active = torch.arange(B, device=h.device)
            d_act = depth
            realized = self.base_cost * B
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
            info = RoutingInfo(probs, depth, counts, (probs * depth_cost).sum(1).mean(), realized, full)
        object.__setattr__(self, "info", info)
        return (out, info) if return_info else out


def _head(x, k):
    """The first k samples of a tensor, or of each tensor in a list / tuple / dict."""
    if isinstance(x, torch.Tensor):
        return x[:k]
    if isinstance(x, Mapping):
        return {n: _head(v, k) for n, v in x.items()}
    return type(x)(_head(v, k) for v in x)


__all__ = ["DynamicFusion", "DepthGatedFusion", "SubsetExpert", "MLPHead", "DEQHead", "PooledGate", "ConcatGate",
           "GumbelSchedule",
           "RoutingInfo", "count_macs", "fit_gate", "group_by_choice"]
