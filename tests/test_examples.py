"""The examples and the demo, executed: the notebook (through nbclient, on CPU with tiny data from its environment
parameters), the example scripts, and `flashkm demo`. Each checks results, not only that it ran."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from flashkm_dist import KMeans

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(300)


def _env(**extra) -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def test_notebook_runs_on_a_local_cluster_and_matches_the_in_process_fit(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    rng = np.random.default_rng(7)
    centres = rng.uniform(-8, 8, (5, 4))
    X = (centres[rng.integers(0, 5, 1500)] + rng.standard_normal((1500, 4))).astype(np.float32)
    store = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    store.create_array("points", shape=X.shape, chunks=(200, 4), dtype=X.dtype)[:] = X

    nb = nbformat.read(EXAMPLES / "kmeans_on_a_dask_cluster.ipynb", as_version=4)
    params = {"FLASHKM_SCHEDULER": "", "FLASHKM_N_WORKERS": "2", "FLASHKM_DATA": f"{tmp_path / 'data.zarr'}:/points",
              "FLASHKM_K": "5", "FLASHKM_MAX_ITER": "50", "FLASHKM_OUT": str(tmp_path / "out")}
    saved = {k: os.environ.get(k) for k in [*params, "MPLBACKEND"]}
    os.environ.update(params)  # the kernel inherits them; its figures go inline (no MPLBACKEND override)
    os.environ.pop("MPLBACKEND", None)
    try:
        client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the convergence + sizes figure
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 workers" in text and "labels written to" in text

    ref = KMeans(5, init="k-means||", max_iter=50, random_state=0).fit(X)
    model = KMeans.load(tmp_path / "out" / "model.npz")
    np.testing.assert_array_equal(model.cluster_centers_, ref.cluster_centers_)
    labels = zarr.open_array(str(tmp_path / "out" / "labels.zarr"), mode="r")
    assert labels.chunks == (600,)  # X's Dask chunks: 2 workers, whole zarr chunks of 200 rows
    np.testing.assert_array_equal(labels[:], ref.labels_)


def test_local_cluster_example_script(tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLES / "fit_local_cluster.py"), "--n-samples", "6000",
                          "--n-features", "8", "-k", "6", "--dir", str(tmp_path)],
                         capture_output=True, text=True, env=_env(), timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LocalCluster with 2 workers; data 6,000 x 8 float32, 4 chunks" in run.stdout
    assert "same centres and labels as the in-process fit: True" in run.stdout
    x = np.load(tmp_path / "data.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"),
                                  KMeans(6, init="k-means||", random_state=0).fit(x).labels_)


def test_in_process_example_script(tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLES / "fit_in_process.py"), str(tmp_path / "history.png")],
                         capture_output=True, text=True, cwd=tmp_path, env=_env(MPLBACKEND="Agg"), timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "reloaded model agrees: True" in run.stdout
    assert (tmp_path / "history.png").stat().st_size > 1000 and (tmp_path / "model.npz").exists()


def test_demo_through_the_cli_reports_a_good_fit():
    run = subprocess.run([str(BIN / "flashkm"), "demo", "--n-samples", "20000", "--n-features", "8",
                          "--n-clusters", "6"], capture_output=True, text=True, env=_env(), timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "cluster: LocalCluster, 2 workers" in out and "on 2 Dask workers" in out
    ari = float(out.split("adjusted Rand index ")[1].split()[0])
    median_error = float(out.split("nearest true centre: median ")[1].split(",")[0])
    assert ari > 0.99 and median_error < 0.1
    assert "identical centres and labels: yes" in out
