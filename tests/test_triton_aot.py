"""Every Triton kernel compiles for an H100 (sm_90) here, without a GPU (tests/triton_aot.py):
the interpreter cannot tell whether a kernel compiles for the GPU (dot dtypes, layouts, resources)."""
import os

import pytest

from conftest import needs_triton

pytestmark = [pytest.mark.triton, needs_triton]


def _has_ptxas():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton has no bundled NVIDIA ptxas")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches on the interpreter")
def test_every_kernel_compiles_for_sm90():
    import triton_aot
    calls = triton_aot.representative_calls(dtypes=("float32",))   # fp32 (tf32 dots): the benchmarked path
    rows = triton_aot.compile_recorded(calls, all_tiles=False)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    kernels = {r["kernel"] for r in rows}
    assert {"_l1_kernel", "_l2_kernel", "_fusion_kernel", "_vjp_h_kernel", "_anderson_step_kernel",
            "_group_kernel"} <= kernels
    # the group-tile GEMMs of the fused cell keep their [BM, 256] tiles in registers: at most a few hundred
    # bytes of stack per thread at the default config (the modality loop they replaced spilled 1.4-10 KB)
    spills = {(r["kernel"], r["config"]): r.get("STACK", 0) for r in rows if r["kernel"] in ("_l1_kernel", "_l2_kernel")}
    print("stack bytes per thread:", spills)
    assert spills and all(v <= 256 for v in spills.values()), spills
