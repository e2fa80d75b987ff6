"""Bounded Lloyd steps: the lower bounds are bounds, a kept label is the exact one, and a bounded fit is a plain
fit to the bit (Triton kernels under the interpreter, and the reference twins)."""
import dataclasses

import numpy as np
import pytest
import torch

from flashkm_dist import KMeans
from flashkm_dist.engine import REFERENCE, backend_for, numerics_for
from flashkm_dist.kernels import bounds, reference
from flashkm_dist.kernels.assign import flash_assign
from flashkm_dist.lloyd import run_lloyd
from flashkm_dist.streaming import Block, Engine
from oracle import assert_labels_exact, sq_dists


def second_distance(x, c, labels):
    """float64 distance from each row to its nearest centroid other than its label (inf for K = 1)."""
    d = sq_dists(x, c)
    d[np.arange(len(x)), labels.numpy()] = np.inf
    return np.sqrt(d.min(axis=1))


def cases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 17, generator=g) * 3
    yield "random", x, x[:20] + 0.1
    yield "offset+300", x + 300, x[:20] + 300.05
    c = x[:16]
    yield "near-ties", torch.cat([(c[:8] + c[8:]) / 2, x[16:200]]), c  # rows half-way between two centres
    yield "D=1", x[:, :1], x[:7, :1] + 0.01
    yield "K=1", x, x[:1]
    yield "K=N", x[:40], x[:40] + 0.001
    yield "fp16 |x|^2 > 65504", x * 80, x[:20] * 80 + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [c[0] for c in cases()])
def test_lower_bounds_never_exceed_the_distance_to_the_second_centroid(case, dtype):
    _, x, c = next(item for item in cases() if item[0] == case)
    x, c = x.to(dtype), c.to(dtype)
    for name, fn in (("kernel", lambda: flash_assign(x, c, lower_bound=True)),
                     ("reference", lambda: reference.assign_lower(x, c))):
        labels, dist, lower = fn()
        assert_labels_exact(x.double().numpy(), c.double().numpy(), labels.numpy())
        second = second_distance(x.double().numpy(), c.double().numpy(), labels)
        low = lower.double().numpy()
        assert (low <= second).all(), (name, np.max(low - second))
        if c.shape[0] == 1:
            assert (low > 1e15).all(), name  # no other centroid: nothing bounds the row
        elif case != "near-ties":  # the bounds are tight where the margin is clear (flagged rows get 0)
            assert np.median(low / second) > 0.98, name


def test_a_cosine_lower_bound_is_refused():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="euclidean"):
        flash_assign(x, x[:3], metric="cosine", lower_bound=True)


def test_bounded_rows_kernel_matches_its_twin_and_keeps_only_exact_labels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 9, generator=g) * 2 + 40
    c = x[:25].clone()
    labels, _, lower = reference.assign_lower(x, c)
    labels[:10] = -1  # rows with no label yet
    lower[10:20] = 0.0  # rows with no bound
    moved = c + torch.randn(c.shape, generator=g) * 0.05
    drift = torch.linalg.vector_norm(moved.double() - c.double(), dim=1) * (1 + 1e-12)
    dec = torch.stack([torch.cat([drift[:j], drift[j + 1:]]).max() for j in range(len(drift))])
    got = bounds.bounded_rows(x, moved, labels, lower, dec)
    want = reference.bounded_rows(x, moved, labels, lower, dec)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    dist, new_lower, stale = got
    assert stale[:20].all()
    kept = ~stale
    assert 200 < int(kept.sum()) < 390  # small moves: most rows settled, not all
    truth = reference.assign(x, moved)
    assert torch.equal(labels[kept], truth[0][kept])
    assert torch.equal(dist[kept], truth[1][kept])
    second = second_distance(x.double().numpy(), moved.double().numpy(), truth[0])
    assert (new_lower.double().numpy()[kept.numpy()] <= second[kept.numpy()]).all()
    assert (new_lower[stale] == 0).all()


def test_a_neighbour_table_sharpens_the_bound_when_one_far_centroid_moves_a_lot():
    """One of 64 centroids jumps far: with the plain bound (the largest move among the others) every row is
    stale; with the new centroids' neighbour table (`neighbour_moves`) only rows near the jump are. Kernel and
    twin agree to the bit, kept labels are exact, and the kept bounds are bounds."""
    from flashkm_dist.kernels.neighbours import neighbour_table

    g = torch.Generator().manual_seed(6)
    centres = torch.randn(64, 6, generator=g) * 20
    x = centres[torch.randint(0, 64, (3000,), generator=g)] + torch.randn(3000, 6, generator=g)
    c = x[torch.randperm(3000, generator=g)[:64]].clone()
    labels, _, lower = reference.assign_lower(x, c)
    moved = c + torch.randn(c.shape, generator=g) * 0.01
    moved[7] += 30.0
    drift = torch.linalg.vector_norm(moved.double() - c.double(), dim=1) * (1 + 1e-12)
    dec = torch.stack([torch.cat([drift[:j], drift[j + 1:]]).max() for j in range(len(drift))])
    table = neighbour_table(moved)
    near = bounds.neighbour_moves(table.index[0], table.beyond[0], drift)
    plain = bounds.bounded_rows(x, moved, labels, lower, dec)
    got = bounds.bounded_rows(x, moved, labels, lower, dec, near)
    want = reference.bounded_rows(x, moved, labels, lower, dec, near)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    dist, new_lower, stale = got
    assert int((~plain[2]).sum()) < 300 < 1500 < int((~stale).sum())
    kept = ~stale
    truth = reference.assign(x, moved)
    assert torch.equal(labels[kept], truth[0][kept])
    second = second_distance(x.double().numpy(), moved.double().numpy(), truth[0])
    assert (new_lower.double().numpy()[kept.numpy()] <= second[kept.numpy()]).all()


def moved_centres(g, c, scale):
    moved = c + torch.randn(c.shape, generator=g) * scale
    drift = torch.linalg.vector_norm(moved.double() - c.double(), dim=1) * (1 + 1e-12)
    dec = torch.stack([torch.cat([drift[:j], drift[j + 1:]]).max() for j in range(len(drift))])
    return moved, drift, dec


@pytest.mark.parametrize("case", ["blobs", "near-ties", "offset", "K<M", "D=1", "far rows"])
def test_rows_the_bound_leaves_are_settled_exactly_from_the_neighbour_table(case):
    """Two centroids per blob move too far for Hamerly's test (most rows stale), as early in a fit: the new
    centroids' table settles the stale rows with their exact label and distance and a lower bound that holds
    (at least the row's own distance); the kernel equals its twin to the bit. Rows with no label stay stale (2),
    and so do rows far from every centroid (nearly equidistant from all: no centroid's list can settle them)."""
    from flashkm_dist.kernels.neighbours import neighbour_table

    g = torch.Generator().manual_seed(8)
    n, blobs_, d = 1500, 3 if case == "K<M" else 20, 1 if case == "D=1" else 7
    centres = torch.randn(blobs_, d, generator=g) * 10
    which = torch.randint(0, blobs_, (n,), generator=g)
    which[:2 * blobs_] = torch.arange(2 * blobs_) % blobs_
    x = centres[which] + torch.randn(n, d, generator=g)
    far = torch.zeros(n, dtype=torch.bool)
    if case == "far rows":
        far[-25:-5] = True
        x[far] = x.mean(dim=0) + 300 * torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=1)
    c = x[:2 * blobs_].clone()
    if case == "offset":
        x, c = x + 500, c + 500
    moved, drift, dec = moved_centres(g, c, 0.6)
    if case == "near-ties":  # rows half-way between two new centroids
        x[-20:] = (moved[:20] + moved[20:40]) / 2
    labels, _, lower = reference.assign_lower(x, c)
    labels[-5:] = -1
    table = neighbour_table(moved)
    near = bounds.neighbour_moves(table.index[0], table.beyond[0], drift)
    got = bounds.settle_rows(x, moved, labels, lower, dec, near, table)
    want = reference.settle_rows(x, moved, labels, lower, dec, near, table)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    new_labels, dist, new_lower, code = got
    plain = bounds.bounded_rows(x, moved, labels, lower, dec, near)
    assert torch.equal(code == 0, ~plain[2]) and (code[-5:] == 2).all()
    assert int((code[~far] == 1).sum()) > 2 * int((code[~far] == 0).sum())
    assert int((code[~far] == 2).sum()) <= 5 + (20 if case == "near-ties" else 0)
    assert (code[far] == 2).all()
    done = code < 2
    truth = reference.assign(x, moved)
    assert torch.equal(new_labels[done], truth[0][done]) and torch.equal(dist[done], truth[1][done])
    assert torch.equal(new_labels[~done], labels[~done]) and (new_lower[~done] == 0).all()
    second = second_distance(x.double().numpy(), moved.double().numpy(), truth[0])
    low, mask, by_table = new_lower.double().numpy(), done.numpy(), (code == 1).numpy()
    assert (low[mask] <= second[mask]).all()
    # at least the row's own distance: with no move, the next step's bound test keeps it
    assert (low[by_table] >= np.sqrt(dist.double().numpy()[by_table]) * (1 - 1e-6)).all()


def blobs(n=3000, k=12, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    x = centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g) + 50
    return x, x[torch.randperm(n, generator=g)[:k]].clone()


def fit(engine, blocks, init, nm):
    rescored = []
    step = engine.step

    def counted(*args, **kw):
        out = step(*args, **kw)
        rescored.append(out.rescored)
        return out

    engine.step = counted
    return run_lloyd(engine, blocks, init, nm, max_iter=60), rescored


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_bounded_fit_is_a_plain_fit_to_the_bit_with_fewer_rows_scored(backend, monkeypatch):
    monkeypatch.setenv("FLASHKM_TRITON", "1" if backend == "triton" else "0")
    x, init = blobs() if backend == "reference" else blobs(n=600, k=5, d=5)  # (the interpreter is slow)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    be = backend_for(torch.device("cpu"))
    assert be.name == backend
    plain, none = fit(Engine("cpu", backend=be), [Block(x)], init, nm)
    assert set(none) == {None}
    n = len(x)
    for chunk_rows, cuts in ((None, (n // 2,)), (n // 4, (n // 3, 2 * n // 3)))[1 if backend == "triton" else 0:]:
        blocks = [Block(x[a:b], key=i) for i, (a, b) in enumerate(zip((0, *cuts), (*cuts, len(x))))]
        got, rescored = fit(Engine("cpu", backend=be, chunk_rows=chunk_rows, bounds=True), blocks, init, nm)
        assert torch.equal(got.centers, plain.centers) and torch.equal(got.labels, plain.labels)
        assert got.inertia == plain.inertia and got.n_iter == plain.n_iter
        assert rescored[0] == len(x)  # no bounds yet: every row scored
        later = rescored[1:]
        assert later and sum(later) < 0.6 * n * len(later)  # most rows settled by their bounds


def test_bounds_are_dropped_on_an_out_of_memory_retry_and_on_a_new_run():
    x, init = blobs(n=800)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("injected")
        return REFERENCE.assign_lower(*args, **kw)

    engine = Engine("cpu", chunk_rows=200, bounds=True,
                    backend=REFERENCE.__class__(**{**REFERENCE.__dict__, "assign_lower": flaky}))
    first = engine.step([Block(x)], init, nm)
    assert first.rescored == 800  # 4 chunks; the 4th failed once, the retry scored every row again
    moved = init + 0.01
    second = engine.step([Block(x)], moved, nm)
    assert second.rescored < 800
    plain = Engine("cpu").step([Block(x)], moved, nm)
    assert torch.equal(second.partials.sums, plain.partials.sums) and torch.equal(second.inertia, plain.inertia)
    engine.forget_labels()
    assert engine.step([Block(x)], moved, nm).rescored == 800


def test_the_estimator_takes_hamerly_and_gives_lloyds_result():
    x, _ = blobs(n=1500, k=6)
    a = KMeans(6, random_state=0, algorithm="lloyd").fit(x.numpy())
    b = KMeans(6, random_state=0, algorithm="hamerly").fit(x.numpy())
    c = KMeans(6, random_state=0, algorithm="elkan").fit(x.numpy())
    for other in (b, c):
        assert np.array_equal(a.cluster_centers_, other.cluster_centers_)
        assert np.array_equal(a.labels_, other.labels_) and a.inertia_ == other.inertia_
    with pytest.raises(ValueError, match="algorithm must be one of"):
        KMeans(6, algorithm="full").fit(x.numpy())
    with pytest.raises(ValueError, match="euclidean"):
        KMeans(6, algorithm="hamerly", metric="cosine").fit(x.numpy())


def test_bounded_steps_over_converted_rows_score_copies_and_give_plain_bits():
    """Rows converted to the compute dtype (new tensors at every step, as streamed chunks are), over several
    blocks and chunks: partials, inertia, changed labels and labels match plain steps at every step."""
    x, init = blobs(n=1200, k=8)
    x64 = x.double()
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    plain, bounded = Engine("cpu", chunk_rows=250), Engine("cpu", chunk_rows=250, bounds=True)
    blocks = [Block(x64[:700], key=0), Block(x64[700:], key=1)]
    centers, scored = init, []
    for _ in range(6):
        a, b = plain.step(blocks, centers, nm), bounded.step(blocks, centers, nm)
        assert torch.equal(a.partials.sums, b.partials.sums) and torch.equal(a.partials.weights, b.partials.weights)
        assert torch.equal(a.inertia, b.inertia) and a.n_changed == b.n_changed
        scored.append(b.rescored)
        centers = reference.finalize(a.partials, dtype=torch.float32, previous=centers)[0]
    assert scored[0] == len(x) and min(scored[1:]) < len(x) // 2
    assert all(torch.equal(p, q) for p, q in zip(plain.labels(blocks), bounded.labels(blocks)))


def test_streamed_chunks_are_scored_whole_below_the_k_where_bounds_pay(monkeypatch):
    """Chunks that came through the staging buffers (marked `streamed`; only CUDA engines stream, so they are
    marked here) skip their bounds below STREAMED_BOUNDS_MIN_K: every row scored, no wait per chunk, the same
    bits; at or above it they use them like any other chunk."""
    import flashkm_dist.streaming as S

    x, init = blobs(n=800)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    chunks = S.Engine._chunks
    monkeypatch.setattr(S.Engine, "_chunks", lambda self, blocks: (
        dataclasses.replace(c, streamed=True) for c in chunks(self, blocks)))
    moved = init + 0.01
    plain = Engine("cpu").step([Block(x)], moved, nm)
    for min_k, whole in ((init.shape[0] + 1, True), (init.shape[0], False)):
        monkeypatch.setattr(S, "STREAMED_BOUNDS_MIN_K", min_k)
        engine = Engine("cpu", chunk_rows=200, bounds=True)
        engine.step([Block(x)], init, nm)
        second = engine.step([Block(x)], moved, nm)
        assert (second.rescored == 800) == whole
        assert torch.equal(second.partials.sums, plain.partials.sums) and torch.equal(second.inertia, plain.inertia)


def test_bounded_steps_read_the_rows_to_score_of_resident_chunks_in_batches(monkeypatch):
    """Chunks whose rows stay put (views of a block here; cached rows on a GPU) wait in batches of BOUND_BATCH for
    their numbers of rows to score: 14 chunks, 4 waits (each after the next batch's tests were queued, the last
    one for a partial batch); the same bits as plain steps, fewer rows scored."""
    import flashkm_dist.streaming as S

    x, init = blobs(n=800)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    waits = []
    settle = S.Engine._settle
    monkeypatch.setattr(S.Engine, "_settle", lambda self, batch, *a: (waits.append(len(batch)) if batch else None,
                                                                      settle(self, batch, *a))[1])
    moved = init + 0.01
    engine = Engine("cpu", chunk_rows=60, bounds=True)
    engine.step([Block(x[:750]), Block(x[750:])], init, nm)
    assert waits == []  # (no bounds yet: every chunk scored whole, none waits)
    second = engine.step([Block(x[:750]), Block(x[750:])], moved, nm)
    assert waits == [4, 4, 4, 2] and second.rescored < 800
    plain = Engine("cpu").step([Block(x)], moved, nm)
    assert torch.equal(second.partials.sums, plain.partials.sums) and torch.equal(second.inertia, plain.inertia)
