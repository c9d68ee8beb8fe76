"""The GPU benchmark scripts run end to end on a tiny grid here (CPU, Triton interpreter), so they cannot
rot between the sessions that have a GPU to run them on."""
import csv
import os
import sys

import pytest

from conftest import needs_triton

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@needs_triton
@pytest.mark.triton
def test_sweep_smoke_writes_every_measure_and_a_report(tmp_path):
    sys.path.insert(0, BENCH)
    import sweep
    import sweep_report
    sweep.main(["--smoke", "--dtype", "fp32", "--no-compile", "--no-torchdeq", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    timed = {(r["measure"], r["variant"]) for r in rows if r["ms"]}
    assert not [r for r in rows if r["note"].startswith("failed")]
    assert {("cell_fwd", "reference"), ("cell_fwd", "triton"), ("cell_fwd", "triton-fused"), ("step", "triton"),
            ("solve_fwd", "auto"), ("train_step", "auto"), ("train_step", "reference")} <= timed
    sweep_report.main(str(tmp_path / "sweep.csv"), str(tmp_path / "sweep.png"), str(tmp_path / "sweep.md"))
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert "| fp32 | 2 | 8 | 3 |" in (tmp_path / "sweep.md").read_text()
