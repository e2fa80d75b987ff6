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
    for name in ("dask_scaling_h200x4_nccl.json", "engine_check_h100x1_n180m.json", "gpu_check_h200.json",
                 "stream_check_h200.json", "stream_variants_h200.json", "dask_1e9_h200x4.json",
                 "dask_series_h200x4_n100m.json", "dask_weak_h200x4.json", "class_sweep_h200.json",
                 "engine_fit_h200_n2e26.json", "engine_fit_h100x1_n180m_settle.json",
                 "engine_fit_h100x1_n180m_one_pass.json", "engine_fit_h100x1_n180m_final.json",
                 "ncu_profile_h200.json", "iteration_profile_h200.json"):
        shutil.copy(BENCH / "results" / name, tmp_path / name)
    report = _module("report").main(["--results", str(tmp_path)]).read_text()
    assert "| nccl | 4 | 67108864 | 0.127 | 0.126 | 1.74 |  | 0.973 |" in report  # the 4xH200 NCCL row
    assert "4/4 exactness checks bitwise equal" in report
    assert "| float32 | 1048576 | 8192 | 128 | 5.34 | 10.3 | 15.2 | 0.521 |" in report
    assert "host: 1.92 us per small torch allocation, 9.97 us per Triton launch" in report
    assert "| _stream_kernel | 3.07 | 75.10 |" in report  # Nsight Compute, 1M x 8192
    assert "| 8M_1024_fp16 | 7.08 | 7.63 | 7.03 |" in report  # one iteration, op by op, one assign
    assert "Same bits as the portable kernel (labels, min_dist, flags, thresholds): 14 of 14 cases" in report
    assert "| float16 | 1048576 | 8192 | 128 | 3.2 | 0.393 | 3.96 | 4.09 |" in report  # sm_90 pass, class pass, ...
    assert '| 1048576 x 8192 x 128 | {"overlap": true, "block_n": 64} | 4.67 | 471 | True |' in report
    assert "Graphed iterations give the op-by-op bits: 6 of 6 shapes" in report
    assert "| 8 | 10000 | 64 | 64 | 16.9 | 26 | 6.85 | True |" in report  # batched, graphed vs op by op
    assert "second new shape " in report
    assert "| 8388608 x 1024 x 128 | [None, [8192, 0]] | 1.18 | True |  |" in report  # the class pass's variants
    assert "| 180000000 | float32 | 92.2 | 54.5 | 1.69 | 1.73 | 0.983 | 54.5 | 1.9 |" in report
    assert "| bounded | 1.14 | 0.271 | 0.142 | 0.391 | 0.205 |" in report  # a fit, plain vs bounded steps
    assert "| plain_no_tier | 0.773 | 0.451 | 0.383 | 0.651 | 0.553 |" in report  # ... and without the tier
    # a fit larger than the device: after the first iteration and in the later half, against the PCIe floor
    assert "| bounded_skip | 2.04 | 0.676 | 0.483 | 0.341 | 0.244 | 1.19 | 0.849 |" in report
    assert "| bounded_skip | 2.07 | 0.624 | 0.48 | 0.328 | 0.252 | 1.08 | 0.829 |" in report  # (one pass)
    assert "| bounded_skip_block_by_block | 1.93 | 0.66 | 0.477 | 0.347 | 0.251 | 1.14 | 0.824 |" in report
    assert "| bounded_skip | 2.08 | 0.56 | 0.403 | 0.292 | 0.21 | 0.981 | 0.705 |" in report  # (the final code)
    assert "| bounded_skip_read_grid_full | 1.93 | 0.623 | 0.481 | 0.325 | 0.251 | 1.09 | 0.842 |" in report
    assert "kernel = twin True, labels exact True, bound violations 0, kept/settled/stale 28811/21565/49624" in report
    # the headline and the N series share one table, ordered by N; weak scaling reports rows per worker
    assert report.index("| 100000000 | nccl | 4 | 32768 | 0.392 |") < report.index("| 1000000000 | nccl | 4 | 32768 |")
    assert "16777216 rows per worker" in report and "| nccl | 4 | 67108864 | 0.0779 |" in report
    for png in ("dask_scaling_h200x4_nccl.png", "engine_check_h100x1_n180m.png", "gpu_check_h200.png",
                "dask_series_h200x4.png", "dask_weak_h200x4.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in report


def test_harness_runs_each_suite_with_its_settings(capsys):
    harness = _module("harness")
    assert harness.main(["out-of-core", "--tag", "h100x1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("engine_check_h100x1_n180m.json --n 180000000 --iters 2")
    assert "report.py --results" in lines[1]
    assert harness.main(["headline", "--tag", "h200x4", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "dask_1e9_h200x4.json --n 1000000000 --k 32768 --workers 4" in lines[0]
    assert [line.split("--n ")[1].split()[0] for line in lines[1:4]] == ["100000000", "250000000", "500000000"]


def test_results_name_the_code_they_came_from():
    """Every suite stores a digest of the kernel and package sources, and the report prints it."""
    provenance = _module("provenance")
    first = provenance.provenance()
    assert len(first["kernels_sha"]) == 12 and int(first["kernels_sha"], 16) >= 0
    assert provenance.provenance()["kernels_sha"] == first["kernels_sha"]  # a function of the sources only
    assert first["kernels_sha"] != first["package_sha"]
    report = _module("report")
    assert "kernels_sha abc" in report._versions({"device": "X", "kernels_sha": "abc"})


def test_stream_timeline_finds_the_compute_streams_idle_gaps_and_what_ended_them():
    timeline = _module("stream_timeline")
    ops = [(7, 0, 1000, "_stream_kernel"), (7, 1500, 2000, "Memcpy HtoD (Pinned -> Device)"),
           (7, 2000, 4000, "_stream_kernel"), (7, 4020, 5000, "_rows_kernel"),  # (20 us: under min_gap_us)
           (9, 0, 1200, "Memcpy HtoD (Pinned -> Device)"), (9, 1300, 1400, "Memcpy HtoD (Pinned -> Device)"),
           (11, 100, 300, "Memset (Device)")]
    got = timeline.gaps(ops, min_gap_us=50)
    assert got["compute_stream"] == 7 and got["span_ms"] == 5.0
    assert got["compute_idle_ms"] == 0.5  # 1000-1500
    assert got["compute_idle_while_copying_ms"] == 0.3  # 1000-1200 and 1300-1400 on stream 9
    assert got["gaps_ended_by"] == [["Memcpy HtoD (Pinned -> Device)", 1, 0.5]]
    assert got["longest_gaps_ms_at_ms"] == [(0.5, 1.0, "Memcpy HtoD (Pinned -> Device)")]
    assert got["busy_ms"] == {"7": 4.48, "9": 1.3, "11": 0.2}
    assert timeline.gaps([]) == {}
