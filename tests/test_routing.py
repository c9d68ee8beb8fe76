"""Routing ops of dynamic fusion (group_by_choice, gather_rows_multi, scatter_rows) on every backend
against deqfuse/reference/routing.py: exact (they move data), every dtype and copy width, empty and
out-of-range cases, errors; and DynamicFusion routing through each backend."""
import pytest
import torch

from deqfuse import ConcatGate, DynamicFusion, MLPHead, SubsetExpert
from deqfuse.dynamic import _router, group_by_choice
from deqfuse.reference.routing import gather_rows_multi_ref, group_by_choice_ref, scatter_rows_ref
from conftest import backend_params

BACKENDS = backend_params()


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("B,E,dtype", [(1, 3, torch.int64), (37, 2, torch.int64), (300, 5, torch.int64),
                                       (2500, 3, torch.int64),    # several blocks / chunks
                                       (1500, 64, torch.int32)])  # the compiled CUDA op's expert limit
def test_group_by_choice_is_the_stable_sort(backend, dev, B, E, dtype):
    if backend == "triton" and B * E > 20000:
        pytest.skip("Triton interpreter: keep it small")
    group = _router(torch.device(dev), backend)[0]
    choice = torch.randint(0, E, (B,), generator=torch.Generator().manual_seed(B)).to(dev, dtype)
    choice[: min(B, 3)] = E - 1
    order, counts = group(choice, E)
    ref_order, ref_counts = group_by_choice_ref(choice.long().cpu(), E)
    assert torch.equal(order.cpu(), ref_order) and torch.equal(counts.long().cpu(), ref_counts)
    assert torch.equal(ref_order, torch.argsort(choice.long().cpu(), stable=True))
    bad = choice.clone()
    bad[0] = -1 if B % 2 else E
    assert int(group(bad, E)[1].sum()) == B - 1      # dropped from the counts, so the caller can raise
    with pytest.raises(ValueError, match="choice: every entry must lie in"):
        group_by_choice(bad, E, backend=backend)


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_gather_multi_and_scatter_are_exact(backend, dev):
    _, gather, scatter = _router(torch.device(dev), backend)
    g = torch.Generator().manual_seed(0)
    # widths and dtypes that take every copy word (16, 8, 4, 2 bytes); 9 sources: several launches
    specs = [(4, torch.float32), (3, torch.float32), (3, torch.float16), (1, torch.bfloat16), (2, torch.float64),
             (40, torch.float32), (5, torch.float16), (8, torch.bfloat16), (7, torch.float64)]
    srcs = [torch.randn(23, d, generator=g).to(dev, dt) for d, dt in specs]
    idx = torch.tensor([22, 0, 5, 5, 11], device=dev)
    for a, b in zip(gather(srcs, idx), gather_rows_multi_ref(srcs, idx)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert [tuple(t.shape) for t in gather(srcs, idx[:0])] == [(0, d) for d, _ in specs]
    out = torch.full((23, 3), float("nan"), device=dev)
    ref = out.clone()
    y = torch.randn(3, 3, generator=g).to(dev)
    sidx = torch.tensor([4, 0, 22], device=dev)
    scatter(y, sidx, out)
    scatter_rows_ref(y, sidx, ref)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[sidx], y) and out.isnan().sum() == 20 * 3


@pytest.mark.parametrize("dev", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_ops_name_their_bad_arguments(dev):
    from deqfuse.testing import extension_runs
    if not extension_runs(dev):
        pytest.skip("compiled extension not available here")
    srcs = [torch.randn(5, 3, device=dev)]
    idx = torch.tensor([0, 4], device=dev)
    with pytest.raises(RuntimeError, match="idx must be a 1-D int64"):
        torch.ops.deqfuse.gather_rows_multi(srcs, idx.int())
    with pytest.raises(RuntimeError, match="share D"):
        torch.ops.deqfuse.scatter_rows(torch.randn(2, 2, device=dev), idx, torch.empty(5, 3, device=dev))
    with pytest.raises(RuntimeError, match="choice must be an integer"):
        torch.ops.deqfuse.group_by_choice(torch.zeros(3, device=dev), 2)
    with pytest.raises(RuntimeError, match="num_groups must be >= 1"):
        torch.ops.deqfuse.group_by_choice(torch.zeros(3, dtype=torch.long, device=dev), 0)


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_dynamic_fusion_routes_alike_on_every_backend(backend, dev):
    torch.manual_seed(0)
    experts = [SubsetExpert([0], MLPHead(6, 4)), SubsetExpert([0, 1], MLPHead(11, 4, hidden=16))]
    m = DynamicFusion(experts, ConcatGate([6, 5], 2)).double().eval().to(dev)
    f = [torch.randn(61, 6, dtype=torch.float64, device=dev), torch.randn(61, 5, dtype=torch.float64, device=dev)]
    with torch.no_grad():
        m.backend = "reference"
        ref = m(f)
        m.backend = backend
        out = m(f)
    assert torch.equal(out, ref) and sum(m.info.counts) == 61
