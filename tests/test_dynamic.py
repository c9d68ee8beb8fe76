"""Dynamic fusion: hard routing == run-all-and-select, experts that own their encoders (raw inputs of any
kind), shared encoders run once, gate gradients, MAC accounting (the same on every backend), the compute
target's dual update, the two-stage recipe, depth gating, errors."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deqfuse import (ConcatGate, DEQHead, DepthGatedFusion, DynamicFusion, GumbelSchedule, MLPHead, PooledGate,
                     SubsetExpert, fit_gate)
from deqfuse.dynamic import count_macs
from deqfuse.testing import triton_runs

DIMS = [7, 12, 5]


class Recorder(nn.Module):
    """Wraps a module and records the batch sizes it was run on (keeps the wrapped expert's modalities)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []
        if hasattr(inner, "modalities"):
            self.modalities = inner.modalities

    def forward(self, x):
        self.batches.append((x[0] if isinstance(x, (list, tuple)) else x).shape[0])
        return self.inner(x)


def make_model(with_deq=False, **kw):
    torch.manual_seed(0)
    experts = [SubsetExpert([0], MLPHead(7, 10)), SubsetExpert([1, 2], MLPHead(17, 10, hidden=40)),
               SubsetExpert([0, 1, 2], MLPHead(24, 10, hidden=96))]
    if with_deq:
        experts.append(SubsetExpert([0, 1, 2], DEQHead(DIMS, 8, out_dim=10, f_max_iter=4)))
    return DynamicFusion([Recorder(e) for e in experts], ConcatGate(DIMS, len(experts)), **kw)


def feats(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g) for d in DIMS]


def run_all_and_select(model, f):
    choice = model.gate(f).argmax(1)
    outs = torch.stack([e([f[i] for i in e.modalities]) for e in model.experts], 1)
    return outs[torch.arange(len(choice)), choice]


@pytest.mark.parametrize("with_deq", [False, True])
@pytest.mark.parametrize("B", [1, 37, 200])
def test_hard_routing_equals_running_every_expert(with_deq, B):
    m = make_model(with_deq).double().eval()  # fp64: BLAS blocking differs between batch sizes
    f = [x.double() for x in feats(B)]
    with torch.no_grad():
        out = m(f)
        ref = run_all_and_select(m, f)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert sum(m.info.counts) == B


def test_unchosen_experts_do_not_run():
    m = make_model().eval()
    with torch.no_grad():
        m.gate.net[-1].bias.copy_(torch.tensor([0.0, 100.0, 0.0]))  # everyone -> expert 1
        m.measure_costs(feats(2))  # (runs each expert once on the sample batch)
        for e in m.experts:
            e.batches.clear()
        out, info = m(feats(50), return_info=True)
    assert [e.batches for e in m.experts] == [[], [50], []]
    assert info.counts == [0, 50, 0] and info is m.info
    assert info.realized_macs == pytest.approx(50 * (m.costs[1] + m.gate_cost))


# ------------------------------------------------------------------------- raw inputs, encoders inside experts
class Tokens(nn.Module):
    """ids [B, T] -> [B, 8] (a per-token MLP: the costly tower)"""

    def __init__(self):
        super().__init__()
        self.emb, self.mlp = nn.Embedding(20, 8), nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 8))

    def forward(self, ids):
        return self.mlp(self.emb(ids)).mean(1)


class Pixels(nn.Module):
    """images [B, 3, 8, 8] -> [B, 6]"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, img):
        return self.conv(img).mean((2, 3))


def raw_inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"text": torch.randint(0, 20, (B, 5), generator=g), "image": torch.randn(B, 3, 8, 8, generator=g)}


class Own(nn.Module):
    """An expert owning its encoders: image only, or text + image."""

    def __init__(self, both):
        super().__init__()
        self.both, self.img = both, Pixels()
        self.txt = Tokens() if both else None
        self.head = nn.Linear(14 if both else 6, 4)

    def forward(self, x):
        h = self.img(x[-1])
        return self.head(torch.cat([self.txt(x[0]), h], 1) if self.both else h)


def test_experts_own_their_encoders_over_raw_inputs_and_skip_them():
    torch.manual_seed(0)
    img_only, both = Recorder(SubsetExpert(["image"], Own(False))), Recorder(SubsetExpert(["text", "image"], Own(True)))
    m = DynamicFusion([img_only, both]).eval()
    assert isinstance(m.gate, PooledGate)
    x = raw_inputs(40)
    with torch.no_grad():
        out, info = m(x, return_info=True)
        choice = info.choice
        ref = torch.where(choice[:, None] == 0, img_only.inner([x["image"]]), both.inner([x["text"], x["image"]]))
        torch.testing.assert_close(out, ref)
        m.gate.net[-1].bias.copy_(torch.tensor([50.0, 0.0]))  # everyone -> image only: the text tower never runs
        for e in m.experts:
            e.batches.clear()
        _, info = m(x, return_info=True)
    assert [e.batches for e in m.experts] == [[40], []] and info.counts == [40, 0]
    assert info.realized_macs == pytest.approx(40 * (m.costs[0] + m.gate_cost))
    assert info.saving == pytest.approx(1 - (m.costs[0] + m.gate_cost) / m.costs[1]) and info.saving > 0.5
    s = info.summary()
    assert all(type(v) is float for v in s.values()) and s["expert0_frac"] == 1.0


def test_shared_encoder_runs_once_on_the_samples_that_need_it():
    torch.manual_seed(0)
    enc = Recorder(Pixels())
    experts = [SubsetExpert(["text"], nn.Sequential(Concat(), Tokens2())),
               SubsetExpert(["image"], nn.Sequential(Concat(), nn.Linear(6, 4))),
               SubsetExpert(["text", "image"], FuseHead())]
    m = DynamicFusion(experts, encoders={"image": enc}).eval()
    x = raw_inputs(30)
    with torch.no_grad():
        m(x)  # costs measured
        enc.batches.clear()
        out, info = m(x, return_info=True)
        need = sum(info.counts[1:])
        assert enc.batches == ([need] if need else [])
        h = enc.inner(x["image"])
        ref = torch.stack([experts[0]([x["text"]]), experts[1]([h]), experts[2]([x["text"], h])], 1)
        torch.testing.assert_close(out, ref[torch.arange(30), info.choice], rtol=1e-5, atol=1e-6)
    assert m.costs[1] > count_macs(nn.Linear(6, 4), (torch.randn(1, 6),))  # the shared encoder counts in
    m.train()
    enc.batches.clear()
    m(x).sum().backward()
    assert enc.batches == [30] and enc.inner.conv.weight.grad is not None   # once in training too


class Concat(nn.Module):
    def forward(self, xs):
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Tokens2(nn.Module):
    def __init__(self):
        super().__init__()
        self.t, self.out = Tokens(), nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.t(ids))


class FuseHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.t, self.out = Tokens(), nn.Linear(14, 4)

    def forward(self, xs):
        return self.out(torch.cat([self.t(xs[0]), xs[1]], 1))


@pytest.mark.parametrize("bad,match", [
    (lambda x: dict(x, image=x["image"][:3]), r"inputs\['image'\] has batch 3, inputs\['image'\]|has batch"),
    (lambda x: {"text": x["text"]}, r"inputs has no modality 'image'"),
    (lambda x: [x["text"], x["image"]], "inputs must be a dict"),
    (lambda x: dict(x, text=[1, 2]), r"inputs\['text'\] must be a tensor"),
])
def test_bad_inputs_name_the_argument(bad, match):
    m = DynamicFusion([SubsetExpert(["image"], Own(False)), SubsetExpert(["text", "image"], Own(True))])
    with pytest.raises((ValueError, TypeError), match=match):
        m(bad(raw_inputs(4)))


def test_gate_width_and_target_are_checked():
    experts = [SubsetExpert([0], MLPHead(7, 3)), SubsetExpert([0], MLPHead(7, 3))]
    m = DynamicFusion(experts, nn.Linear(7, 1))  # gate over the list: wrapped below
    m.gate = ConcatGate([7], 1)
    with pytest.raises(ValueError, match=r"gate returned logits of shape \[4, 1\]; with 2 experts"):
        m([torch.randn(4, 7)])
    with pytest.raises(ValueError, match=r"target_macs must be in \(0, "):
        DynamicFusion(experts, target_macs=1e12)([torch.randn(4, 7)])
    for kw, match in ((dict(target_saving=1.0), "target_saving must be in"), (dict(target_macs=0.0), "target_macs must be"),
                      (dict(target_saving=0.5, target_macs=10.0), "not both"), (dict(budget=1.0, target_saving=0.5), "exclude")):
        with pytest.raises(ValueError, match=match):
            DynamicFusion(experts, **kw)
    with pytest.raises(TypeError, match="second argument is the gate"):
        DynamicFusion(experts, [7])


def test_nan_input_gives_nan_output_not_a_finite_row():
    m = make_model().eval()
    f = feats(6)
    f[0][2, 0] = float("nan")
    with torch.no_grad():
        out = m(f)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


# ------------------------------------------------------------------------------------------ training, costs
def test_gate_gets_gradients_through_relaxation():
    for hard in (False, True):
        m = make_model(hard=hard, lambda_cost=0.5).train()
        out = m(feats(16))
        (out.square().mean() + m.resource_loss()).backward()
        g = m.gate.net[0].weight.grad
        assert g is not None and g.abs().sum() > 0


def test_resource_loss_pushes_to_cheap_expert_and_budget_form():
    """lambda * E[cost] / max C: its value from the gate probabilities, its gradient lowers the expensive
    experts' logits, a few steps on it alone move the routing to the cheapest expert; the budget form is
    zero under the budget and the excess over it otherwise."""
    m = make_model(lambda_cost=1.0).train()
    f = feats(64)
    m(f)
    costs = torch.tensor(m.costs)
    expected = (m.info.probs * costs).sum(1).mean() / costs.max()
    loss = m.resource_loss()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5) and loss > 0
    loss.backward()
    g = m.gate.net[-1].bias.grad          # d loss / d logit: positive for the costly experts
    assert g[2] > 0 and g[2] > g[0]
    opt = torch.optim.SGD(m.gate.parameters(), lr=5.0)
    for _ in range(30):
        opt.zero_grad()
        m(f)
        m.resource_loss().backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        m(f)
    assert m.info.counts[0] == 64       # every sample now takes the cheapest expert
    m.train()
    m(f)
    m.budget = 1e12
    assert float(m.resource_loss().detach()) == 0.0
    m.budget = 0.0
    assert float(m.resource_loss().detach()) == pytest.approx(float(m.info.expected_cost) / float(costs.max()), rel=1e-5)


def test_cost_accounting_matches_counted_macs():
    """Per-expert costs equal FlopCounterMode's count; the realised cost of an eval batch equals what
    FlopCounterMode counts for the whole forward (gate included)."""
    m = make_model().eval()
    f = feats(64)
    with torch.no_grad():
        m(f)  # measures costs
        expected = [count_macs(e, ([f[i][:3] for i in e.modalities],)) for e in m.experts]
        assert m.costs == pytest.approx(expected)
        assert expected[0] == 7 * 10 + 10 * 10 and expected[2] == 24 * 96 + 96 * 10
        assert m.gate_cost == count_macs(m.gate, (f,))
        with FlopCounterMode(display=False) as fc:
            m(f)
    assert fc.get_total_flops() / 2 == pytest.approx(m.info.realized_macs)
    assert m.info.realized_macs <= m.info.full_macs + m.gate_cost * 64


BACKENDS = ["auto", "cuda", "reference"] + (["triton"] if triton_runs() else [])


def test_deq_expert_costs_the_same_on_every_backend():
    """deqfuse's compiled solves and Triton kernels report their MACs to torch.utils.flop_counter: a DEQ
    expert's counted cost agrees across backends within 1% (it was ~0 on the compiled path)."""
    torch.manual_seed(0)
    head = DEQHead([6, 5], 8, out_dim=3, f_max_iter=12, b_max_iter=12)
    f = [torch.randn(3, 6), torch.randn(3, 5)]
    got = {}
    for b in BACKENDS:
        head.deq.backend = b
        head.deq.f_kw["backend"] = head.deq.b_kw["backend"] = b
        got[b] = count_macs(head, (f,))
    ref = got["reference"]
    assert ref > 2 * 6 * 8 * 8   # at least two iterations of the cell count
    for b, v in got.items():
        assert abs(v - ref) <= 0.01 * ref, got


def test_compute_target_dual_update_meets_the_budget_on_held_data():
    """target_saving: lambda follows a dual update; after training the gate, the realised saving on held
    data is within 5 points of the target. The data: expert 0 (cheap) is right on the samples with x > 0,
    expert 1 (costly) everywhere."""
    torch.manual_seed(0)

    class Const(nn.Module):
        def __init__(self, width, ok_all):
            super().__init__()
            self.ok_all, self.w = ok_all, nn.Linear(4, width)

        def forward(self, xs):
            x = xs[0]
            y = torch.stack([(x[:, 0] > 0).float(), (x[:, 0] <= 0).float()], 1)
            if not self.ok_all:
                y = torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)
            return 5 * y + 0 * self.w(x).sum(1, keepdim=True)

    cheap, costly = SubsetExpert([0], Const(1, False)), SubsetExpert([0], Const(400, True))
    g = torch.Generator().manual_seed(0)
    x, xh = torch.randn(2048, 4, generator=g), torch.randn(2048, 4, generator=g)
    y, yh = (x[:, 0] <= 0).long(), (xh[:, 0] <= 0).long()
    for target in (0.3, 0.45):
        m = DynamicFusion([cheap, costly], ConcatGate([4], 2, 16), target_saving=target, dual_lr=0.2)
        m([x[:8]])
        hist = fit_gate(m, lambda: ((([x[i:i + 128]]), y[i:i + 128]) for i in range(0, 2048, 128)), epochs=15, lr=1e-2)
        assert len(hist) == 15 and max(h["lambda_cost"] for h in hist) > 0
        with torch.no_grad():
            out, info = m([xh], return_info=True)
        saving = 1 - info.realized_macs / (2048 * max(m.costs))
        assert abs(saving - target) < 0.05, (target, saving, hist[-3:])
        assert (out.argmax(1) == yh).float().mean() > 0.97   # the savings come from the samples the cheap one gets right
        assert not any(p.requires_grad for p in m.experts.parameters())


def test_gumbel_schedule():
    s = GumbelSchedule(1.0, 0.5, 0.2)
    assert [s(e) for e in range(4)] == [1.0, 0.5, 0.25, 0.2]


# ------------------------------------------------------------------------------------------ depth gating
class CatLinear(nn.Linear):
    def forward(self, feats):
        return super().forward(torch.cat(feats, 1))


def test_depth_gating_shrinks_batch_and_matches_full_depth_selection():
    torch.manual_seed(0)
    D, K = 16, 3
    stages = [Recorder(nn.Sequential(nn.Linear(D, D), nn.ReLU())) for _ in range(K)]
    m = DepthGatedFusion(CatLinear(24, D), stages, nn.Linear(D, K)).eval()
    f = feats(40)
    with torch.no_grad():
        out, info = m(f, return_info=True)
        depth = info.choice
        h, hs = m.stem(f), []
        for s in m.stages:
            h = s.inner(h)
            hs.append(h)
        ref = torch.stack(hs, 1)[torch.arange(40), depth]
    torch.testing.assert_close(out, ref)
    c = info.counts
    assert sum(c) == 40 and min(c) > 0  # every depth used at this seed: the test covers shrinking
    assert [s.batches[-1] for s in m.stages] == [40, 40 - c[0], 40 - c[0] - c[1]]
    per_stage = count_macs(m.stages[0], (torch.randn(1, D),))
    assert per_stage == D * D
    base = 24 * D + D * K  # stem + gate
    assert info.realized_macs == pytest.approx(base * 40 + per_stage * (40 + 40 - c[0] + 40 - c[0] - c[1]))
    assert "saving" in info.summary()
    m.train()
    m(f).sum().backward()
    assert m.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"gate returned logits of shape \[40, 2\]; with 3 stages"):
        DepthGatedFusion(CatLinear(24, D), stages, nn.Linear(D, 2))(f)


def test_the_first_flop_count_in_a_process_sees_the_compiled_solve():
    """deqfuse loads its compiled ops (and their FLOP formulas) at import: a fresh process's first
    FlopCounterMode counts the solve (it counted only the projections before)."""
    import subprocess
    import sys
    code = ("import torch\nfrom torch.utils.flop_counter import FlopCounterMode\nfrom deqfuse import DEQFusion\n"
            "f = DEQFusion(64, 2, in_dims=[48, 32]).eval()\nx = [torch.randn(8, 48), torch.randn(8, 32)]\n"
            "counts = []\nfor _ in range(2):\n"
            "    with FlopCounterMode(display=False) as fc, torch.no_grad():\n        f(x)\n"
            "    counts.append(fc.get_total_flops())\nprint(counts[0], counts[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, second = map(int, out.stdout.split())
    assert first == second > 10 * 2 * 8 * (48 + 32) * 64


def test_fit_gate_takes_lists_and_loaders_and_names_a_one_shot_iterator():
    torch.manual_seed(0)
    m = DynamicFusion([SubsetExpert([0], MLPHead(4, 2)), SubsetExpert([0], MLPHead(4, 2, hidden=64))],
                      target_saving=0.3)
    data = [([torch.randn(16, 4)], torch.randint(0, 2, (16,))) for _ in range(2)]
    assert len(fit_gate(m, data, epochs=2)) == 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))),
                                         batch_size=8, collate_fn=lambda b: ([torch.stack([r[0] for r in b])],
                                                                              torch.stack([r[1] for r in b])))
    assert len(fit_gate(m, loader, epochs=2)) == 2
    with pytest.raises(TypeError, match="batches must give a fresh iterable per epoch"):
        fit_gate(m, (b for b in data), epochs=2)


def test_expert_outputs_and_names_are_checked():
    class Pair(nn.Module):
        def forward(self, xs):
            return xs[0][:, :2], {}
    x = [torch.randn(5, 4)]
    for experts, match in (([SubsetExpert([0], MLPHead(4, 2)), SubsetExpert([0], Pair())], r"experts\[1\] returned a tuple"),
                           ([SubsetExpert([0], MLPHead(4, 2)), SubsetExpert([0], MLPHead(4, 3))],
                            r"experts\[1\] returns \[b, 3\] but experts\[0\] \[b, 2\]")):
        m = DynamicFusion(experts, costs=[1.0, 2.0])
        for mode in (True, False):
            m.train(mode)
            with pytest.raises((TypeError, ValueError), match=match):
                m(x)
    with pytest.raises(ValueError, match=r"experts\[1\] names no modalities while others do"):
        DynamicFusion([SubsetExpert([0], MLPHead(4, 2)), MLPHead(4, 2)])


@pytest.mark.parametrize("seed", range(4))
def test_calibrated_choices_meet_the_target_on_the_calibration_inputs(seed):
    torch.manual_seed(seed)
    experts = [SubsetExpert([0], MLPHead(6, 3)), SubsetExpert([0, 1], MLPHead(14, 3, hidden=200))]
    m = DynamicFusion(experts, ConcatGate([6, 8], 2), target_saving=0.4)
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(301, 6, generator=g), torch.randn(301, 8, generator=g)]
    spend = m.calibrate(x)
    with torch.no_grad():
        _, info = m.eval()(x, return_info=True)
    assert info.realized_macs / 301 == pytest.approx(spend) and spend <= m.target
    assert info.saving >= 0.4 - 0.02


def test_eval_mode_backward_through_routing_is_quiet_and_right():
    """Saliency through a routed eval forward: ATen's differentiable gathers (no 'silently incorrect'
    warning from the compiled routing ops), gradients equal to running the chosen experts directly."""
    import warnings
    m = make_model().eval()
    f = [t.requires_grad_() for t in feats(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info = m(f, return_info=True)
        out.square().sum().backward()
    ref_in = [t.detach().clone().requires_grad_() for t in f]
    ref = run_all_and_select(m, ref_in)
    ref.square().sum().backward()
    for a, b in zip(f, ref_in):
        torch.testing.assert_close(a.grad, b.grad)
    # parameter gradients only (inputs without grad): the scatter back to batch order records the graph
    m.zero_grad()
    x = [t.detach() for t in f]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    run_all_and_select(m, x).square().sum().backward()
    want = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], msg=n)
