"""Bad input gets a clear error that names the problem; nothing is silently wrong."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import NotFittedError

from flashkm_dist import KMeans

X = np.random.RandomState(0).standard_normal((20, 3))


def fitted():
    return KMeans(2, random_state=0).fit(X)


@pytest.mark.parametrize("bad, error, match", [
    (np.r_[X, [[np.nan, 0, 0]]], ValueError, "NaN"),
    (np.r_[X, [[np.inf, 0, 0]]], ValueError, "infinity"),
    (np.empty((0, 3)), ValueError, "0 sample"),
    (np.empty((5, 0)), ValueError, "0 feature"),
    (X[:, 0], ValueError, "Expected 2D array"),
    (X[None], ValueError, "3"),
    (X.astype(complex), ValueError, "Complex"),
    (np.array([["a", "b"], ["c", "d"]], dtype=object), (ValueError, TypeError), "string|float"),
    (sp.csr_matrix(X), TypeError, "[Ss]parse"),
    (torch.tensor([[float("nan"), 1.0]] * 3), ValueError, "NaN"),
    (torch.zeros(0, 2), ValueError, "0 sample"),
    (torch.zeros(3), ValueError, "Expected 2D"),
    (torch.zeros(2, 2, dtype=torch.complex64), ValueError, "Complex"),
])
def test_bad_X_in_fit(bad, error, match):
    with pytest.raises(error, match=match):
        KMeans(1).fit(bad)


@pytest.mark.parametrize("params, match", [
    ({"n_clusters": 0}, "n_clusters"), ({"n_clusters": 2.5}, "n_clusters"), ({"n_clusters": 21}, "n_samples=20"),
    ({"max_iter": 0}, "max_iter"), ({"max_iter": 1.5}, "max_iter"), ({"tol": -1.0}, "tol"), ({"tol": "x"}, "tol"),
    ({"n_init": 0}, "n_init"), ({"n_init": "many"}, "n_init"), ({"init": "kmeans"}, "init"),
    ({"init": 7}, "init"), ({"init": np.zeros((3, 3))}, r"init array must have shape \(n_clusters=2"),
    ({"init": np.zeros((2, 4))}, "n_features=3"), ({"init": np.full((2, 3), np.nan)}, "NaN"),
    ({"metric": "manhattan"}, "metric"), ({"device": "tpu"}, "device"), ({"dtype": "int8"}, "dtype"),
    ({"oversampling_factor": 0}, "oversampling_factor"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        KMeans(**{"n_clusters": 2, **params}).fit(X)


def test_cuda_device_without_cuda_is_refused_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(ValueError, match="CUDA is not available"):
        KMeans(2, device="cuda").fit(X)


@pytest.mark.parametrize("weights, match", [
    (np.ones(19), "19 entries but X has 20"), (-np.ones(20), "non-negative"), (np.zeros(20), "all weights are zero"),
    (np.r_[np.ones(19), np.nan], "NaN"), (np.ones((20, 1)), "1-D"),
])
def test_bad_sample_weight(weights, match):
    with pytest.raises(ValueError, match=match):
        KMeans(2).fit(X, sample_weight=weights)


def test_random_init_needs_enough_positive_weights():
    with pytest.raises(ValueError, match="positive weight"):
        KMeans(3, init="random").fit(X, sample_weight=np.r_[1.0, 1.0, np.zeros(18)])


def test_predict_before_fit_and_dimension_mismatch():
    for method in ("predict", "transform", "score"):
        with pytest.raises(NotFittedError):
            getattr(KMeans(2), method)(X)
    km = fitted()
    with pytest.raises(ValueError, match="X has 4 features, but KMeans is expecting 3 features"):
        km.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="X has 4 features"):
        km.predict(torch.zeros(2, 4))


def test_explicit_init_with_n_init_warns_and_runs_once():
    with pytest.warns(RuntimeWarning, match="only one init"):
        KMeans(2, init=X[:2], n_init=5).fit(X)


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.array('{"format": 99}'), cluster_centers=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="unknown model format"):
        KMeans.load(path)
