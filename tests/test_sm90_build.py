"""The streaming kernels (the portable one and the sm_90 warp-specialised pass) still build for Hopper: compiled
for sm_90 through Triton's own JIT path (no GPU needed, benchmarks/sm90_build.py), they keep their tensor-core
instructions and spill nothing. A kernel edit that breaks the
GPU build, drops the wgmma path or blows the register budget fails here instead of on the next GPU run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_assign_kernel_builds_for_sm90_with_tensor_cores_and_no_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_build.py"), "--k", "1000", "--d", "72",
                          "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rep = json.loads(run.stdout.strip().splitlines()[-1])
    assert rep["hgmma"] > 0
    assert rep["spill_bytes"] == 0
    assert 0 < rep["registers"] <= 255


def _build_stream(*variant):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_build.py"), "--stream", "--k", "1000",
                          "--d", "72", "--json", *variant], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_sm90_streaming_pass_builds_warp_specialised_with_no_spills():
    rep = _build_stream()
    assert rep["hgmma"] > 0 and rep["spill_bytes"] == 0
    assert not rep["ptxas_notes"]  # e.g. C7514: ptxas serialising the wgmma pipeline
    assert rep["sass_ops"].get("FMNMX", 0) > 0  # the score epilogue is there
    assert rep["sass_ops"].get("LDS", 0) > 0  # the centroid norms come through the shared-memory ring


def test_sm90_streaming_pass_compiles_once_for_any_n():
    """N is a run-time argument: row pair counts that differ in what Triton specialises on (1, a multiple of 16,
    odd) give the same compiled kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("import sm90_build as B; print(len({B.build_stream(1000, 72, pairs=n)[0].hash for n in (1, 2, 16, 17)}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT / "benchmarks")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "1"
