"""FlashAssign's neighbour tier (kernels/neighbours.py) under the Triton interpreter: the table's bounds, the tier
against its reference twin, and FlashAssign with the tier equal to FlashAssign without it, to the bit."""

import copy

import pytest
import torch
from oracle import assert_labels_exact

from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import neighbours as N
from flashkm_dist.kernels import reference


def gen(seed):
    return torch.Generator().manual_seed(seed)


def shared_blobs(seed, n, k, d, per_blob=4, spread=0.3, offset=0.0, dtype=torch.float32):
    """Rows round k / per_blob blobs with per_blob centroids each, close together: the near ties of a fit started
    from random rows, where most flagged rows are near a tie with the few centroids of their own blob."""
    g = gen(seed)
    blobs = torch.randn(k // per_blob, d, generator=g) * 6 + offset
    c = blobs.repeat_interleave(per_blob, 0) + spread * torch.randn(k, d, generator=g)
    x = blobs[torch.randint(0, k // per_blob, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x.to(dtype), c.to(dtype)


@pytest.fixture
def tier_always(monkeypatch):
    """The tier for every call (the defaults keep it to large calls), with a fresh table each time."""
    monkeypatch.setattr(N, "MIN_CENTROIDS", 1)
    monkeypatch.setattr(N, "ROWS_PER_CENTROID", 0)
    N.forget()
    yield
    N.forget()


def true_distances(c):
    c = c.to(torch.float64)
    return ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1).sqrt()


@pytest.mark.parametrize("k,d,m,offset", [(40, 5, 16, 0.0), (40, 17, 8, 1e6), (7, 3, 16, 0.0), (1, 1, 16, 0.0)])
def test_table_bounds_hold(k, d, m, offset):
    """Listed: the centroid itself first (or tied first), lower bounds under the float64 distance, ascending;
    every centroid left out is at least `beyond` away; +inf beyond when all are listed."""
    g = gen(k + d)
    c = torch.randn(k, d, generator=g, dtype=torch.float64) + offset
    if k > 4:
        c[3] = c[2]  # a duplicate
    t = N.neighbour_table(c, m)
    true = true_distances(c)
    assert t.index.shape == (1, k, m) and t.low.dtype == torch.float64
    listed = min(m, k)
    idx, low = t.index[0, :, :listed].long(), t.low[0, :, :listed]
    assert (low <= true.gather(1, idx)).all()
    assert (low[:, 1:] >= low[:, :-1]).all()
    assert (low[:, 0] <= 0).all() and (true.gather(1, idx[:, :1]) == 0).all()
    assert (t.low[0, :, listed:] == float("inf")).all()
    for row in range(k):
        out = torch.ones(k, dtype=torch.bool)
        out[idx[row]] = False
        if k > m:
            assert float(true[row][out].min()) >= float(t.beyond[0, row])
        else:
            assert float(t.beyond[0, row]) == float("inf")
    if k > 4:  # the duplicate pair lists each other at (about) no distance
        assert 2 in idx[3].tolist() and 3 in idx[2].tolist()


def test_table_of_a_batch_with_a_nonfinite_centroid_settles_nothing_of_it():
    c = torch.randn(2, 20, 4, generator=gen(1))
    c[1, 5, 2] = float("nan")
    t = N.neighbour_table(c, 8)
    assert (t.beyond[1] == float("-inf")).all() and torch.isfinite(t.beyond[0]).all()


def run_tier(x, c, table):
    """The tier alone on every row, with the fast pass's labels and distances as its input."""
    p = A._prepare(x[None], c[None], "euclidean", None)
    fast = A._fast_pass(p)
    n = x.shape[0]
    before = copy.deepcopy(fast)
    fast.lists[0, 0, :n] = torch.arange(n, dtype=torch.int32)
    fast.counts[0, 0] = n
    N.settle_launch(p.x, p.c_dist, table, fast.labels, fast.min_dist, fast.lists[0], fast.counts, fast.lists[2],
                    4, p.cfg.epilogue_d, True, A._xb16(p.x))
    left = fast.lists[2, 0, :int(fast.counts[0, 3])].long()
    return before, fast, left


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 3, 17])
def test_tier_equals_its_twin(dtype, d):
    """Settled rows, labels and distances equal `reference.neighbour_settle`; the others are listed for the resolve
    pass, untouched."""
    x, c = shared_blobs(d, 120, 24, d, dtype=dtype)
    t = N.neighbour_table(c, 8)
    before, fast, left = run_tier(x, c, t)
    ok, lab, dist = reference.neighbour_settle(x, c, before.labels[0], before.min_dist[0], t.index[0], t.low[0],
                                               t.beyond[0])
    settled = torch.ones(x.shape[0], dtype=torch.bool)
    settled[left] = False
    assert torch.equal(settled, ok) and int(ok.sum()) > 0
    assert torch.equal(fast.labels[0], lab)
    torch.testing.assert_close(fast.min_dist[0], dist, rtol=1e-6, atol=0)
    assert torch.equal(fast.labels[0][~ok], before.labels[0][~ok])
    assert_labels_exact(x[ok].float(), c.float(), lab[ok], rel=1e-12)  # float64-exact labels


def test_tier_breaks_ties_to_the_lowest_index_and_leaves_far_rows():
    """Duplicated centroids: every row on them gets the lower index, whatever its fast label. Rows whose 2r
    reaches past the listed centroids go on to the resolve pass."""
    g = gen(3)
    c = torch.randn(32, 4, generator=g) * 5
    c[9] = c[20]
    c[20] = c[9]
    x = torch.cat([c[9] + 0.01 * torch.randn(10, 4, generator=g), 40 * torch.randn(10, 4, generator=g)])
    t = N.neighbour_table(c, 4)
    before, fast, left = run_tier(x, c, t)
    assert set(left.tolist()) >= set(range(10, 20)) - set(torch.nonzero(
        2 * before.min_dist[0, 10:].double().sqrt() < t.beyond[0, before.labels[0, 10:]]).flatten().add(10).tolist())
    assert (fast.labels[0, :10] == 9).all() and not (set(left.tolist()) & set(range(10)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 3e3])
def test_flash_assign_with_the_tier_equals_flash_assign_without_it(tier_always, monkeypatch, dtype, offset):
    """Labels and distances to the bit, with fewer rows for the resolve pass; labels exact. (Offset data: the
    table's bounds stay tight because it centres the centroids.)"""
    x, c = shared_blobs(5, 300, 32, 9, spread=0.1, offset=offset, dtype=dtype)
    p = A._prepare(x[None], c[None], "euclidean", None)
    fast = A._fast_pass(p)
    flagged = int(fast.counts[0, 0])
    assert flagged > 10
    with_tier = copy.deepcopy(fast)
    A._resolve(p, with_tier)
    monkeypatch.setattr(A, "NEIGHBOUR_TIER", False)
    without = copy.deepcopy(fast)
    A._resolve(p, without)
    assert torch.equal(with_tier.labels, without.labels)
    assert torch.equal(with_tier.min_dist, without.min_dist)
    assert int(with_tier.counts[0, 3]) < flagged // 2  # most near ties settled by the tier
    assert_labels_exact(x.float(), c.float(), with_tier.labels[0], rel=1e-12)


def test_batched_flash_assign_with_the_tier(tier_always):
    """B > 1: each batch reads its own table; one batch with a NaN centroid settles nothing by the tier."""
    xs, cs = zip(*(shared_blobs(s, 200, 16, 5) for s in range(3)))
    x, c = torch.stack(xs), torch.stack(cs)
    c[2, 7, 0] = float("nan")
    labels, dist = A.flash_assign(x, c)
    for b in range(2):
        assert_labels_exact(x[b], c[b], labels[b], rel=1e-12)
    N.forget()
    p = A._prepare(x, c, "euclidean", None)
    fast = A._fast_pass(p)
    A._resolve(p, fast)
    assert int(fast.counts[2, 3]) == int(fast.counts[2, 0]) > 0 and int(fast.counts[0, 3]) < int(fast.counts[0, 0])


def test_table_is_kept_for_the_same_centroids_only(monkeypatch):
    """One build per set of centroids: the same tensor again reuses it; a write into it, or another tensor,
    builds anew; calls too small for one build none."""
    monkeypatch.setattr(N, "MIN_CENTROIDS", 4)
    monkeypatch.setattr(N, "ROWS_PER_CENTROID", 10)
    N.forget()
    c = torch.randn(1, 8, 3, generator=gen(2))
    assert N.table_for(c, 79) is None
    t = N.table_for(c, 80)
    assert t is not None and N.table_for(c, 1) is t
    c.add_(1.0)
    assert N.table_for(c, 1) is None and N.table_for(c, 80) is not t
    assert N.table_for(c.clone(), 1) is None
    N.forget()


@pytest.mark.parametrize("bounds", [False, True])
def test_engine_steps_build_one_table_for_all_their_chunks(monkeypatch, bounds):
    """A Lloyd step over chunks too small for a table of their own builds one for the whole step (`prepare`), and
    every chunk uses it (bounded steps too, for the rows they score again): the same bits as steps without the
    tier, one build per set of centroids."""
    from flashkm_dist.engine import _triton_backend, numerics_for
    from flashkm_dist.lloyd import lloyd_iteration
    from flashkm_dist.streaming import Block, Engine

    monkeypatch.setattr(N, "MIN_CENTROIDS", 1)
    monkeypatch.setattr(N, "ROWS_PER_CENTROID", 20)  # the step's 600 rows: 25 per centroid; a chunk's 100: 4
    built = []
    build = N.neighbour_table
    monkeypatch.setattr(N, "neighbour_table", lambda c, m=N.NEIGHBOURS: built.append(1) or build(c, m))
    N.forget()
    x, c = shared_blobs(11, 600, 24, 6, spread=0.1)
    nm = numerics_for(x, None, metric="euclidean")
    fits = []
    for tier in (True, False):
        monkeypatch.setattr(A, "NEIGHBOUR_TIER", tier)
        engine = Engine("cpu", backend=_triton_backend(), chunk_rows=100, bounds=bounds)
        centers, its = c, []
        for _ in range(3):
            its.append(lloyd_iteration(engine, [Block(x)], centers, nm))
            centers = its[-1].centers
        fits.append((its, engine.labels([Block(x)])[0]))
        if tier:
            assert len(built) == 3
    (with_tier, labels1), (without, labels0) = fits
    assert torch.equal(labels1, labels0)
    for a, b in zip(with_tier, without):
        assert torch.equal(a.centers, b.centers) and a.inertia == b.inertia
    N.forget()
