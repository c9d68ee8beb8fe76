"""Test set-up: Triton runs on the CPU interpreter when there is no GPU; fixed kernel configs; the shared
helpers live in deqfuse/testing.py (re-exported here for the test modules)."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU interpreter (must be set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deqfuse.testing import (backend_params, contractive_layer, make_inputs, make_params, rel_err,  # noqa: E402,F401
                             tol, triton_runs)


def pytest_addoption(parser):
    parser.addoption("--cpu-plan", default="", metavar="PART=NAME,...",
                     help="run the whole suite under deqfuse.force_cpu_plan(PART=NAME, ...), e.g. rows=base,gemm=blas "
                          "(assertions about the plan's own rules are left out)")


def pytest_configure(config):
    # fixed kernel configs in tests: autotuning each of dozens of tiny shapes would dominate a GPU run
    # (a hook, not module code: the benchmarks import the helpers and must autotune)
    from deqfuse import set_triton_autotune
    set_triton_autotune(False)
    global FORCED_PLAN
    FORCED_PLAN = _parse_cpu_plan(config.getoption("--cpu-plan"))


def _parse_cpu_plan(text):
    """--cpu-plan's PART=NAME,... as force_cpu_plan's keywords; a usage error names what is wrong."""
    if not text:
        return {}
    from deqfuse.backend import cpu_plan_choices
    choices, plan = cpu_plan_choices(), {}
    for kv in text.split(","):
        part, sep, name = kv.partition("=")
        if not sep or part not in (*choices, "chunk"):
            raise pytest.UsageError(f"--cpu-plan: {kv!r} is not PART=NAME with PART one of "
                                    f"{', '.join((*choices, 'chunk'))}")
        if part == "chunk":
            if not name.isdigit():
                raise pytest.UsageError(f"--cpu-plan: chunk must be a whole number >= 0, got {name!r}")
            plan[part] = int(name)
        elif name not in choices[part]:
            raise pytest.UsageError(f"--cpu-plan: {part} must be one of {', '.join(choices[part])}, got {name!r}")
        else:
            plan[part] = name
    return plan


FORCED_PLAN = {}  # --cpu-plan's parts


@pytest.fixture(scope="session", autouse=True)
def _forced_cpu_plan():
    if not FORCED_PLAN:
        yield
        return
    from deqfuse import force_cpu_plan
    with force_cpu_plan(**FORCED_PLAN):
        yield


def plan_forced():
    """Whether the suite runs under --cpu-plan (the plan's own rules are then not what runs)."""
    return bool(FORCED_PLAN)


@pytest.fixture
def no_tf32():
    """Full-precision fp32 GEMMs for the duration of a test (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def plan_part(part, D, G=4, dtype=torch.float32):
    """One part ('gemm', 'rows', 'layout') of deqfuse.cpu_plan(D, G, dtype) under the plan in force."""
    import deqfuse
    return dict(kv.split("=") for kv in deqfuse.cpu_plan(D, G, dtype).split())[part]


needs_triton = pytest.mark.skipif(not triton_runs(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
