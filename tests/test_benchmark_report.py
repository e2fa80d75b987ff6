"""The benchmark report renders the committed results into tables and plots (no GPU needed)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_tables_and_plots_from_committed_results(tmp_path):
    for name in ("dask_scaling_h200x4_nccl.json", "engine_check_h100_n180m.json", "gpu_check_h200.json"):
        shutil.copy(BENCH / "results" / name, tmp_path / name)
    report = _module("report").main(["--results", str(tmp_path)]).read_text()
    assert "| nccl | 4 | 67108864 | 0.127 | 0.126 | 1.74 |  | 0.973 |" in report  # the 4xH200 NCCL row
    assert "4/4 exactness checks bitwise equal" in report
    assert "| float32 | 1048576 | 8192 | 128 | 10.4 | 10.5 | 15.5 | 0.989 |" in report
    assert "| 180000000 | float32 | 92.2 | 55.1 |" in report
    for png in ("dask_scaling_h200x4_nccl.png", "engine_check_h100_n180m.png", "gpu_check_h200.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in report


def test_harness_runs_each_suite_with_its_settings(capsys):
    harness = _module("harness")
    assert harness.main(["out-of-core", "--tag", "h100x1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("engine_check_h100x1_n180m.json --n 180000000 --iters 2")
    assert lines[1].endswith("report.py")
