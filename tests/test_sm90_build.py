"""The streaming kernels (the portable one and the sm_90 warp-specialised pass) still build for Hopper: compiled
for sm_90 through Triton's own JIT path (no GPU needed, benchmarks/sm90_build.py), they keep their tensor-core
instructions and spill nothing; the finishing kernel keeps its 16-byte loads of x. A kernel edit that breaks the
GPU build, drops the wgmma path, blows the register budget or narrows the loads fails here instead of on the next
GPU run."""
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


def _last_line_of(code: str) -> str:
    """Run `code` in a fresh interpreter beside sm90_build.py (no TRITON_INTERPRET) and return its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT / "benchmarks")
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_sm90_streaming_pass_compiles_once_for_any_n():
    """N is a run-time argument: row pair counts that differ in what Triton specialises on (1, a multiple of 16,
    odd) give the same compiled kernel."""
    code = ("import sm90_build as B; print(len({B.build_stream(1000, 72, pairs=n)[0].hash for n in (1, 2, 16, 17)}))")
    assert _last_line_of(code) == "1"


def test_finishing_kernel_loads_x_sixteen_bytes_at_a_time():
    """The finishing kernel reads every row of x. Built for sm_90 as the launcher calls it, batched or not, its
    fp16 x loads are 16 bytes wide (LDG.E.128) and nothing spills. Without `assign._xb16` (x's batch offset known
    to be a multiple of 16 elements) every element is a 2-byte load (LDG.E.U16), which the same build shows: on
    an H200 that took the kernel from 0.88 to 1.39 ms at N=8M, K=1024."""
    code = ("import json, tempfile, sm90_build as B\n"
            "out = {}\n"
            "for xb16 in (None, False):\n"
            "    for batched in (True, False):\n"
            "        kernel, _ = B.build_finish(1024, 128, batched=batched, xb16=xb16)\n"
            "        with tempfile.TemporaryDirectory() as tmp:\n"
            "            rep = B.report(kernel, tmp)\n"
            "        out[f'{xb16} {batched}'] = [rep['global_loads'], rep['spill_bytes']]\n"
            "print(json.dumps(out))")
    got = json.loads(_last_line_of(code))
    for batched in (True, False):
        loads, spills = got[f"None {batched}"]
        assert "LDG.E.U16" not in loads and loads.get("LDG.E.128", 0) >= 2 and spills == 0, (batched, loads)
        assert "LDG.E.U16" in got[f"False {batched}"][0]  # (the check sees 2-byte loads where they are)


def test_streamed_d_scores_add_the_norms_after_the_product():
    """D streamed (above 256): the error bound assumes that the tensor-core chain starts from zero and that
    aa + |b|^2 is added after it (`assign._tile_scores`), as an add.rn.f32 of its own in inline PTX, which no
    compiler pass can fold into the chain (Triton folds `c + dot(x, y)` into `dot(x, y, c)`, one chain from c,
    whose error the stored bound would not cover). The sm_90 build keeps those adds, and from D = 1024 on, where
    the products are summed in chains (`config.STREAM_CHAIN`), the adds that sum the chains too."""
    code = ("import sm90_build as B\n"
            "for d in (320, 1024):\n"
            "    k, cfg = B.build_assign(1000, d)\n"
            "    print(int(cfg.resident), cfg.chain, k.asm['ptx'].count('add.rn.f32'), end=' ')")
    resident, chain, adds, resident_1024, chain_1024, adds_1024 = map(int, _last_line_of(code).split())
    assert resident == resident_1024 == 0 and chain == 0 and adds > 0
    assert chain_1024 > 0 and adds_1024 > adds
