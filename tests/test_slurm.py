"""The cluster configurations on a real (single-node) Slurm: the project's CPU sbatch script through `sbatch --wait`,
and a fit through dask-jobqueue's SLURMCluster scaled to 2 workers; plus checks of the configuration files.

The Slurm daemons are started by the `slurm` fixture (tests/slurm_local.py). Without the Slurm packages or root the
tests are skipped, except where FLASHKM_REQUIRE_SLURM=1 (CI, set by .ci/run): there they fail.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import make_blobs

from flashkm_dist import KMeans
from slurm_local import LocalSlurm, Unavailable

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster-configs"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as why:
        if os.environ.get("FLASHKM_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm is required here (FLASHKM_REQUIRE_SLURM=1) but: {why}")
        pytest.skip(str(why))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    X, _ = make_blobs(3000, 6, centers=8, cluster_std=2.5, random_state=11)
    folder = tmp_path_factory.mktemp("slurm-data")
    np.save(folder / "x.npy", X.astype(np.float32))
    return folder / "x.npy", X.astype(np.float32)


def _jobqueue_example():
    spec = importlib.util.spec_from_file_location("jobqueue_fit", CONFIGS / "jobqueue_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_sbatch_script_fits_and_shuts_down(slurm, data, tmp_path):
    path, X = data
    env = dict(slurm.env, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLASHKM_RUN_DIR=str(tmp_path / "run"))
    run = slurm.run("sbatch", "--wait", f"--cpus-per-task={min(slurm.cpus, 2)}", "--mem=2G", "--time=00:10:00",
                    f"--output={tmp_path}/job.out", f"--chdir={tmp_path}",
                    str(CONFIGS / "slurm" / "fit-cpu.sbatch"), str(path), "8", str(tmp_path / "model.npz"),
                    "--random-state", "2", "--labels", str(tmp_path / "labels.npy"), "-q", env=env, timeout=360)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log}\n{slurm.logs()}"
    ref = KMeans(8, init="k-means||", random_state=2).fit(X)
    model = KMeans.load(tmp_path / "model.npz")
    np.testing.assert_array_equal(model.cluster_centers_, ref.cluster_centers_)
    assert model.inertia_ == ref.inertia_ and model.n_iter_ == ref.n_iter_
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), ref.labels_)
    workers = min(slurm.cpus, 2)
    assert f"{workers} workers on 1 node(s)" in log and f"; {workers} workers" in log  # all of them took part
    assert "job finished with exit code 0" in log and "still running after the shutdown" not in log
    assert slurm.wait_no_jobs(timeout=30), slurm.jobs()  # the job ended: scheduler and workers shut down


def test_sbatch_script_ends_with_the_exit_code_of_the_fit(slurm, tmp_path):
    env = dict(slurm.env, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLASHKM_RUN_DIR=str(tmp_path / "run"))
    submit = slurm.run("sbatch", "--parsable", "--cpus-per-task=1", "--mem=1G", "--time=00:05:00",
                       f"--output={tmp_path}/job.out", str(CONFIGS / "slurm" / "fit-cpu.sbatch"),
                       str(tmp_path / "missing.npy"), "3", str(tmp_path / "model.npz"), env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    state, exit_code = slurm.wait_job(submit.stdout.strip().split(";")[0], timeout=300)
    log = (tmp_path / "job.out").read_text()
    assert (state, exit_code) == ("FAILED", "2:0"), log
    assert "missing.npy: no such file or directory" in log and "job finished with exit code 2" in log
    assert slurm.wait_no_jobs(timeout=30), slurm.jobs()


DASK_CUDA_STAND_IN = """#!/usr/bin/env bash
# `dask cuda worker` on a machine without GPUs: one CPU worker per entry of CUDA_VISIBLE_DEVICES
if [ "$1" = cuda ] && [ "$2" = worker ]; then
  shift 2
  n=$(echo "$CUDA_VISIBLE_DEVICES" | tr , '\\n' | grep -c .)
  exec {dask} worker --nworkers "$n" --nthreads 1 "$@"
fi
exec {dask} "$@"
"""


@pytest.mark.parametrize("script", ["fit-one-node.sbatch", "fit-multi-node.sbatch"])
def test_gpu_sbatch_scripts_with_cpu_workers_standing_in(slurm, data, tmp_path, script):
    """The GPU scripts' orchestration (scheduler file, workers per node, wait, fit, shutdown) on this GPU-less
    Slurm: the #SBATCH GPU request is dropped and `dask cuda worker` starts CPU workers, one per listed GPU."""
    path, X = data
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "dask").write_text(DASK_CUDA_STAND_IN.format(dask=BIN / "dask"))
    (stand_in / "dask").chmod(0o755)
    copy = tmp_path / script
    copy.write_text("".join(line for line in (CONFIGS / "slurm" / script).read_text().splitlines(keepends=True)
                            if not line.startswith("#SBATCH --gpus-per-node")))
    env = dict(slurm.env, PATH=f"{stand_in}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               CUDA_VISIBLE_DEVICES="0,1", FLASHKM_GPUS_PER_NODE="2", FLASHKM_RUN_DIR=str(tmp_path / "run"))
    submit = slurm.run("sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={min(slurm.cpus, 2)}", "--mem=2G",
                       "--time=00:10:00", f"--output={tmp_path}/job.out", f"--chdir={tmp_path}", str(copy),
                       str(path), "8", str(tmp_path / "model.npz"), "--random-state", "3", "-q", env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    state, exit_code = slurm.wait_job(submit.stdout.strip().split(";")[0], timeout=300)
    log = (tmp_path / "job.out").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"{log}\n{slurm.logs()}"
    assert "; 2 workers" in log and "job finished with exit code 0" in log
    assert "still running after the shutdown" not in log
    model = KMeans.load(tmp_path / "model.npz")
    np.testing.assert_array_equal(model.cluster_centers_,
                                  KMeans(8, init="k-means||", random_state=3).fit(X).cluster_centers_)
    assert slurm.wait_no_jobs(timeout=30), slurm.jobs()


def test_slurmcluster_fit_with_two_worker_jobs(slurm, data, tmp_path, monkeypatch, capsys):
    path, X = data
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    example = _jobqueue_example()
    code = example.main([str(path), "8", str(tmp_path / "model.npz"), "--cpu", "--jobs", "2", "--memory", "1GB",
                         "--cores", "1", "--walltime", "00:10:00", "--random-state", "5",
                         "--log-directory", str(tmp_path / "logs"), "--labels", str(tmp_path / "labels.zarr")])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 workers up" in out and "2 chunks" in out
    assert "#SBATCH --cpus-per-task=1" in out
    ref = KMeans(8, init="k-means||", random_state=5).fit(X)
    model = KMeans.load(tmp_path / "model.npz")
    np.testing.assert_array_equal(model.cluster_centers_, ref.cluster_centers_)
    import zarr
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:], ref.labels_)
    assert len(list((tmp_path / "logs").glob("*.err"))) == 2  # two Slurm jobs ran the workers
    assert slurm.wait_no_jobs(timeout=60), slurm.jobs()  # closing the cluster cancelled them


# ------------------------------------------------------------------------------------ configuration files
def test_jobqueue_gpu_settings_make_one_gpu_worker_per_job():
    pytest.importorskip("dask_jobqueue")
    cluster = _jobqueue_example().make_cluster("gpu", queue="gpu-test", account="proj", scheduler_options={
        "dashboard_address": ":0"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu-test" in script and "#SBATCH -A proj" in script and "#SBATCH --gpus=1" in script
    assert "-m dask_cuda.cli " in script and "--memory-limit" in script and "--nthreads 8" in script


def test_local_cuda_yaml_is_read_by_the_cli():
    from flashkm_dist.cli import _read_cluster_config
    kind, kwargs = _read_cluster_config(str(CONFIGS / "local-cuda.yaml"))
    assert kind == "local-cuda-cluster"
    assert kwargs["threads_per_worker"] == 1 and "CUDA_VISIBLE_DEVICES" in kwargs
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return
    import inspect
    from distributed import LocalCluster
    known = set(inspect.signature(LocalCUDACluster).parameters) | set(inspect.signature(LocalCluster).parameters)
    assert set(kwargs) <= known


def test_sbatch_scripts_are_valid_bash_with_directives():
    import subprocess
    for script in sorted((CONFIGS / "slurm").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        text = script.read_text()
        assert "#SBATCH --time=" in text and "flashkm fit" in text and "flashkm shutdown" in text
        if "cpu" not in script.name:
            assert "#SBATCH --gpus-per-node=" in text and "dask cuda worker --scheduler-file" in text
    assert yaml.safe_load((CONFIGS / "jobqueue.yaml").read_text())["jobqueue"].keys() == {"flashkm-gpu",
                                                                                          "flashkm-cpu"}
