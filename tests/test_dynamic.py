"""Dynamic fusion: hard routing == run-all-and-select, gate gradients, MAC accounting, skipping, edge cases."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deqfuse import DEQHead, DepthGatedFusion, DynamicFusion, GumbelSchedule, MLPHead, SubsetExpert
from deqfuse.dynamic import count_macs

DIMS = [7, 12, 5]


class Recorder(nn.Module):
    """Wraps an expert and records the batch sizes it was run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, feats):
        self.batches.append(feats[0].shape[0])
        return self.inner(feats)


def make_model(with_deq=False, **kw):
    torch.manual_seed(0)
    experts = [SubsetExpert([0], MLPHead(7, 10)), SubsetExpert([1, 2], MLPHead(17, 10, hidden=40)),
               SubsetExpert([0, 1, 2], MLPHead(24, 10, hidden=96))]
    if with_deq:
        experts.append(SubsetExpert([0, 1, 2], nn.Sequential(DEQHead(DIMS, 8, f_max_iter=4), nn.Linear(8, 10))))
    return DynamicFusion([Recorder(e) for e in experts], DIMS, **kw)


def feats(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g) for d in DIMS]


def run_all_and_select(model, f):
    choice = model.gate(torch.cat(f, 1)).argmax(1)
    outs = torch.stack([e(f) for e in model.experts], 1)
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
        m.gate[-1].bias.copy_(torch.tensor([0.0, 100.0, 0.0]))  # everyone -> expert 1
        m.measure_costs(feats(2))  # (runs each expert once on one sample)
        for e in m.experts:
            e.batches.clear()
        m(feats(50))
    assert [e.batches for e in m.experts] == [[], [50], []]
    assert m.info.counts == [0, 50, 0]
    assert m.info.realized_macs == pytest.approx(50 * float(m.costs[1]))


def test_gate_gets_gradients_through_relaxation():
    for hard in (False, True):
        m = make_model(hard=hard, lambda_cost=0.5).train()
        out = m(feats(16))
        (out.square().mean() + m.resource_loss()).backward()
        g = m.gate[0].weight.grad
        assert g is not None and g.abs().sum() > 0


def test_resource_loss_pushes_to_cheap_expert_and_budget_form():
    """lambda * E[cost] / max C: its value from the gate probabilities, its gradient lowers the expensive
    experts' logits, a few steps on it alone move the routing to the cheapest expert; the budget form is
    zero under the budget and the excess over it otherwise."""
    m = make_model(lambda_cost=1.0).train()
    f = feats(64)
    m(f)
    costs = m.costs.to(torch.float32)
    expected = (m.info.probs * costs).sum(1).mean() / costs.max()
    loss = m.resource_loss()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5) and loss > 0
    loss.backward()
    g = m.gate[-1].bias.grad          # d loss / d logit: positive for the costly experts
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
    FlopCounterMode counts for the experts that ran (the whole forward minus the gate)."""
    m = make_model().eval()
    f = feats(64)
    with torch.no_grad():
        m(f)  # measures costs
        expected = [count_macs(e, ([x[:3] for x in f],)) for e in m.experts]
        assert m.costs.tolist() == pytest.approx(expected)
        assert expected[0] == 7 * 10 + 10 * 10 and expected[2] == 24 * 96 + 96 * 10
        with FlopCounterMode(display=False) as fc:
            m(f)
        gate_macs = count_macs(m.gate, (torch.cat(f, 1),), per_sample=False)
    assert fc.get_total_flops() / 2 - gate_macs == pytest.approx(m.info.realized_macs)
    assert m.info.realized_macs <= m.info.full_macs


def test_degenerate_batches():
    m = make_model().eval()
    with torch.no_grad():
        m.gate[-1].bias.copy_(torch.tensor([0.0, 0.0, 100.0]))
        out = m(feats(1))
    assert out.shape == (1, 10) and m.info.counts == [0, 0, 1]
    with pytest.raises(ValueError, match=r"features\[1\] must have shape"):
        m([torch.randn(3, 7), torch.randn(3, 11), torch.randn(3, 5)])
    with pytest.raises(ValueError, match="list of 3"):
        m(feats(2)[:2])


def test_gumbel_schedule():
    s = GumbelSchedule(1.0, 0.5, 0.2)
    assert [s(e) for e in range(4)] == [1.0, 0.5, 0.25, 0.2]


class TensorRecorder(Recorder):
    def forward(self, h):
        self.batches.append(h.shape[0])
        return self.inner(h)


class CatLinear(nn.Linear):
    def forward(self, feats):
        return super().forward(torch.cat(feats, 1))


def test_depth_gating_shrinks_batch_and_matches_full_depth_selection():
    torch.manual_seed(0)
    D, K = 16, 3
    stages = [TensorRecorder(nn.Sequential(nn.Linear(D, D), nn.ReLU())) for _ in range(K)]
    m = DepthGatedFusion(CatLinear(24, D), stages, nn.Linear(D, K)).eval()
    f = feats(40)
    with torch.no_grad():
        out = m(f)
        depth = m.info.choice
        h, hs = m.stem(f), []
        for s in m.stages:
            h = s.inner(h)
            hs.append(h)
        ref = torch.stack(hs, 1)[torch.arange(40), depth]
    torch.testing.assert_close(out, ref)
    c = m.info.counts
    assert sum(c) == 40 and min(c) > 0  # every depth used at this seed: the test covers shrinking
    assert [s.batches[-1] for s in m.stages] == [40, 40 - c[0], 40 - c[0] - c[1]]
    per_stage = count_macs(m.stages[0], (torch.randn(1, D),))
    assert per_stage == D * D
    assert m.info.realized_macs == pytest.approx(per_stage * (40 + 40 - c[0] + 40 - c[0] - c[1]))
    m.train()
    m(f).sum().backward()
    assert m.gate.weight.grad.abs().sum() > 0


