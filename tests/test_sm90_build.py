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
