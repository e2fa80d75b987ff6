"""The estimator and batched API on the Triton path (interpreter, FLASHKM_TRITON=1) give the reference's answer."""
import numpy as np
import pytest
import torch

from flashkm_dist import KMeans, batched_kmeans
from flashkm_dist.engine import backend_for


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHKM_TRITON", "1")
    assert backend_for("cpu").name == "triton"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fit_on_triton_path_equals_reference_fit(triton_on_cpu, dtype, monkeypatch):
    rng = np.random.RandomState(0)
    X = (np.repeat(rng.uniform(-5, 5, (5, 6)), 40, axis=0) + rng.standard_normal((200, 6)) + 300).astype(dtype)
    init = X[:5]
    fast = KMeans(5, init=init).fit(X)
    monkeypatch.setenv("FLASHKM_TRITON", "0")
    ref = KMeans(5, init=init).fit(X)
    np.testing.assert_array_equal(fast.labels_, ref.labels_)
    np.testing.assert_array_equal(fast.cluster_centers_, ref.cluster_centers_)
    assert fast.n_iter_ == ref.n_iter_
    assert fast.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


def test_batched_on_triton_path(triton_on_cpu, monkeypatch):
    x = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(1))
    fast = batched_kmeans(x, 4, init=x[:, :4].clone())
    monkeypatch.setenv("FLASHKM_TRITON", "0")
    slow_labels = []
    for i in range(2):
        slow_labels.append(KMeans(4, init=x[i, :4].numpy()).fit(x[i].numpy()).labels_)
    np.testing.assert_array_equal(fast.labels.numpy(), np.stack(slow_labels))
