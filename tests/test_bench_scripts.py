"""The GPU benchmark scripts run end to end on a tiny grid here (CPU, Triton interpreter), so they cannot
rot between the sessions that have a GPU to run them on."""
import os
import sys

import pytest

import deqfuse

from deqfuse.benchmarking import RESULTS_FIELDS, read_results
from conftest import needs_triton

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@needs_triton
@pytest.mark.triton
def test_sweep_smoke_writes_every_measure_and_a_report(tmp_path):
    sys.path.insert(0, BENCH)
    import sweep
    import sweep_report
    sweep.main(["--smoke", "--dtype", "fp32", "--no-compile", "--no-torchdeq", "--out", str(tmp_path)])
    rows = read_results(str(tmp_path / "sweep.csv"))
    assert rows and set(rows[0]) == set(RESULTS_FIELDS) and all(r["git_rev"] and r["date"] for r in rows)
    timed = {(r["op"], r["variant"]) for r in rows if r["metric"] == "ms" and isinstance(r["value"], float)}
    assert not [r for r in rows if r["note"].startswith("failed")]
    assert {("cell_fwd", "reference"), ("cell_fwd", "triton/cublas"), ("cell_fwd", "triton/fused"), ("step", "triton"),
            ("solve_fwd", "auto"), ("train_step", "auto"), ("train_step", "reference")} <= timed
    sweep_report.main(str(tmp_path / "sweep.csv"), str(tmp_path / "sweep.png"), str(tmp_path / "sweep.md"))
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert "| fp32 | 2 | 8 | 3 |" in (tmp_path / "sweep.md").read_text()


def test_bench_compile_smoke_reports_no_recompilation(tmp_path):
    sys.path.insert(0, BENCH)
    import bench_compile
    res = bench_compile.main(["--backend", "aot_eager", "--B", "5,7", "--D", "16", "--iters", "3", "--reps", "2",
                              "--threads", "1", "--out", str(tmp_path)])
    rows = read_results(str(tmp_path / "compile.csv"))
    assert rows and set(rows[0]) == set(RESULTS_FIELDS)
    for mode in ("eval", "train"):
        graphs = [res.value(f"compile_{mode}", "compiled/aot_eager", "unique_graphs", B=b) for b in (5, 7)]
        assert graphs[0] == graphs[1] >= 1
        assert res.value(f"compile_{mode}", "eager", "ms", B=7) > 0


def test_recipe_ablation_reports_validation_scores_only(tmp_path):
    sys.path.insert(0, BENCH)
    import recipe_ablation
    recipe_ablation.main(["--data", "brca", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path)])
    rows = read_results(str(tmp_path / "recipe_ablation.csv"))
    assert {r["variant"] for r in rows} == {v[0] for v in recipe_ablation.VARIANTS}
    assert {r["metric"] for r in rows} == {"val_accuracy", "val_accuracy_std", "val_macro_f1", "val_sum", "solver_steps"}
    acc = [r["value"] for r in rows if r["metric"] == "val_accuracy"]
    assert all(0 < a <= 1 for a in acc)


def test_grad_accuracy_reports_every_setting(tmp_path):
    """Plumbing only (a 2-epoch model need not be contractive): every setting has its four numbers and a
    tighter tolerance never evaluates fewer rows."""
    sys.path.insert(0, BENCH)
    import grad_accuracy
    grad_accuracy.main(["--data", "brca", "--method", "deq", "--epochs", "2", "--out", str(tmp_path)])
    rows = read_results(str(tmp_path / "grad_accuracy.csv"))
    by = {(r["variant"], r["metric"]): r["value"] for r in rows}
    tols = ["0.01", "0.001", "0.0001", "1e-05", "1e-06"]
    names = [f"deqfuse rel {t}" for t in tols] + ["official (batch abs 1e-3 / rel 1e-3)"]
    assert all((n, m) in by for n in names for m in ("grad_rel_err", "out_rel_err", "rows", "ms"))
    assert all(0 <= by[(n, "grad_rel_err")] < float("inf") for n in names)
    rows_evaluated = [by[(f"deqfuse rel {t}", "rows")] for t in tols]
    assert rows_evaluated == sorted(rows_evaluated)


def test_bench_small_smoke_reports_per_iteration_times_and_no_op_per_iteration(tmp_path):
    """benchmarks/bench_small.py end to end on tiny shapes: every row has the per-iteration times and
    their ratios to the GEMM floor, and the eval solve adds no ATen op per iteration (the C++ whole solve)."""
    sys.path.insert(0, BENCH)
    import bench_small
    rows = bench_small.main(["--B", "5", "--D", "8", "--N", "2", "--iters", "3", "--reps", "1", "--no-torchdeq",
                             "--out", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["eval_it_ms"] > 0 and rows[0]["train_x_floor"] > 0
    got = {(r["metric"], r["op"]): float(r["value"]) for r in read_results(os.path.join(tmp_path, "small.csv"))}
    assert got[("aten_ops_per_eval_iteration", "solver_iteration")] == 0
    if deqfuse.extension_status()[0] is not None:  # the floor timed inside the extension, beside torch.mm's
        assert rows[0]["kernel_floor_ms"] > 0 and rows[0]["train_x_kernel_floor"] > 0


@pytest.mark.skipif(deqfuse.extension_status()[0] is None, reason="compiled extension not built")
def test_bench_op_iter_smoke_reports_an_iteration_beside_the_floor(capsys):
    sys.path.insert(0, BENCH)
    import bench_op_iter
    before = deqfuse._C.get_cpu_plan()
    rows = bench_op_iter.main(["--B", "9", "--D", "16", "--N", "1,2", "--reps", "3", "--lo", "1", "--hi", "3",
                               "--threads", "1", "--gemm", "blas"])
    assert [(r["B"], r["D"], r["N"]) for r in rows] == [(9, 16, 1), (9, 16, 2)]
    assert all(r["floor_us"] > 0 for r in rows)  # iteration differences may be noise-negative at this size
    assert all(r["plan"].startswith("gemm=blas rows=") for r in rows)
    assert deqfuse._C.get_cpu_plan() == before  # the forced plan ends with the run
    assert "x floor" in capsys.readouterr().out
