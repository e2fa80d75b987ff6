"""The per-device engine: bitwise-identical partials for any chunking and split, labels kept, OOM back-off."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from flashkm_dist.engine import Backend, exact_inertia, numerics_for
from flashkm_dist.kernels import reference
from flashkm_dist.streaming import (CACHED_CHUNK_FACTOR, Block, Engine, _Chunk, cached_chunks, cached_prefix,
                                   interleaved, pass_order, spread)


def whole_step(x, c, nm, w=None):
    """One Lloyd step over all rows at once with the reference kernels: what every chunking must reproduce."""
    labels, dist = reference.assign(x, c, metric=nm.metric, shift=nm.shift)
    return (reference.partial_sums(x, labels, c.shape[0], w, scale=nm.scale), exact_inertia(dist, w, nm), labels,
            dist)


def problem(n=500, d=7, k=9, seed=0):
    rng = np.random.RandomState(seed)
    x = (rng.standard_normal((n, d)) * 3 + 100).astype(np.float32)
    w = rng.uniform(0, 2, n)
    c = torch.as_tensor(x[rng.choice(n, k, replace=False)])
    return x, w, c


def split(x, w, cuts):
    edges = [0, *cuts, len(x)]
    return [Block(x[a:b], None if w is None else torch.as_tensor(w[a:b]), key=("blk", i))
            for i, (a, b) in enumerate(zip(edges, edges[1:]))]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_same_bits_for_any_chunk_size_and_split(weighted, metric):
    x, w, c = problem()
    w = w if weighted else None
    xt = torch.as_tensor(x)
    xm = xt if metric == "euclidean" else reference.unit_rows(xt).float()
    wt = None if w is None else torch.as_tensor(w)
    nm = numerics_for(xm, wt, metric=metric)
    cm = c if metric == "euclidean" else reference.unit_rows(c).float()
    whole_partials, whole_inertia, whole_labels, _ = whole_step(xm, cm, nm, wt)
    for chunk_rows, cuts in [(None, []), (1, [250]), (37, [1, 2, 499]), (64, [100, 100, 300]), (500, [7])]:
        engine = Engine("cpu", chunk_rows=chunk_rows, unit_rows=metric == "cosine")
        got = engine.step(split(x, w, cuts), cm, nm)
        assert torch.equal(got.partials.sums, whole_partials.sums)
        assert torch.equal(got.partials.weights, whole_partials.weights)
        assert torch.equal(got.inertia, whole_inertia)
        assert got.n_changed == len(x)
        labels = torch.cat([torch.as_tensor(l) for l in engine.labels(split(x, w, cuts))])
        assert torch.equal(labels, whole_labels)
        again = engine.step(split(x, w, cuts), cm, nm)
        assert again.n_changed == 0


def test_labels_changed_are_counted_per_block():
    x, _, c = problem()
    nm = numerics_for(torch.as_tensor(x), None, metric="euclidean")
    engine = Engine("cpu", chunk_rows=50)
    blocks = split(x, None, [200])
    engine.step(blocks, c, nm)
    moved = c.clone()
    moved[0] += 50.0
    expected = int((reference.assign(torch.as_tensor(x), moved, shift=nm.shift)[0]
                    != reference.assign(torch.as_tensor(x), c, shift=nm.shift)[0]).sum())
    assert engine.step(blocks, moved, nm).n_changed == expected > 0


def test_a_step_that_does_not_wait_settles_to_the_same_result_and_raises_there():
    """wait=False reads nothing back: the counts and the kernels' checks arrive with the caller's read-back."""
    x, w, c = problem()
    nm = numerics_for(torch.as_tensor(x), torch.as_tensor(w), metric="euclidean")
    blocks = split(x, w, [120])
    waited = Engine("cpu", chunk_rows=64).step(blocks, c, nm)
    lazy = Engine("cpu", chunk_rows=64).step(blocks, c, nm, wait=False)
    assert lazy.n_changed is None
    assert torch.equal(lazy.partials.sums, waited.partials.sums) and torch.equal(lazy.inertia, waited.inertia)
    assert lazy.settle(lazy.pending().tolist()).n_changed == waited.n_changed == len(x)
    tight = replace(nm, scale=replace(nm.scale, sum_exp=nm.scale.sum_exp + 20))  # rows off the grid
    bad = Engine("cpu").step(blocks, c, tight, wait=False)
    with pytest.raises(OverflowError, match="fixed-point range"):
        bad.settle()


def test_out_of_memory_halves_the_chunk_and_gives_the_same_bits():
    x, w, c = problem()
    nm = numerics_for(torch.as_tensor(x), torch.as_tensor(w), metric="euclidean")
    sizes = []

    def assign(chunk, centroids, **kw):
        sizes.append(chunk.shape[0])
        if chunk.shape[0] > 60:
            raise torch.OutOfMemoryError("injected: chunk too large")
        return reference.assign(chunk, centroids, **kw)

    flaky = Backend("flaky", assign, reference.partial_sums)
    engine = Engine("cpu", backend=flaky, chunk_rows=500)
    got = engine.step(split(x, w, []), c, nm)
    clean = Engine("cpu").step(split(x, w, []), c, nm)
    assert engine.chunk_rows == 31 and max(sizes[-17:]) <= 60  # 500 -> 250 -> 125 -> 62 -> 31
    assert torch.equal(got.partials.sums, clean.partials.sums) and torch.equal(got.inertia, clean.inertia)

    def always(chunk, centroids, **kw):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError, match="one-row chunks"):
        Engine("cpu", backend=Backend("oom", always, reference.partial_sums), chunk_rows=4).step(
            split(x, w, []), c, nm)


def test_labels_changed_are_counted_once_across_an_out_of_memory_retry():
    """A back-off in the middle of a step reruns it after the chunks already done stored their new labels: their
    changes still count (from the failed attempt), once, so the count equals that of a step without failure."""
    x, w, c = problem()
    nm = numerics_for(torch.as_tensor(x), torch.as_tensor(w), metric="euclidean")
    fail = {"at": None, "calls": 0}

    def assign(chunk, centroids, **kw):
        fail["calls"] += 1
        if fail["calls"] == fail["at"]:
            raise torch.OutOfMemoryError("injected: the fourth chunk of the second step")
        return reference.assign(chunk, centroids, **kw)

    engine = Engine("cpu", backend=Backend("flaky", assign, reference.partial_sums), chunk_rows=100)
    clean = Engine("cpu", chunk_rows=100)
    moved = c + 0.7
    for centers in (c, moved):
        fail["at"], fail["calls"] = (4 if centers is moved else None), 0
        got, want = engine.step(split(x, w, []), centers, nm), clean.step(split(x, w, []), centers, nm)
        assert got.n_changed == want.n_changed > 0
        assert torch.equal(got.partials.sums, want.partials.sums)
    assert engine.chunk_rows == 50 and fail["calls"] > 5  # (it did back off, after three chunks)


def test_a_step_over_many_chunks_holds_no_chunks_partials():
    """The step adds each chunk's partials into its running total: by the time a chunk is summed, the partials of
    the chunks two or more before it are gone (device memory stays two K x D arrays, not one per chunk)."""
    import gc
    import weakref

    x, _, c = problem()
    made, alive_at_call = [], []

    def partial_sums(*args, **kw):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in made[:-1]))
        part = reference.partial_sums(*args, **kw)
        made.append(weakref.ref(part.sums))
        return part

    nm = numerics_for(torch.as_tensor(x), None, metric="euclidean")
    step = Engine("cpu", backend=Backend("spy", reference.assign, partial_sums), chunk_rows=100).step(
        [Block(x)], c, nm)
    whole = Engine("cpu").step([Block(x)], c, nm)
    assert len(made) == 5 and alive_at_call == [0, 0, 0, 0, 0]
    assert torch.equal(step.partials.sums, whole.partials.sums) and torch.equal(step.inertia, whole.inertia)


def test_cached_rows_are_served_in_whole_chunks_of_fixed_places():
    """The pass that fills the cache streams everything; later passes serve the whole staging chunks inside the
    cache (all rows when all are cached) in CACHED_CHUNK_FACTOR-wide chunks at fixed starts, then stream the rest."""
    assert cached_prefix(1000, 300, 1000, filling=True) == 0
    assert cached_prefix(1000, 300, 1000, filling=False) == 1000  # (the short last chunk too)
    assert cached_prefix(1000, 300, 700, filling=False) == 600  # (the chunk across the cache's end is streamed)
    assert cached_prefix(1000, 300, 0, filling=False) == 0
    size = 300 * CACHED_CHUNK_FACTOR
    plan = cached_chunks(5 * size + 7, 300)
    assert plan[0] == (0, size) and plan[-1] == (5 * size, 5 * size + 7)
    assert all(b == c for (_, b), (c, _) in zip(plan, plan[1:]))
    assert cached_chunks(0, 300) == []


def test_labels_of_cached_rows_stay_on_the_device_and_come_back_on_request():
    """Cached rows keep their labels in a device copy (no transfer per step): counted against the labels the
    host tensor had, then against their own; `labels()` returns them in the host tensor."""
    x, _, c = problem(n=40)
    block = Block(x, key="b")
    engine = Engine("cpu")
    engine._cache[("b", torch.float32)] = torch.as_tensor(x[:24])
    old = torch.arange(40) % 3
    engine._labels["b"] = old.clone()
    new = (torch.arange(24) + 1) % 3  # every cached row moves
    assert int(engine._remember([block], _Chunk(0, 0, torch.as_tensor(x[:24]), None, cached=True), new)) == 24
    assert torch.equal(engine._labels["b"], old)  # (the host tensor is left alone until asked)
    assert int(engine._remember([block], _Chunk(0, 0, torch.as_tensor(x[:24]), None, cached=True), new)) == 0
    assert int(engine._remember([block], _Chunk(0, 24, torch.as_tensor(x[24:]), None), old[24:])) == 0
    assert torch.equal(engine.labels([block])[0], torch.cat([new, old[24:]]))
    engine.forget_labels()
    assert not engine._device_labels and not engine.has_labels([block])


def test_rows_cached_past_the_last_cached_chunk_keep_the_labels_their_streamed_chunk_gave():
    """A cache entry that ends inside a staging chunk: that chunk is streamed, so its rows' labels live on the
    host; the device copy of the cached rows' labels covers only the rows cached chunks serve, and `labels()`
    does not write stale values over the streamed ones."""
    x, _, c = problem(n=40)
    block = Block(x, key="b")
    engine = Engine("cpu")
    engine._cache[("b", torch.float32)] = torch.as_tensor(x[:30])
    engine._cached_end["b"] = 24
    old = torch.arange(40) % 3
    engine._labels["b"] = old.clone()
    engine._remember([block], _Chunk(0, 0, torch.as_tensor(x[:24]), None, cached=True), (old[:24] + 1) % 3)
    streamed = (old[24:] + 2) % 3
    engine._remember([block], _Chunk(0, 24, torch.as_tensor(x[24:]), None), streamed)
    assert engine._device_labels["b"].shape[0] == 24
    assert torch.equal(engine.labels([block])[0], torch.cat([(old[:24] + 1) % 3, streamed]))


def test_cached_chunks_are_spread_between_streamed_ones():
    assert interleaved(4, 4) == [1, 1, 1, 1]  # (one first: the kernels need not wait for the first copy)
    assert interleaved(10, 3) == [3, 2, 3]  # (and two after the last streamed chunk)
    assert interleaved(2, 5) == [1, 0, 0, 1, 0]
    assert interleaved(5, 0) == [] and interleaved(0, 3) == [0, 0, 0]
    for cached, streamed in ((58, 125), (7, 2), (1, 1)):
        shares = interleaved(cached, streamed)
        assert len(shares) == streamed and 0 <= cached - sum(shares) <= cached // (streamed + 1) + 1


def test_a_pass_spreads_every_blocks_cached_and_skipped_chunks_between_all_streamed_ones():
    """One pass over host blocks: a fully cached block's chunks are scored while another block's rows are being
    copied (block by block, the copy stream idled through the first and the kernels waited through the second)."""
    assert spread([1, 2, 3], ["a"]) == [1, 2, "a", 3] and spread([], ["a", "b"]) == ["a", "b"]
    assert spread([1, 2], []) == [1, 2]
    counts = [(3, 0, 0), (3, 0, 0), (1, 0, 2), (0, 0, 4)]  # (cached, skipped, streamed): two cached blocks
    order = pass_order(counts)
    assert sorted(order) == sorted((kind, b, i) for b, c in enumerate(counts)
                                   for kind, n in zip(("cached", "skipped", "streamed"), c) for i in range(n))
    streamed = [j for j, (kind, *_) in enumerate(order) if kind == "streamed"]
    assert [order[j][1:] for j in streamed] == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (3, 3)]  # (in order)
    assert [b - a - 1 for a, b in zip([-1, *streamed], streamed)] == [1] * 6 and len(order) == 13  # (1 after)
    for kind in ("cached", "streamed"):  # (each block's chunks of one kind in their order)
        for b in range(4):
            assert [i for k, bb, i in order if k == kind and bb == b] == list(range(counts[b][("cached", "skipped",
                                                                                              "streamed").index(kind)]))
    skipping = pass_order([(4, 0, 0), (2, 3, 0), (0, 3, 0)])  # a skipping step: reads spread between scoring
    kinds = "".join(kind[1] for kind, *_ in skipping)  # (a: cached, k: skipped)
    assert kinds.count("k") == 6 and "kk" not in kinds


def test_host_rows_are_used_in_place_without_copies():
    x, _, c = problem()
    base, end = x.ctypes.data, x.ctypes.data + x.nbytes
    seen = []

    def assign(chunk, centroids, **kw):
        seen.append(chunk.data_ptr())
        return reference.assign(chunk, centroids, **kw)

    nm = numerics_for(torch.as_tensor(x), None, metric="euclidean")
    Engine("cpu", backend=Backend("spy", assign, reference.partial_sums), chunk_rows=100).step(
        [Block(x)], c, nm)
    assert len(seen) == 5 and all(base <= p < end for p in seen)


def test_farthest_matches_the_in_process_reseeding_choice():
    x, w, c = problem(seed=3)
    xt, wt = torch.as_tensor(x), torch.as_tensor(w)
    wt[::3] = 0.0
    nm = numerics_for(xt, wt, metric="euclidean")
    partials, _, labels, min_dist = whole_step(xt, c, nm, wt)
    empty_partials = reference.Partials(partials.sums.clone(), partials.weights.clone(), nm.scale)
    empty_partials.weights[:, :4] = 0  # pretend four clusters are empty
    dist = torch.where(wt > 0, min_dist.double(), torch.full_like(wt, -1.0))
    far = torch.sort(dist, descending=True, stable=True).indices[:4]  # farthest, ties to the lowest index
    moved = reference.move_points(empty_partials, reference.weighted_rows(xt[far], wt[far]), wt[far],
                                  labels[far], torch.arange(4))
    found = Engine("cpu", chunk_rows=33).farthest(split(x, wt.numpy(), [123, 400]), c, nm, 4)
    assert torch.equal(found.position, far)
    direct = reference.move_points(empty_partials, found.rows, found.weights, found.labels, torch.arange(4))
    assert torch.equal(direct.sums, moved.sums) and torch.equal(direct.weights, moved.weights)


def test_steps_keep_candidates_for_empty_clusters_and_save_the_second_pass(monkeypatch):
    """The first FIRST_STEPS steps of a run, and any step after which `farthest` was asked for n rows, keep
    candidates (FIRST_STEPS_KEPT, or 2n) from their own distances; a `farthest` right after such a step for its
    centroids and blocks returns the rows a full pass finds, without one (more rows than kept, or other centroids:
    a pass); later steps after which none was asked for keep none."""
    import flashkm_dist.streaming as S

    monkeypatch.setattr(S, "FIRST_STEPS_KEPT", 6)
    x, w, c = problem(seed=3)
    wt = torch.as_tensor(w)
    wt[::3] = 0.0
    nm = numerics_for(torch.as_tensor(x), wt, metric="euclidean")
    blocks = split(x, wt.numpy(), [123, 400])
    fresh = {n: Engine("cpu", chunk_rows=33).farthest(blocks, c, nm, n) for n in (4, 20)}
    passes = []
    chunks = Engine._chunks
    monkeypatch.setattr(Engine, "_chunks", lambda self, b: (passes.append(1), chunks(self, b))[1])

    def farthest(engine, n, centres=c):
        before = len(passes)
        found = engine.farthest(blocks, centres, nm, n)
        return found, len(passes) - before

    def same(a, b):
        return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("dist", "position", "rows", "weights", "labels"))

    engine = Engine("cpu", chunk_rows=33)
    engine.step(blocks, c, nm)  # (the run's first step: 6 kept)
    found, n_passes = farthest(engine, 4)
    assert n_passes == 0 and same(found, fresh[4])
    for _ in range(S.FIRST_STEPS):
        engine.step(blocks, c, nm)  # (asked for 4 after each: 8 kept)
        found, n_passes = farthest(engine, 4)
        assert n_passes == 0 and same(found, fresh[4])
    found, n_passes = farthest(engine, 20)
    assert n_passes == 1 and same(found, fresh[20])
    assert farthest(engine, 4, c + 1.0)[1] == 1
    engine.step(blocks, c, nm)
    assert engine._far is not None and engine._far[2] == 40
    engine.step(blocks, c, nm)
    assert engine._far is None
    engine.forget_labels()  # (a new run: its first steps keep candidates again)
    engine.step(blocks, c, nm)
    assert engine._far is not None and engine._far[2] == 6


def test_bad_block_is_named():
    _, _, c = problem()
    nm = numerics_for(c, None, metric="euclidean")
    with pytest.raises(ValueError, match="block 0 must be 2-D"):
        Engine("cpu").step([Block(np.zeros(5, dtype=np.float32))], c, nm)


def test_a_block_that_comes_back_to_a_shard_is_not_counted_against_its_old_labels():
    """A block that leaves a worker and later returns (workers lost or joined) still has labels from an older
    step there; the label-change count must come from the step before, as on a shard that never lost it."""
    from flashkm_dist.shard import Shard
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(40, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    blocks = [Block(r, None, key=i) for i, r in enumerate(rows)]
    nm = numerics_for(torch.cat(rows), None, metric="euclidean")
    steps = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    moving = Shard(Engine(torch.device("cpu"), dtype=torch.float64))
    moving.step(blocks, steps[0], nm, "v0")
    moving.step(blocks[1:], steps[1], nm, "v1", "v0", steps[0])  # block 0 is elsewhere for this step
    got = moving.step(blocks, steps[2], nm, "v2", "v1", steps[1])  # ... and back
    steady = Shard(Engine(torch.device("cpu"), dtype=torch.float64))
    steady.step(blocks, steps[1], nm, "v1")
    want = steady.step(blocks, steps[2], nm, "v2", "v1", steps[1])
    assert got.n_changed == want.n_changed


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_fit_numerics_travel_with_tasks_cheaply_and_unchanged(metric):
    """Every Dask task of a fit carries the fit's numerics, and the scheduler pickles each task it sends: they
    pickle with the shift as bytes, not as a torch tensor (some twenty times cheaper both ways), and come back
    equal."""
    import pickle
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 3.0
    nm = numerics_for(x, None, metric=metric)
    back = pickle.loads(pickle.dumps(nm, protocol=5))
    assert (back.metric, back.scale, back.mean_variance) == (nm.metric, nm.scale, nm.mean_variance)
    if metric == "cosine":
        assert nm.shift is None and back.shift is None
    else:
        assert back.shift.dtype == nm.shift.dtype and torch.equal(back.shift, nm.shift)
        assert b"torch._utils" not in pickle.dumps(nm, protocol=5)
