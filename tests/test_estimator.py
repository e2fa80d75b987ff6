"""KMeans against scikit-learn, the float64 oracle and its own promises (weights, n_init, cosine, files)."""
import pickle

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SKKMeans
from sklearn.datasets import load_digits, make_blobs
from sklearn.exceptions import ConvergenceWarning

from flashkm_dist import KMeans
from oracle import assert_labels_exact, cos_dists


def same_init(X, k, seed=0):
    return X[np.random.RandomState(seed).choice(len(X), k, replace=False)]


@pytest.mark.parametrize("dataset", ["digits", "blobs", "blobs_offset"])
def test_same_run_as_sklearn_lloyd_float64(dataset):
    if dataset == "digits":
        X, k = load_digits().data.astype(np.float64), 10
    else:
        X, _ = make_blobs(3000, 12, centers=7, cluster_std=3.0, random_state=1)
        X, k = (X + 300.0 if dataset == "blobs_offset" else X), 7
    init = same_init(X, k)
    ours = KMeans(k, init=init, n_init=1, device="cpu").fit(X)
    ref = SKKMeans(k, init=init, n_init=1, algorithm="lloyd").fit(X)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-9,
                               atol=1e-9 * np.abs(ref.cluster_centers_).max())
    assert ours.n_iter_ == ref.n_iter_
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-9)
    assert ours.cluster_centers_.dtype == np.float64 and ours.labels_.dtype == np.int64


def test_tol_zero_runs_to_strict_convergence_like_sklearn():
    X, _ = make_blobs(2000, 5, centers=6, cluster_std=4.0, random_state=2)
    init = same_init(X, 6, 1)
    ours = KMeans(6, init=init, tol=0.0).fit(X)
    ref = SKKMeans(6, init=init, n_init=1, tol=0.0, algorithm="lloyd").fit(X)
    assert ours.n_iter_ == ref.n_iter_ and ours.history_[-1]["labels_changed"] == 0
    np.testing.assert_array_equal(ours.labels_, ref.labels_)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_fit_and_predict_labels_exact_for_low_precision(dtype, offset):
    X, _ = make_blobs(1500, 17, centers=9, cluster_std=2.5, random_state=3)
    X = X + offset
    compute = None if dtype == "bfloat16" else dtype
    km = KMeans(9, random_state=0, dtype="bfloat16" if dtype == "bfloat16" else None).fit(
        X.astype(np.float32) if compute is None else X.astype(compute))
    xq = torch.as_tensor(X).to({np.float32: torch.float32, np.float16: torch.float16}.get(compute, torch.bfloat16))
    centers = torch.as_tensor(km.cluster_centers_).to(xq.dtype).double().numpy()
    assert_labels_exact(xq.double().numpy(), centers, km.labels_)
    Xnew = np.random.RandomState(4).standard_normal((500, 17)) * 8 + offset
    pred = km.predict(xq.new_tensor(Xnew).to(xq.dtype))
    assert_labels_exact(xq.new_tensor(Xnew).to(xq.dtype).double().numpy(), centers, pred.numpy())


def test_predict_exact_on_data_offset_by_300():
    # scikit-learn centres X in fit but not in predict; our predict keeps the fit's shift.
    X, _ = make_blobs(4000, 6, centers=20, cluster_std=1.0, random_state=5)
    X = (X + 300.0).astype(np.float32)
    km = KMeans(20, random_state=0).fit(X)
    assert_labels_exact(X, km.cluster_centers_, km.predict(X))
    np.testing.assert_array_equal(km.predict(X), km.labels_)


@pytest.mark.parametrize("d", [1, 3, 200])
def test_any_dimension(d):
    X = np.random.RandomState(d).standard_normal((300, d))
    km = KMeans(5, random_state=0).fit(X)
    assert km.cluster_centers_.shape == (5, d)
    assert_labels_exact(X, km.cluster_centers_, km.labels_)


def test_k_equals_one_and_k_equals_n():
    X = np.random.RandomState(6).standard_normal((40, 3))
    one = KMeans(1).fit(X)
    np.testing.assert_allclose(one.cluster_centers_[0], X.mean(0), rtol=1e-12)
    assert one.inertia_ == pytest.approx(((X - X.mean(0)) ** 2).sum())
    every = KMeans(40, init="random", n_init=1, random_state=0).fit(X)
    assert sorted(every.labels_) == list(range(40)) and every.inertia_ == 0.0


def test_reproducible_with_random_state_and_n_init_keeps_best():
    X, _ = make_blobs(1500, 4, centers=12, cluster_std=2.0, random_state=7)
    for init in ["k-means++", "k-means||", "random"]:
        a = KMeans(12, init=init, random_state=3).fit(X)
        b = KMeans(12, init=init, random_state=3).fit(X)
        np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
        assert a.inertia_ == b.inertia_
    singles = [KMeans(12, init="random", n_init=1, random_state=rs).fit(X).inertia_ for rs in range(6)]
    rs = np.random.RandomState(11)
    best = KMeans(12, init="random", n_init=6, random_state=rs).fit(X).inertia_
    assert best <= max(singles)
    many = KMeans(12, init="random", n_init=6, random_state=0).fit(X)
    firsts = KMeans(12, init="random", n_init=1, random_state=0).fit(X)
    assert many.inertia_ <= firsts.inertia_


@pytest.mark.parametrize("init", ["k-means++", "k-means||", "array"])
def test_sample_weight_equals_repeating_rows(init):
    X, _ = make_blobs(300, 5, centers=6, cluster_std=2.0, random_state=8)
    w = np.random.RandomState(9).randint(0, 4, size=300)
    X_rep = np.repeat(X, w, axis=0)
    start = same_init(X[w > 0], 6) if init == "array" else init
    weighted = KMeans(6, init=start, random_state=1).fit(X, sample_weight=w)
    repeated = KMeans(6, init=start, random_state=1).fit(X_rep)
    np.testing.assert_allclose(weighted.cluster_centers_, repeated.cluster_centers_, rtol=1e-12, atol=1e-12)
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-12)
    np.testing.assert_array_equal(weighted.predict(X_rep), repeated.labels_)


def test_unit_weights_equal_no_weights_bitwise():
    X, _ = make_blobs(500, 3, centers=4, random_state=10)
    a = KMeans(4, random_state=0).fit(X)
    b = KMeans(4, random_state=0).fit(X, sample_weight=np.ones(500))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


def test_cosine_is_spherical_kmeans():
    rng = np.random.RandomState(12)
    directions = rng.standard_normal((4, 10))
    X = np.repeat(directions, 50, axis=0) + 0.1 * rng.standard_normal((200, 10))
    X *= rng.uniform(0.1, 100, size=(200, 1))  # lengths must not matter
    km = KMeans(4, metric="cosine", random_state=0).fit(X)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, rtol=1e-12)
    d = cos_dists(X, km.cluster_centers_)
    assert (d[np.arange(200), km.labels_] - d.min(1) <= 1e-9).all()
    assert len(set(zip(np.repeat(np.arange(4), 50), km.labels_))) == 4  # each direction is one cluster
    assert km.inertia_ == pytest.approx(d.min(1).sum(), rel=1e-9)
    np.testing.assert_allclose(km.transform(X), d, atol=1e-9)


def test_empty_clusters_are_reseeded_deterministically():
    X = np.r_[np.zeros((50, 2)), np.ones((50, 2)) * 10, [[100.0, 100.0]]]
    init = np.array([[0.0, 0.0], [10.0, 10.0], [-500.0, -500.0]])  # the third starts empty
    km = KMeans(3, init=init).fit(X)
    assert sorted(np.bincount(km.labels_)) == [1, 50, 50]
    np.testing.assert_array_equal(km.cluster_centers_[2], [100.0, 100.0])  # the farthest point took it


def test_awkward_but_valid_input():
    dup = np.repeat([[1.0, 2.0], [3.0, 4.0]], 10, axis=0)
    with pytest.warns(ConvergenceWarning, match="distinct clusters"):
        km = KMeans(4, random_state=0).fit(dup)
    assert km.inertia_ == 0.0
    const = np.full((30, 3), 7.0)
    with pytest.warns(ConvergenceWarning):
        assert KMeans(2, random_state=0).fit(const).inertia_ == 0.0
    big = np.asfortranarray(np.random.RandomState(13).standard_normal((60, 8)))[::2, ::3]
    km = KMeans(3, random_state=0).fit(big)
    np.testing.assert_array_equal(km.predict(np.ascontiguousarray(big)), km.labels_)
    single = KMeans(1).fit([[1.0, 2.0]])
    np.testing.assert_array_equal(single.cluster_centers_, [[1.0, 2.0]])
    ints = KMeans(2, random_state=0).fit(np.arange(20).reshape(10, 2))
    assert ints.cluster_centers_.dtype == np.float64
    readonly = np.random.RandomState(14).standard_normal((40, 2))
    readonly.setflags(write=False)
    KMeans(2, random_state=0).fit(readonly)


def test_torch_input_and_outputs_follow_the_input_type():
    X = torch.randn(200, 4, generator=torch.Generator().manual_seed(15))
    km = KMeans(3, random_state=0).fit(X)
    pred = km.predict(X)
    assert torch.is_tensor(pred) and pred.dtype == torch.int64
    np.testing.assert_array_equal(pred.numpy(), km.labels_)
    t = km.transform(X)
    assert torch.is_tensor(t) and t.dtype == torch.float32 and t.shape == (200, 3)
    assert km.score(X) == pytest.approx(-km.inertia_, rel=1e-6)
    assert isinstance(km.predict(X.numpy()), np.ndarray)


def test_transform_fit_transform_score():
    X, _ = make_blobs(400, 6, centers=5, random_state=16)
    km = KMeans(5, random_state=0)
    d = km.fit_transform(X)
    np.testing.assert_allclose(d, np.sqrt(((X[:, None] - km.cluster_centers_[None]) ** 2).sum(-1)), rtol=1e-9)
    np.testing.assert_array_equal(d.argmin(1), km.labels_)
    assert km.score(X) == pytest.approx(-km.inertia_, rel=1e-9)
    np.testing.assert_array_equal(KMeans(5, random_state=0).fit_predict(X), km.labels_)


def test_history_and_verbose_bar(capsys):
    X, _ = make_blobs(500, 2, centers=4, random_state=17)
    km = KMeans(4, random_state=0, verbose=1).fit(X)
    err = capsys.readouterr().err
    assert "k-means run 1/1" in err and "inertia=" in err
    assert len(km.history_) == km.n_iter_
    h = km.history_
    assert h[0]["labels_changed"] == 500 and all(e["seconds"] >= 0 for e in h)
    assert all(a["inertia"] >= b["inertia"] - 1e-9 for a, b in zip(h, h[1:]))  # Lloyd never increases it


def test_plot_history_writes_png(tmp_path):
    from flashkm_dist.plotting import plot_history
    X, _ = make_blobs(300, 2, centers=3, random_state=18)
    km = KMeans(3, random_state=0).fit(X)
    out = tmp_path / "history.png"
    plot_history(km.history_, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pickle_and_save_load_roundtrip(tmp_path):
    X, _ = make_blobs(300, 3, centers=4, random_state=19)
    X = (X + 300).astype(np.float32)
    km = KMeans(4, random_state=0, init="k-means||").fit(X)
    again = pickle.loads(pickle.dumps(km))
    np.testing.assert_array_equal(again.predict(X), km.labels_)
    path = tmp_path / "model.npz"
    km.save(path)
    loaded = KMeans.load(path)
    np.testing.assert_array_equal(loaded.cluster_centers_, km.cluster_centers_)
    np.testing.assert_array_equal(loaded.predict(X), km.labels_)
    assert loaded.get_params() == km.get_params()
    assert (loaded.n_iter_, loaded.inertia_, loaded.history_) == (km.n_iter_, km.inertia_, km.history_)
    arr = KMeans(4, init=km.cluster_centers_).fit(X)
    arr.save(path)
    np.testing.assert_array_equal(KMeans.load(path).init, km.cluster_centers_)


def test_kmeans_parallel_init_finds_the_blobs():
    X, y = make_blobs(5000, 8, centers=30, cluster_std=0.5, center_box=(-50, 50), random_state=20)
    km = KMeans(30, init="k-means||", random_state=0).fit(X)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(y, km.labels_) > 0.95


def test_callable_init():
    X, _ = make_blobs(200, 2, centers=3, random_state=21)
    calls = []

    def first_rows(data, k, random_state):
        calls.append((data.shape, k))
        return data[:k]

    km = KMeans(3, init=first_rows, n_init=2).fit(X)
    assert calls == [((200, 2), 3)] * 2 and km.n_iter_ >= 1
