"""batched_kmeans: every problem of the batch gets the run the estimator would give it."""
import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from flashkm_dist import KMeans, batched_kmeans
from oracle import assert_labels_exact


def problems(b=4, n=300, d=5, k=6):
    xs = [make_blobs(n, d, centers=k, cluster_std=2.5, random_state=s)[0] + 50 * s for s in range(b)]
    return torch.as_tensor(np.stack(xs))


def test_each_problem_matches_the_estimator_from_the_same_init():
    x = problems()
    init = x[:, :6].clone()
    out = batched_kmeans(x, 6, init=init)
    assert out.labels.shape == (4, 300) and out.centroids.shape == (4, 6, 5) and out.n_iter.shape == (4,)
    for i in range(4):
        ref = KMeans(6, init=init[i].numpy()).fit(x[i].numpy())
        np.testing.assert_array_equal(out.labels[i].numpy(), ref.labels_)
        np.testing.assert_allclose(out.centroids[i].numpy(), ref.cluster_centers_, rtol=1e-12, atol=1e-10)
        assert int(out.n_iter[i]) == ref.n_iter_
        assert float(out.inertia[i]) == pytest.approx(ref.inertia_, rel=1e-12)


@pytest.mark.parametrize("init", ["k-means++", "random", "k-means||"])
def test_inits_and_exact_labels_in_float32(init):
    x = problems(b=3).float()
    out = batched_kmeans(x, 6, init=init, random_state=0)
    for i in range(3):
        assert_labels_exact(x[i].double().numpy(), out.centroids[i].double().numpy(), out.labels[i].numpy())
    again = batched_kmeans(x, 6, init=init, random_state=0)
    assert torch.equal(again.centroids, out.centroids)


def test_empty_cluster_in_one_problem_only():
    x = problems(b=2, n=50, d=2, k=2)
    init = x[:, :3].clone()
    init[1, 2] = -1e4  # starts empty in problem 1
    out = batched_kmeans(x, 3, init=init)
    assert (torch.bincount(out.labels[1], minlength=3) > 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        batched_kmeans(torch.zeros(5, 2), 2)
    with pytest.raises(ValueError, match="n_clusters"):
        batched_kmeans(torch.zeros(1, 3, 2), 4)
    with pytest.raises(ValueError, match=r"shape \(B, K, D\)"):
        batched_kmeans(problems(b=2), 3, init=torch.zeros(3, 3, 5))
    bad = problems(b=2)[:, :3].clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        batched_kmeans(problems(b=2), 3, init=bad)
