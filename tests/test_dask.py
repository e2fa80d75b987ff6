"""The distributed fit on a real `distributed.LocalCluster` (worker processes): same bits as in process."""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from distributed.diagnostics.plugin import SchedulerPlugin
from dask.utils import key_split
import torch
from sklearn.datasets import make_blobs

from flashkm_dist import KMeans
from flashkm_dist.dask import driver, handoff, latency, summed, worker
from flashkm_dist.dask.cluster import DaskShards
from flashkm_dist.dask.worker import StepResult
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.streaming import EngineStep

pytestmark = pytest.mark.timeout(300)


def _cluster(n_workers: int) -> LocalCluster:
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                        silence_logs=40)


@pytest.fixture(scope="module")
def client():
    with _cluster(3) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def blobs():
    X, _ = make_blobs(2400, 5, centers=9, cluster_std=2.5, random_state=3)
    return X


@contextlib.contextmanager
def iteration_hook(hook):
    """Run `hook(iteration)` after every iteration of the fits inside the block."""
    driver.ITERATION_HOOKS.append(hook)
    try:
        yield
    finally:
        driver.ITERATION_HOOKS.remove(hook)


def fit_interrupted_at(iteration: int, fit) -> None:
    """Call fit() and stop it by an exception after `iteration`, as a crashed client would stop."""
    class Interrupted(Exception):
        pass

    def crash(i):
        if i == iteration:
            raise Interrupted

    with iteration_hook(crash), pytest.raises(Interrupted):
        fit()


def assert_same_fit(a: KMeans, b: KMeans) -> None:
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.cluster_centers_.dtype == b.cluster_centers_.dtype
    assert a.inertia_ == b.inertia_ and a.n_iter_ == b.n_iter_
    def timeless(history):
        return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]

    assert timeless(a.history_) == timeless(b.history_)
    labels_a = a.labels_.compute() if hasattr(a.labels_, "compute") else a.labels_
    labels_b = b.labels_.compute() if hasattr(b.labels_, "compute") else b.labels_
    np.testing.assert_array_equal(labels_a, labels_b)


@pytest.mark.parametrize("init", ["k-means++", "k-means||", "random"])
def test_same_bits_as_in_process_for_every_init(client, blobs, init):
    params = dict(n_clusters=9, init=init, random_state=0, n_init=2)
    assert_same_fit(KMeans(**params).fit(da.from_array(blobs, chunks=500)), KMeans(**params).fit(blobs))


@pytest.mark.parametrize("chunks", [2400, 331, ((0, 1, 1000, 0, 1, 1398), (5,))])
def test_same_bits_for_any_chunking_weighted_and_float32(client, blobs, chunks):
    X = blobs.astype(np.float32)
    w = np.random.RandomState(1).randint(0, 4, size=len(X)).astype(np.float64)
    params = dict(n_clusters=9, init="k-means||", random_state=2, tol=0.0)
    ref = KMeans(**params).fit(X, sample_weight=w)
    got = KMeans(**params).fit(da.from_array(X, chunks=chunks), sample_weight=w)
    assert_same_fit(got, ref)
    assert got.cluster_centers_.dtype == np.float32


@pytest.mark.parametrize("allreduce", ["dask", "chained"])
def test_bounded_steps_on_the_workers_give_lloyds_bits(client, blobs, allreduce):
    """algorithm='hamerly' on the workers (bounds kept by each worker's engine) against plain Lloyd in process,
    from centres that leave two clusters empty (re-seeding moves them, which the bounds must follow)."""
    init = blobs[:9].copy()
    init[2], init[6] = 1e4, -1e4
    params = dict(n_clusters=9, init=init, max_iter=50, tol=0.0)
    ref = KMeans(**params).fit(blobs)
    got = KMeans(**params, algorithm="hamerly", allreduce=allreduce).fit(da.from_array(blobs, chunks=500))
    assert_same_fit(got, ref)


def test_cosine_and_empty_cluster_reseeding_match(client, blobs):
    init = blobs[:9].copy()
    init[2], init[6] = 1e4, -1e4  # two centres that no point picks: the re-seeding path
    for metric in ["euclidean", "cosine"]:
        params = dict(n_clusters=9, init=init, metric=metric, max_iter=50)
        ref = KMeans(**params).fit(blobs)
        assert_same_fit(KMeans(**params).fit(da.from_array(blobs, chunks=700)), ref)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_same_bits_on_one_and_two_workers(blobs, n_workers):
    params = dict(n_clusters=9, init="k-means++", random_state=5, max_iter=20)
    ref = KMeans(**params).fit(blobs)
    with _cluster(n_workers) as cluster, Client(cluster) as c:
        assert_same_fit(KMeans(**params).fit(da.from_array(blobs, chunks=300), client=c), ref)


def test_worker_killed_mid_fit_gives_the_same_bits(client, blobs):
    X, _ = make_blobs(3000, 4, centers=30, cluster_std=4.0, random_state=9)  # many iterations
    params = dict(n_clusters=30, init="random", n_init=1, random_state=4, tol=0.0, max_iter=40)
    ref = KMeans(**params).fit(X)
    assert ref.n_iter_ > 4
    pids = client.run(os.getpid)
    killed = []

    def kill(iteration):
        """Kill the holder of the oldest reduction still in memory (iteration 1's centres): recomputing it goes
        back through iteration 1's steps to the run's first centres, which must be recomputable too."""
        if iteration == 2 and not killed:
            reductions = sorted((int(str(k).split("-")[2]), ws[0]) for k, ws in client.who_has().items()
                                if str(k).startswith("flashkm-reduce") and ws)
            os.kill(pids[reductions[0][1] if reductions else sorted(pids)[-1]], signal.SIGKILL)
            killed.append(iteration)

    # a slow restart on a busy machine must not make LocalCluster retire the worker's nanny (15 s by default)
    with iteration_hook(kill), dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}):
        got = KMeans(**params, allreduce="dask").fit(da.from_array(X, chunks=250))
    assert killed == [2]
    assert_same_fit(got, ref)
    client.wait_for_workers(3, timeout=60)


class _Recomputed(SchedulerPlugin):
    """Counts step and reduce tasks computed again after their result was lost (in the scheduler)."""
    name = "flashkm-test-recomputed"

    def __init__(self):
        self.done, self.n = set(), 0

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory" and str(key).startswith(("flashkm-step-", "flashkm-reduce-")):
            self.n += key in self.done
            self.done.add(key)


@pytest.mark.parametrize("allreduce", ["dask", "chained"])
def test_anchors_bound_what_a_lost_worker_recomputes(client, monkeypatch, allreduce):
    """With an anchor every iteration, losing the worker that holds the newest step at iteration 8 recomputes at
    most two tasks, not the run so far (without anchors: 25 to 29 in runs here), and the fit gives the same bits."""
    monkeypatch.setattr(driver, "ANCHOR_EVERY_S", 0.0)
    X, _ = make_blobs(3000, 4, centers=30, cluster_std=4.0, random_state=9)
    params = dict(n_clusters=30, init="random", n_init=1, random_state=4, tol=0.0, max_iter=20)
    ref = KMeans(**params).fit(X)
    assert ref.n_iter_ == 20
    pids, killed = client.run(os.getpid), []

    def kill(iteration):
        if iteration == 8 and not killed:
            held = sorted((int(str(k).split("-")[2]), ws[0]) for k, ws in client.who_has().items()
                          if str(k).startswith("flashkm-step") and ws)
            os.kill(pids[held[-1][1]], signal.SIGKILL)
            killed.append(iteration)

    client.register_plugin(_Recomputed())
    try:
        with iteration_hook(kill), dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}):
            got = KMeans(**params, allreduce=allreduce).fit(da.from_array(X, chunks=250))
        recomputed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[_Recomputed.name].n)
    finally:
        client.unregister_scheduler_plugin(_Recomputed.name)
    assert killed == [8]
    assert_same_fit(got, ref)
    assert recomputed <= 2
    client.wait_for_workers(3, timeout=60)


@pytest.mark.parametrize("allreduce, fetched_unpushed", [("chained", 90), ("dask", 60)])
def test_results_are_pushed_to_the_workers_that_take_them(client, allreduce, fetched_unpushed):
    """Steps and reductions hand their results to the workers that take them next the moment they are in memory,
    so those find them local: few fetches (2 to 8 in runs here), where results that wait to be fetched cost
    `fetched_unpushed` (measured here), and the same bits."""
    X, _ = make_blobs(30000, 8, centers=30, cluster_std=4.0, random_state=9)
    params = dict(n_clusters=30, init="random", n_init=1, random_state=4, tol=0.0, max_iter=15)
    with get_task_stream(client) as stream:
        got = KMeans(**params, allreduce=allreduce).fit(da.from_array(X, chunks=2500))
    assert_same_fit(got, KMeans(**params).fit(X))
    tasks = [t for t in stream.data if key_split(t["key"]) in ("flashkm-step", "flashkm-reduce")]
    fetched = sum(s["action"] == "transfer" for t in tasks for s in t["startstops"])
    steps = [t for t in tasks if key_split(t["key"]) == "flashkm-step"]
    assert len({t["worker"] for t in steps}) == 3 and len(steps) >= 3 * 15 and fetched <= fetched_unpushed // 2


def test_blocks_stay_where_they_are(client, blobs):
    """A Dask array not yet computed is persisted and placed where its blocks land: one step per worker."""
    with get_task_stream(client) as stream:
        KMeans(9, random_state=0, max_iter=3).fit(da.from_array(blobs, chunks=200))
    workers = {t["worker"] for t in stream.data if key_split(t["key"]) == "flashkm-step"}
    assert len(workers) == 3


def test_chained_steps_give_the_same_bits_reseed_and_survive_a_lost_worker(client, blobs):
    """allreduce='chained' (one task per worker and iteration, no reduction task): the same bits as in-process
    with n_init=2, through empty-cluster re-seeding (euclidean and cosine), and with a worker killed mid-fit."""
    params = dict(n_clusters=9, init="k-means++", random_state=0, n_init=2)
    with get_task_stream(client) as stream:
        got = KMeans(**params, allreduce="chained").fit(da.from_array(blobs, chunks=500))
    assert_same_fit(got, KMeans(**params).fit(blobs))
    names = {key_split(t["key"]) for t in stream.data}
    assert "flashkm-step" in names and not names & {"flashkm-reduce", "flashkm-scalars"}
    init = blobs[:9].copy()
    init[2], init[6] = 1e4, -1e4
    for metric in ["euclidean", "cosine"]:
        params = dict(n_clusters=9, init=init, metric=metric, max_iter=50)
        got = KMeans(**params, allreduce="chained").fit(da.from_array(blobs, chunks=700))
        assert_same_fit(got, KMeans(**params).fit(blobs))
    X, _ = make_blobs(3000, 4, centers=30, cluster_std=4.0, random_state=9)
    params = dict(n_clusters=30, init="random", n_init=1, random_state=4, tol=0.0, max_iter=40)
    ref = KMeans(**params).fit(X)
    pids, killed = client.run(os.getpid), []

    def kill(iteration):
        if iteration == 2 and not killed:
            os.kill(pids[sorted(pids)[-1]], signal.SIGKILL)
            killed.append(iteration)

    with iteration_hook(kill), dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}):
        got = KMeans(**params, allreduce="chained").fit(da.from_array(X, chunks=250))
    assert killed == [2] and ref.n_iter_ > 4
    assert_same_fit(got, ref)
    client.wait_for_workers(3, timeout=60)


def _checkpoint_case(tmp_path, n_init: int):
    """Rows, checkpoint path, parameters and the uninterrupted in-process fit shared by the resume tests."""
    X, _ = make_blobs(3000, 4, centers=30, cluster_std=4.0, random_state=9)
    params = dict(n_clusters=30, init="k-means||", n_init=n_init, random_state=7, tol=0.0, max_iter=40)
    return X, tmp_path / "fit.npz", params, KMeans(**params).fit(X)


def _interrupt_at_3(X, path, params, client):
    fit_interrupted_at(3, lambda: KMeans(**params, checkpoint=path).fit(da.from_array(X, chunks=400), client=client))


def test_checkpoint_resume_on_a_new_client_reaches_the_same_bits(blobs, tmp_path):
    X, path, params, ref = _checkpoint_case(tmp_path, n_init=2)

    with _cluster(2) as cluster, Client(cluster) as c:
        _interrupt_at_3(X, path, params, c)
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".flashkm-")]
    with _cluster(3) as cluster, Client(cluster) as c:
        resumed = KMeans(**params, checkpoint=path, resume=True).fit(da.from_array(X, chunks=700), client=c)
        assert_same_fit(resumed, ref)
        finished = KMeans(**params, checkpoint=path, resume=True).fit(da.from_array(X, chunks=700), client=c)
        assert_same_fit(finished, ref)  # a finished checkpoint returns the fit without iterating
        with pytest.raises(ValueError, match="different fit.*n_clusters"):
            KMeans(**{**params, "n_clusters": 29}, checkpoint=path, resume=True).fit(
                da.from_array(X, chunks=700), client=c)


def test_outputs_are_lazy_with_the_input_chunks(client, blobs):
    X = da.from_array(blobs, chunks=(700, 5))
    km = KMeans(9, random_state=0).fit(X)
    ref = KMeans(9, random_state=0).fit(blobs)
    for lazy in (km.labels_, km.predict(X), km.fit_predict(X)):
        assert isinstance(lazy, da.Array) and lazy.chunks == (X.chunks[0],) and lazy.dtype == np.int64
        np.testing.assert_array_equal(lazy.compute(), ref.labels_)
    dist = km.transform(X)
    assert isinstance(dist, da.Array) and dist.chunks == (X.chunks[0], (9,))
    np.testing.assert_array_equal(dist.compute(), ref.transform(blobs))
    assert km.score(X) == pytest.approx(ref.score(blobs), rel=1e-12)
    assert isinstance(km.cluster_centers_, np.ndarray)


def test_task_names_on_the_dashboard_and_the_automatic_reduction(client, blobs, monkeypatch):
    """Readable task names; allreduce='auto' chains the steps on up to CHAIN_MAX_WORKERS workers of one host
    (no reduction task), and reduces with tasks beyond."""
    names = {}
    for allreduce, most in [("dask", 4), ("auto", 4), ("auto", 2)]:
        monkeypatch.setattr("flashkm_dist.dask.cluster.CHAIN_MAX_WORKERS", most)
        with get_task_stream(client) as stream:
            KMeans(9, random_state=0, max_iter=3, allreduce=allreduce).fit(da.from_array(blobs, chunks=600))
        names[allreduce, most] = {key_split(t["key"]) for t in stream.data}
    assert {"flashkm-step", "flashkm-reduce", "flashkm-scalars"} <= names["dask", 4]
    assert "flashkm-step" in names["auto", 4] and not names["auto", 4] & {"flashkm-reduce", "flashkm-scalars"}
    assert {"flashkm-step", "flashkm-reduce", "flashkm-scalars"} <= names["auto", 2]  # 3 workers > 2


def test_edges_tiny_chunks_more_workers_than_blocks_unknown_sizes(client, blobs):
    ref = KMeans(3, random_state=0).fit(blobs[:10])
    one_block = da.from_array(blobs[:10], chunks=10)  # 1 block, 3 workers
    assert_same_fit(KMeans(3, random_state=0).fit(one_block), ref)
    ones = da.from_array(blobs[:10], chunks=1)  # 1-row chunks
    assert_same_fit(KMeans(3, random_state=0).fit(ones), ref)
    unknown = da.from_array(blobs[:10], chunks=4)
    unknown = unknown[unknown[:, 0] > -np.inf]  # boolean indexing: chunk sizes unknown (nan)
    assert np.isnan(unknown.shape[0])
    assert_same_fit(KMeans(3, random_state=0).fit(unknown), ref)


def test_clear_errors(client, blobs):
    X = da.from_array(blobs, chunks=600)
    with pytest.raises(ValueError, match="n_samples=2400 should be >= n_clusters=3000"):
        KMeans(3000).fit(X)
    with pytest.raises(ValueError, match="non-negative"):
        KMeans(3).fit(X, sample_weight=-np.ones(len(blobs)))
    with pytest.raises(ValueError, match="one entry per sample"):
        KMeans(3).fit(X, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match="NaN or infinity"):
        KMeans(3).fit(da.from_array(np.full((10, 2), np.nan), chunks=5))
    with pytest.raises(ValueError, match="2-D"):
        KMeans(3).fit(da.ones(10, chunks=5))
    with pytest.raises(RuntimeError, match="has no CUDA device"):
        KMeans(3, device="cuda").fit(X)
    km = KMeans(3, random_state=0).fit(X)
    with pytest.raises(ValueError, match="expecting 5 features"):
        km.predict(da.ones((4, 3), chunks=2))
    with pytest.raises(ValueError, match="checkpoint/resume apply to fits of Dask arrays"):
        KMeans(3, checkpoint="x.npz").fit(blobs)


def test_no_client_is_a_clear_error():
    code = "import dask.array as da; from flashkm_dist import KMeans; KMeans(2).fit(da.ones((4, 2), chunks=2))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs a distributed.Client" in done.stderr


@pytest.mark.parametrize("init", ["k-means||", "array-with-empty"])
def test_collective_allreduce_gives_the_same_bits(client, blobs, init):
    """allreduce='nccl' runs the torch.distributed collective path (Gloo between these CPU workers)."""
    start = init
    if init == "array-with-empty":
        start = blobs[:9].copy()
        start[4] = 1e4  # an empty cluster: re-seeded through the all-gather of farthest rows
    params = dict(n_clusters=9, init=start, random_state=0, n_init=1, max_iter=40)
    ref = KMeans(**params).fit(blobs)
    got = KMeans(**params, allreduce="nccl").fit(da.from_array(blobs, chunks=500))
    assert_same_fit(got, ref)
    again = KMeans(**params, allreduce="nccl").fit(da.from_array(blobs, chunks=333))  # the group is re-made
    assert_same_fit(again, ref)
    with pytest.raises(ValueError, match="allreduce must be"):
        KMeans(3, allreduce="mpi").fit(da.from_array(blobs, chunks=500))


def test_collective_resumes_a_checkpoint_and_writes_its_own(blobs, tmp_path):
    X, path, params, ref = _checkpoint_case(tmp_path, n_init=1)

    with _cluster(2) as cluster, Client(cluster) as c:
        _interrupt_at_3(X, path, params, c)
        resumed = KMeans(**params, checkpoint=path, resume=True, allreduce="nccl").fit(
            da.from_array(X, chunks=700), client=c)
        assert_same_fit(resumed, ref)
        again = KMeans(**params, checkpoint=path, resume=True, allreduce="nccl").fit(
            da.from_array(X, chunks=700), client=c)  # the collective run wrote the finished state
        assert_same_fit(again, ref)


def test_message_batching_is_shorter_during_a_fit_and_put_back_after(client, blobs):
    def intervals():
        on_scheduler = client.run_on_scheduler(
            lambda dask_scheduler: sorted({b.interval for b in dask_scheduler.stream_comms.values()}))
        return on_scheduler, sorted(set(client.run(lambda dask_worker: dask_worker.batched_stream.interval).values()))

    before, during = intervals(), []
    with iteration_hook(lambda i: during.append(intervals()) if i == 1 else None):
        KMeans(4, random_state=0, max_iter=3).fit(da.from_array(blobs, chunks=800))
    assert during == [([latency.INTERVAL_S], [latency.INTERVAL_S])]
    assert intervals() == before != during[0]


def test_message_batching_is_put_back_only_on_live_workers(client, monkeypatch):
    """A worker lost during the fit is not asked to put its batching back (it would wait out the connect
    timeout, 30 s, at the end of the fit)."""
    asked = []
    run = client.run

    def recording(fn, *args, workers=None, **kwargs):
        asked.extend(workers or [])
        return run(fn, *args, workers=workers, **kwargs)

    tightened = latency.Tightened(client).__enter__()
    tightened.workers["tcp://127.0.0.1:9"] = latency.INTERVAL_S  # a worker that has gone
    monkeypatch.setattr(client, "run", recording)
    tightened.__exit__(None, None, None)
    assert asked and "tcp://127.0.0.1:9" not in asked and set(asked) <= set(client.nthreads())


@pytest.mark.parametrize("reducers", [None, 3])
def test_one_reducer_per_host_or_a_reduce_scatter_give_the_same_bits(client, blobs, monkeypatch, reducers):
    """By default the workers of one host share one reducer; `reducers=3` cuts the clusters over three."""
    monkeypatch.setattr(DaskShards, "reducers", reducers)
    params = dict(n_clusters=9, init="k-means++", random_state=0, max_iter=30)
    with get_task_stream(client) as stream:
        got = KMeans(**params, allreduce="dask").fit(da.from_array(blobs, chunks=400))
    assert_same_fit(got, KMeans(**params).fit(blobs))
    parts = {int(str(r["key"]).split("-")[3]) for r in stream.data if str(r["key"]).startswith("flashkm-reduce-")}
    assert parts == ({0} if reducers is None else {0, 1, 2})


@pytest.mark.parametrize("where", ["host", "device", "export"])
def test_a_step_result_keeps_its_partials_for_a_local_reducer_and_ships_numpy(where):
    """A step whose reducer is in the same worker keeps its partials as they are (no copy); sent to another
    process (pickled, as Dask does), it carries NumPy arrays with the same values either way. The device
    hand-off applies to device arrays only: host partials asked to be exported go as NumPy."""
    sums = fp.split(torch.arange(-60, 60, dtype=torch.int64).reshape(12, 10) * (1 << 40))
    scale = fp.FixedPointScale.from_bounds(1.0, 1.0, 1.0)
    engine_step = EngineStep(reference.Partials(sums, torch.ones(2, 12, dtype=torch.int64), scale),
                             torch.tensor([3, 4]), 7, 0.5)
    step = StepResult.of(engine_step, where, token="t")
    assert step.where == ("device" if where == "device" else "host") and step.lease is None
    assert all(isinstance(getattr(step, n), np.ndarray) == (where != "device") for n in StepResult.ARRAYS)
    sent = pickle.loads(pickle.dumps(step))
    assert all(isinstance(getattr(sent, n), np.ndarray) for n in StepResult.ARRAYS)
    np.testing.assert_array_equal(sent.sums, fp.join(sums).numpy())
    np.testing.assert_array_equal(sent.weights, np.ones((2, 12)))
    assert (sent.n_changed, sent.seconds) == (7, 0.5)
    rows = worker.rows_of(step, 2, 5)
    assert rows.where == step.where
    np.testing.assert_array_equal(np.asarray(rows.sums), fp.join(sums)[2:5].numpy())


def test_the_device_hand_off_is_chosen_only_when_workers_can_open_each_others_gpu_buffers(client):
    """CPU workers (and a single worker) keep the socket path; the probe cleans up after itself."""
    workers = sorted(client.nthreads())
    assert not handoff.probe(client, workers)
    assert not handoff.probe(client, workers[:1])
    assert client.run(lambda: (len(handoff._FREE), len(handoff._EXPORTED), len(handoff._OPENED))) == {
        a: (0, 0, 0) for a in workers}


@pytest.mark.parametrize("empty, limbs", [(False, False), (True, False), (False, True)])
def test_the_summed_vector_update_gives_the_reducers_bits(empty, limbs):
    """Chained steps on a GPU sum the partials into one vector and replay the update (`summed`); a reducer sums
    them one by one (`worker._new_centres`). Same centres, inertia, counts and shift, bit for bit, also with an
    empty cluster (it keeps its centre), and with a step whose sums came as limbs (too large to join)."""
    gen = torch.Generator().manual_seed(0)
    scale = fp.FixedPointScale.from_bounds(256.0, 64.0, 64.0)
    numerics = worker.FitNumerics("euclidean", None, scale, 1.0)
    k, d = 7, 3
    centers = torch.randn(k, d, generator=gen).to(torch.float32)
    steps = []
    for j, n in enumerate((40, 25, 31)):
        x, labels = torch.randn(n, d, generator=gen), torch.randint(0, k, (n,), generator=gen)
        if empty:
            labels[labels == 4] = 0
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, labels, x.double())
        weights = torch.bincount(labels, minlength=k).double()
        partials = reference.Partials(fp.quantize(sums, scale.sum_exp), fp.quantize(weights, scale.weight_exp),
                                      scale)
        inertia = fp.exact_sum(torch.rand(n, generator=gen), scale.dist_exp)
        where = ("host", "device", "host")[j]
        steps.append(StepResult.of(EngineStep(partials, inertia, 3 + j, 0.25 * j), where))
    if limbs:  # (as `StepResult.of` leaves sums that might not fit in int64)
        steps[1].sums = fp.split(torch.as_tensor(steps[1].sums))
    new, out = worker._summed_update(worker.summed.GraphedUpdate(numerics), centers, steps)
    ref_new, ref = worker._new_centres(numerics, centers, steps, None)
    assert torch.equal(new, ref_new) and out["n_empty"] == ref["n_empty"] == int(empty)
    assert out["shift"] == worker._shift("euclidean", ref_new, centers)
    assert (out["inertia"], out["n_changed"]) == (ref["inertia"], ref["n_changed"]) == (ref["inertia"], 12)
    assert out["slowest_worker_seconds"] == ref["slowest_worker_seconds"] == 0.5


def test_counters_made_on_the_device_and_one_read_back_match_the_host_ones():
    """The collective path queues a whole iteration before its one wait (`kernels.clock`): the labels changed and
    the step's time from its two clock stamps make the same vector tail as the host's counters, and the step's
    pending values come back with the scalars in the same read."""
    from flashkm_dist.kernels import clock
    ticks = torch.tensor([1_000, 251_000_000 + 1_000])
    assert torch.equal(summed.device_counters(torch.tensor(7), ticks, 2, 4), summed.counters(7, 0.251, 2, 4))
    packed = torch.cat([torch.tensor([1, 7, 251_000_000]).view(torch.float64), torch.tensor([3.5, 0.25],
                                                                                            dtype=torch.float64)])
    scalars = {"n_empty": 1, "n_changed": 7, "slowest_worker_seconds": 0.251, "inertia": 3.5, "shift": 0.25}
    assert summed.read(packed) == scalars
    host, copied = summed.copy_to_host(packed, torch.tensor([7, 0, 2]))
    assert copied is None and summed.unpack(host) == (scalars, [7, 0, 2])
    assert not clock.available(torch.device("cpu"))  # (CPU steps are timed on the host, synchronously)


def test_a_queued_step_is_read_back_once_and_hands_over_joined_sums_or_limbs():
    """`worker.queue_step` queues a GPU step with its hand-over; `QueuedStep.finish` then reads the labels changed,
    the join's check and the clock stamps at once. Exact joined sums go out as they are; sums too large to join
    go out as limbs, the same integers."""
    scale = fp.FixedPointScale.from_bounds(256.0, 64.0, 64.0)
    sums = fp.quantize(torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                       scale.sum_exp)
    partials = reference.Partials(sums, fp.quantize(torch.ones(5, dtype=torch.float64), scale.weight_exp), scale)
    inertia = fp.exact_sum(torch.rand(5, dtype=torch.float64), scale.dist_exp)
    ticks = torch.tensor([1_000, 250_001_000])
    joined, fits = fp.join_unchecked(sums)
    step = EngineStep(partials, inertia, None, changed=torch.tensor(4))
    got = worker.QueuedStep(step, ticks, fits, "lease", [joined, partials.weights, inertia], "fit", None).finish()
    assert (got.n_changed, got.seconds, got.lease) == (4, 0.25, "lease") and bool(fits)
    assert torch.equal(got.sums, fp.join(sums)) and got.centers is None
    huge = fp.normalize(sums) + torch.tensor(1 << 40) * torch.tensor([1, 0]).view(2, 1, 1)  # hi limbs >= 2**40
    big = EngineStep(reference.Partials(huge, partials.weights, scale), inertia, None, changed=torch.tensor(2))
    _, fits = fp.join_unchecked(huge)
    limbs = worker.QueuedStep(big, ticks, fits, "lease", [], "fit", None).finish()
    assert (limbs.n_changed, limbs.seconds, limbs.lease, bool(fits)) == (2, 0.25, None, False)
    assert np.array_equal(limbs.sums, huge.numpy())


def test_a_buffer_whose_result_outlives_its_fit_is_freed_and_the_fit_forgotten():
    """A leased hand-off buffer whose result Dask drops only after the fit ended (`handoff.free` ran) is freed
    then, and the fit leaves no entry behind in the worker's registry."""
    freed = []

    class Buffer:
        token, nbytes = "ended-fit", 16

        def free(self):
            freed.append(self)

    held, pooled = Buffer(), Buffer()
    handoff._EXPORTED["ended-fit"] = [held, pooled]
    handoff._FREE[("ended-fit", 16)] = [pooled]
    try:
        assert handoff.free("ended-fit") == 1 and freed == [pooled]
        assert handoff._EXPORTED["ended-fit"] == [held]  # still leased by a live result
        handoff._give_back(held)  # the result died
        assert freed == [pooled, held] and "ended-fit" not in handoff._EXPORTED
    finally:
        handoff._CLOSED.discard("ended-fit")
        handoff._EXPORTED.pop("ended-fit", None)
