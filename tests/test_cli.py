"""The `flashkm` command: fit -> predict round trips through every reader's format on a real LocalCluster give the
bits of the in-process fit; checkpoints resume; user errors exit non-zero with a message and no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from distributed import LocalCluster
from sklearn.datasets import make_blobs

from flashkm_dist import KMeans, cli
from flashkm_dist.dask import driver

pytestmark = pytest.mark.timeout(300)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def scheduler():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def blobs():
    X, _ = make_blobs(2000, 5, centers=6, cluster_std=2.0, random_state=4)
    return X.astype(np.float32)


def _write_input(fmt: str, X: np.ndarray, root: Path) -> str:
    if fmt == "npy":
        np.save(root / "x.npy", X)
        return str(root / "x.npy")
    if fmt == "npy-dir":
        (root / "parts").mkdir()
        for i, rows in enumerate(np.array_split(np.arange(len(X)), 3)):
            np.save(root / "parts" / f"part-{i}.npy", X[rows])
        return str(root / "parts")
    if fmt == "zarr":
        g = zarr.open_group(str(root / "data.zarr"), mode="w")
        g.create_array("x", shape=X.shape, chunks=(256, X.shape[1]), dtype=X.dtype)[:] = X
        return f"{root / 'data.zarr'}:/x"
    with h5py.File(root / "data.h5", "w") as f:
        f.create_dataset("group/x", data=X, chunks=(100, X.shape[1]))
    return f"{root / 'data.h5'}:/group/x"


def _read(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    store, _, inner = path.partition(":/")
    node = zarr.open(store, mode="r")
    return (node[inner] if inner else node)[:]


def assert_same_model(path, ref: KMeans) -> KMeans:
    model = KMeans.load(path)
    np.testing.assert_array_equal(model.cluster_centers_, ref.cluster_centers_)
    assert model.inertia_ == ref.inertia_ and model.n_iter_ == ref.n_iter_
    return model


@pytest.mark.parametrize("fmt", ["npy", "npy-dir", "zarr", "hdf5"])
def test_fit_then_predict_round_trips_every_format(scheduler, blobs, tmp_path, fmt, capsys):
    source = _write_input(fmt, blobs, tmp_path)
    labels_out = str(tmp_path / ("fit-labels.npy" if fmt != "zarr" else "fit.zarr:/labels"))
    code = cli.main(["fit", source, "-k", "6", "-o", str(tmp_path / "model.npz"), "--labels", labels_out,
                     "--init", "k-means++", "--random-state", "3", "--chunk-rows", "300", "-q",
                     "--scheduler-address", scheduler])
    out = capsys.readouterr().out
    assert code == 0, out
    chunks = 9 if fmt == "npy-dir" else 7  # 2000 rows in chunks of 300; chunks of 3 files of ~667 rows
    assert f"{chunks} chunks; 2 workers" in out
    ref = KMeans(6, init="k-means++", random_state=3).fit(blobs)
    assert_same_model(tmp_path / "model.npz", ref)
    np.testing.assert_array_equal(_read(labels_out), ref.labels_)

    predicted = str(tmp_path / ("pred.zarr" if fmt == "npy" else "pred.npy"))
    code = cli.main(["predict", str(tmp_path / "model.npz"), source, "-o", predicted,
                     "--distances", str(tmp_path / "dist.npy"), "--scheduler-address", scheduler])
    assert code == 0
    np.testing.assert_array_equal(_read(predicted), ref.labels_)
    np.testing.assert_allclose(np.load(tmp_path / "dist.npy"), ref.transform(blobs), rtol=1e-6)


def test_options_reach_the_estimator(scheduler, blobs, tmp_path):
    np.save(tmp_path / "x.npy", blobs)
    w = np.random.default_rng(2).integers(0, 3, len(blobs)).astype(np.float64)
    np.save(tmp_path / "w.npy", w)
    init = blobs[[0, 500, 1000, 1500, 1999, 7]].astype(np.float64)
    np.save(tmp_path / "init.npy", init)
    code = cli.main(["fit", str(tmp_path / "x.npy"), "-k", "6", "-o", str(tmp_path / "m"), "--init",
                     str(tmp_path / "init.npy"), "--sample-weight", str(tmp_path / "w.npy"), "--metric", "cosine",
                     "--dtype", "float64", "--tol", "0", "--max-iter", "7", "-q", "--scheduler-address", scheduler])
    assert code == 0
    ref = KMeans(6, init=init, metric="cosine", dtype="float64", tol=0.0, max_iter=7).fit(blobs, sample_weight=w)
    model = assert_same_model(tmp_path / "m.npz", ref)  # .npz appended
    assert model.metric == "cosine" and model.cluster_centers_.dtype == np.float64


def test_an_interrupted_fit_resumes_from_its_checkpoint(scheduler, tmp_path, capsys):
    X, _ = make_blobs(3000, 4, centers=30, cluster_std=4.0, random_state=9)  # many iterations
    np.save(tmp_path / "x.npy", X)
    ckpt = str(tmp_path / "ckpt.npz")
    args = ["fit", str(tmp_path / "x.npy"), "-k", "30", "-o", str(tmp_path / "model.npz"), "--init", "random",
            "--n-init", "2", "--random-state", "4", "--tol", "0", "--max-iter", "40", "--checkpoint", ckpt,
            "--chunk-rows", "700", "-q", "--scheduler-address", scheduler]
    ref = KMeans(30, init="random", n_init=2, random_state=4, tol=0.0, max_iter=40).fit(X)
    assert ref.n_iter_ > 4

    def ctrl_c(iteration):
        if iteration == 3:
            raise KeyboardInterrupt

    driver.ITERATION_HOOKS.append(ctrl_c)
    try:
        assert cli.main(args) == 130
    finally:
        driver.ITERATION_HOOKS.remove(ctrl_c)
    assert "continue with --checkpoint" in capsys.readouterr().err
    assert os.path.exists(ckpt) and not os.path.exists(tmp_path / "model.npz")
    assert cli.main(args + ["--resume"]) == 0
    assert_same_model(tmp_path / "model.npz", ref)


@pytest.mark.parametrize("argv, message", [
    (["fit", "{d}/missing.npy", "-k", "3", "-o", "{d}/m.npz"], "missing.npy: no such file or directory"),
    (["fit", "{d}/data.h5:/nope", "-k", "3", "-o", "{d}/m.npz"], "dataset '/nope' does not exist .*/group/x"),
    (["fit", "{d}/data.h5:/group/x", "-k", "3", "-o", "{d}/no/dir/m.npz"], "does not exist"),
    (["fit", "{d}/data.h5:/group/x", "-k", "3", "-o", "{d}/m.npz", "--labels", "{d}/l.txt"], ".npy or .zarr"),
    (["fit", "{d}/data.h5:/group/x", "-k", "5000", "-o", "{d}/m.npz"], "fewer than the 5000 clusters"),
    (["fit", "{d}/data.h5:/group/x", "-k", "3", "-o", "{d}/m.npz", "--resume"], "--resume needs --checkpoint"),
    (["fit", "{d}/data.h5:/group/x", "-k", "3", "-o", "{d}/m.npz", "--init", "kmeans"], "--init must be one of"),
    (["predict", "{d}/model.npz", "{d}/wide.npy", "-o", "{d}/l.npy"],
     "wide.npy has 7 features, but the model .*model.npz was fitted on 5 features"),
    (["predict", "{d}/nomodel.npz", "{d}/wide.npy", "-o", "{d}/l.npy"], "nomodel.npz: no such file"),
    (["predict", "{d}/wide.npy", "{d}/wide.npy", "-o", "{d}/l.npy"], "not a model saved by flashkm"),
    (["fit", "{d}/data.h5:/group/x", "-k", "3", "-o", "{d}/m.npz", "--scheduler-file", "{d}/sched.json"],
     "scheduler file .*sched.json does not exist"),
])
def test_user_errors_give_a_message_and_exit_code_2(tmp_path, blobs, capsys, argv, message):
    _write_input("hdf5", blobs, tmp_path)
    np.save(tmp_path / "wide.npy", np.zeros((10, 7), np.float32))
    KMeans(3, random_state=0).fit(blobs).save(tmp_path / "model.npz")
    code = cli.main([a.format(d=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"flashkm {argv[0]}: error: ")
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "m.npz").exists()


def test_console_script_local_cluster_from_a_config_file(tmp_path, blobs):
    """The installed `flashkm` command end to end: a local cluster from --cluster-config, then a user error."""
    np.save(tmp_path / "x.npy", blobs)
    (tmp_path / "cpu.yaml").write_text("local-cluster:\n  n_workers: 2\n  threads_per_worker: 1\n")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    run = subprocess.run([str(BIN / "flashkm"), "fit", str(tmp_path / "x.npy"), "-k", "6", "-o",
                          str(tmp_path / "model.npz"), "--random-state", "1", "--cluster-config",
                          str(tmp_path / "cpu.yaml"), "--labels", str(tmp_path / "labels.zarr")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr
    assert "2 chunks; 2 workers" in run.stdout  # one chunk per worker by default
    ref = KMeans(6, init="k-means||", random_state=1).fit(blobs)
    assert_same_model(tmp_path / "model.npz", ref)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:], ref.labels_)

    bad = subprocess.run([str(BIN / "flashkm"), "predict", str(tmp_path / "model.npz"), str(tmp_path / "x.npy:/a"),
                          "-o", str(tmp_path / "p.npy")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "it has no inner path" in bad.stderr
