"""Triton kernels (FlashAssign, sort-inverse update) on CPU under the Triton interpreter.

Checked against `kernels.reference` and a brute-force float64 NumPy oracle. Shapes are tiny: the interpreter
runs every tile op in NumPy. TRITON_INTERPRET=1 is set by tests/conftest.py before anything imports triton.
"""

import numpy as np
import pytest
import torch

from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.kernels.assign import fast_assign, flash_assign
from flashkm_dist.kernels.config import MAX_CHUNK_TILES, assign_config, update_config
from flashkm_dist.kernels.checks import DeferredChecks
from flashkm_dist.kernels.update import sort_inverse_update

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONTRACT = 1e-5  # DESIGN.md numerics contract
FLOAT64_EXACT = 1e-12  # what the kernels actually achieve (float64 re-check)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# oracle


def oracle_distances(x, c, metric="euclidean"):
    xn, cn = x.double().numpy(), c.double().numpy()
    if metric == "cosine":
        def unit(a):
            n = np.linalg.norm(a, axis=1, keepdims=True)
            return a / np.where(n > 0, n, 1.0)
        return 1.0 - unit(xn) @ unit(cn).T
    return ((xn[:, None, :] - cn[None, :, :]) ** 2).sum(-1)


def assert_exact(x, c, labels, min_dist=None, metric="euclidean"):
    """Labels exact per the contract (and in fact to float64 precision); min_dist = distance of the label."""
    assert labels.dtype == torch.int64 and labels.shape == x.shape[:1]
    d = oracle_distances(x, c, metric)
    lab = labels.numpy()
    assert ((lab >= 0) & (lab < c.shape[0])).all()
    rows = np.arange(x.shape[0])
    best = d.argmin(1)
    gap = d[rows, lab] - d[rows, best]
    if metric == "cosine":
        scale = np.ones(x.shape[0])
    else:
        xn, cn = x.double().numpy(), c.double().numpy()
        mu = xn.mean(0)
        scale = ((xn - mu) ** 2).sum(1) + ((cn[best] - mu) ** 2).sum(1)
    assert (gap <= CONTRACT * scale).all(), f"contract broken on {(gap > CONTRACT * scale).sum()} rows"
    assert (gap <= FLOAT64_EXACT * scale).all(), f"{(gap > FLOAT64_EXACT * scale).sum()} rows not float64-exact"
    if min_dist is not None:
        assert min_dist.dtype == torch.float32
        want = d[rows, lab]
        if metric == "cosine":
            want = np.clip(want, 0.0, 2.0)
        np.testing.assert_allclose(min_dist.double().numpy(), want.astype(np.float32), rtol=1e-6, atol=1e-30)


def assert_matches_reference(x, c, metric="euclidean", shift=None):
    labels, min_dist = flash_assign(x, c, metric=metric, shift=shift)
    ref_labels, ref_dist = reference.assign(x, c, metric=metric, shift=shift)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(min_dist, ref_dist, rtol=1e-6, atol=1e-30)
    return labels, min_dist


# ----------------------------------------------------------------------------------------------------------------
# assign


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 17, 200])
def test_assign_random_equals_reference_and_oracle(dtype, d):
    g = gen(d)
    x = torch.randn(150, d, generator=g).to(dtype)
    c = torch.randn(37, d, generator=g).to(dtype)  # 37: not a multiple of the centroid tile
    labels, min_dist = assert_matches_reference(x, c)
    assert_exact(x, c, labels, min_dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("offset", [300.0, 1e4])
def test_assign_far_from_origin(dtype, offset):
    g = gen(int(offset))
    x = (torch.randn(120, 17, generator=g) + offset).to(dtype)
    c = x[torch.randperm(120, generator=g)[:24]].clone()
    labels, min_dist = flash_assign(x, c)
    assert_exact(x, c, labels, min_dist)
    ref_labels, _ = reference.assign(x, c)
    d = oracle_distances(x, c)
    clear = np.sort(d, 1)[:, 1] - d.min(1) > 1e-9 * (1 + d.min(1))  # rows without a float64-level tie
    assert torch.equal(labels[clear], ref_labels[clear])


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_near_ties_are_resolved_exactly(dtype):
    g = gen(7)
    d, k = 17, 32
    c = torch.randn(k, d, generator=g)
    c[1::2] = c[0::2] + 0.05 * torch.randn(k // 2, d, generator=g)  # close pairs
    pair = torch.randint(0, k // 2, (160,), generator=g)
    ci, cj = c[2 * pair], c[2 * pair + 1]
    eps = 10.0 ** torch.empty(160).uniform_(-8, -3, generator=g)
    ortho = 0.01 * torch.randn(160, d, generator=g)
    x = 0.5 * (ci + cj) + ortho + eps[:, None] * (ci - cj)
    x, c = x.to(dtype), c.to(dtype)
    fast = fast_assign(x, c)
    assert bool(fast.flagged.any()), "near-ties should fall under the error bound"
    unflagged = ~fast.flagged[0]
    best = torch.from_numpy(oracle_distances(x, c).argmin(1))
    assert torch.equal(fast.labels[0][unflagged], best[unflagged])  # the bound is sound where it claims
    labels, min_dist = flash_assign(x, c)
    assert_exact(x, c, labels, min_dist)


def test_resolve_skipping_tiles_without_hits_changes_nothing():
    """The resolve pass skips the candidate work of a centroid tile where none of its rows has a hit: labels,
    distances and the tiers' counts equal those of the pass that does all of it, on rows flagged by near-ties
    spread over many tiles."""
    import copy
    import dataclasses

    from flashkm_dist.kernels import assign as A

    g = gen(8)
    d, k, n = 9, 200, 150
    c = torch.randn(k, d, generator=g)
    c[1::2] = c[0::2] + 0.05 * torch.randn(k // 2, d, generator=g)  # close pairs in every tile
    pair = torch.randint(0, k // 2, (n,), generator=g)
    eps = 10.0 ** torch.empty(n).uniform_(-8, -3, generator=g)
    x = 0.5 * (c[2 * pair] + c[2 * pair + 1]) + 0.01 * torch.randn(n, d, generator=g) \
        + eps[:, None] * (c[2 * pair] - c[2 * pair + 1])
    p = A._prepare(x[None], c[None], "euclidean", None)
    fast = A._fast_pass(p)
    assert int(fast.counts[0, 0]) > 10 and p.c_fast.shape[1] // p.cfg.resolve.block_k > 4
    out = []
    for quick in (True, False):
        p.cfg = dataclasses.replace(p.cfg, resolve=dataclasses.replace(p.cfg.resolve, quick=quick))
        f = copy.deepcopy(fast)
        A._resolve(p, f)
        out.append(f)
    for field in ("labels", "min_dist", "counts"):
        assert torch.equal(getattr(out[0], field), getattr(out[1], field)), field
    assert_exact(x, c, out[0].labels[0], out[0].min_dist[0])


def test_assign_batched_near_ties_resolved_per_batch():
    """Batched input with many flagged rows per batch (each batch's own list, different lengths): every batch's
    labels are exact, including rows the fast pass got wrong."""
    g = gen(23)
    d, k, n = 9, 24, 90
    xs, cs = [], []
    for b in range(3):
        c = torch.randn(k, d, generator=g)
        c[1::2] = c[0::2] + 0.05 * torch.randn(k // 2, d, generator=g)
        pair = torch.randint(0, k // 2, (n,), generator=g)
        ci, cj = c[2 * pair], c[2 * pair + 1]
        eps = 10.0 ** torch.empty(n).uniform_(-8, -3 + b, generator=g)
        x = 0.5 * (ci + cj) + 0.01 * torch.randn(n, d, generator=g) + eps[:, None] * (ci - cj)
        xs.append(x)
        cs.append(c)
    x, c = torch.stack(xs), torch.stack(cs)
    fast = fast_assign(x, c)
    assert int(fast.flagged.sum()) > 60 and len(set(fast.flagged.sum(1).tolist())) > 1
    labels, min_dist = flash_assign(x, c)
    wrong_before = 0
    for b in range(3):
        best = torch.from_numpy(oracle_distances(x[b], c[b]).argmin(1))
        wrong_before += int((fast.labels[b] != best).sum())
        assert_exact(x[b], c[b], labels[b], min_dist[b])
    assert wrong_before > 0  # the resolve pass had something to fix


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_exact_ties_go_to_lowest_index(dtype):
    g = gen(3)
    m = torch.randint(-8, 8, (60, 5), generator=g).float()
    v = torch.randint(-3, 4, (60, 5), generator=g).float()
    v[v.abs().sum(1) == 0, 0] = 1.0
    c = torch.cat([m + v, m - v])  # centroid i and i + 60 are mirror images around m[i]
    x = m.to(dtype)  # every row exactly equidistant from its two centroids (integers: exact in every dtype)
    c = c.to(dtype)
    labels, min_dist = flash_assign(x, c)
    best = torch.from_numpy(oracle_distances(x, c).argmin(1))  # numpy: first minimum
    assert torch.equal(labels, best)
    assert_exact(x, c, labels, min_dist)
    # the reference agrees once its own expansion is exact (shift 0 on integers); with the default
    # non-integer mean shift its float64 rounding may break these exact ties either way (within the contract)
    assert torch.equal(reference.assign(x, c, shift=torch.zeros(5))[0], best)


def test_assign_duplicate_centroids_take_lowest_index():
    g = gen(4)
    x = torch.randn(100, 6, generator=g)
    c = torch.randn(20, 6, generator=g)
    c[[7, 13, 19]] = c[2].clone()  # three copies of centroid 2 after it
    c[5] = c[11].clone()  # an earlier copy of a later centroid
    labels, min_dist = flash_assign(x, c)
    assert not bool(torch.isin(labels, torch.tensor([7, 13, 19, 11])).any())
    assert torch.equal(labels, torch.from_numpy(oracle_distances(x, c).argmin(1)))
    assert_exact(x, c, labels, min_dist)
    # (reference.assign may return a later copy: its float64 matmul can round identical columns differently)


def test_assign_resolution_tiers(monkeypatch):
    """Flagged rows go through the resolve pass: its candidate slots (at most two per centroid tile) settle a close
    pair, a float64 check of one whole centroid tile three copies of one centroid in that tile, and float64
    brute force a centroid present 13 times (wide hits in two tiles). Every path keeps the lowest index."""
    from flashkm_dist.kernels import assign as assign_module

    seen = []
    real_resolve = assign_module._resolve

    def resolve_spy(p, fast):
        real_resolve(p, fast)
        seen.append(fast.counts.sum(0).tolist())

    monkeypatch.setattr(assign_module, "_resolve", resolve_spy)
    g = gen(17)
    c = torch.randn(30, 6, generator=g)
    c[10:22] = c[3].clone()
    c[25] = c[24] + 1e-3 * torch.randn(6, generator=g)
    c[27] = c[26].clone()
    c[28] = c[26].clone()
    x = torch.cat([c[3] + 0.01 * torch.randn(20, 6, generator=g),
                   0.5 * (c[24] + c[25]) + 1e-7 * torch.randn(20, 6, generator=g),
                   c[26] + 0.01 * torch.randn(20, 6, generator=g),
                   torch.randn(40, 6, generator=g)])
    labels, min_dist = flash_assign(x, c)
    flagged, brute, widened, _ = seen[0]
    assert flagged >= 60 and widened >= 20 and brute >= 20 and flagged - widened - brute >= 20, seen
    assert not bool(((labels >= 10) & (labels < 22)).any())
    assert not bool(((labels == 27) | (labels == 28)).any())
    assert torch.equal(labels, torch.from_numpy(oracle_distances(x, c).argmin(1)))
    assert_exact(x, c, labels, min_dist)


def test_brute_force_tier_splits_the_centroids_and_keeps_the_first_minimum():
    """The last tier scores the centroids in ranges in parallel (`BRUTE_SPLITS`), then picks the lowest index
    among the centroids at the smallest score: a centroid duplicated across ranges, a minimum in the last range,
    and a tie at the same score in three ranges all keep the float64 argmin's lowest index."""
    import flashkm_dist.kernels.assign as assign_module
    g = gen(23)
    k, d = 70, 5  # interpreted tiles of 16 centroids: k_split 16, five ranges
    c = torch.randn(k, d, generator=g, dtype=torch.float64).float()
    c[50] = c[6]
    c[33], c[66] = c[17], c[17]
    x = torch.randn(40, d, generator=g)
    x[0], x[1], x[2] = c[50], c[69], c[33]
    p = assign_module._prepare(x[None], c[None], "euclidean", None)
    fast = assign_module._fast_pass(p)
    fast.lists[1, 0, :40] = torch.arange(40, dtype=torch.int32)
    fast.counts[0, 1] = 40
    assign_module._brute_launch(p, fast)
    d64 = oracle_distances(x, c)
    assert torch.equal(fast.labels[0], torch.from_numpy(d64.argmin(1)))
    assert fast.labels[0, :3].tolist() == [6, 69, 17]
    np.testing.assert_allclose(fast.min_dist[0].double().numpy(), d64.min(1), rtol=1e-6, atol=1e-6)


def test_assign_brute_force_tier_nan_and_cosine():
    """The last tier on its own: every row through float64 brute force (no usable bound), euclidean and cosine;
    a NaN row keeps centroid 0 and a NaN distance, a NaN centroid never wins."""
    from flashkm_dist.kernels import assign as assign_module

    g = gen(19)
    x = torch.randn(50, 7, generator=g)
    c = torch.randn(21, 7, generator=g)
    c[9] = c[4].clone()
    x[3] = c[4]
    c[11] = float("nan")
    x[5] = float("nan")
    for metric in ("euclidean", "cosine"):
        p = assign_module._prepare(x[None], c[None], metric, None)
        fast = assign_module._fast_pass(p)
        fast.lists[1, 0, :50] = torch.arange(50, dtype=torch.int32)
        fast.counts[0, 1] = 50
        assign_module._brute_launch(p, fast)
        labels, dist = fast.labels[0], fast.min_dist[0]
        assert int(labels[5]) == 0 and bool(torch.isnan(dist[5]))
        keep = torch.ones(50, dtype=torch.bool)
        keep[5] = False
        c_ok = c.clone()
        c_ok[11] = 0.0
        d = oracle_distances(x[keep], c_ok, metric)
        d[:, 11] = np.inf  # the NaN centroid
        assert torch.equal(labels[keep], torch.from_numpy(d.argmin(1)))
        assert int(labels[3]) == 4 and abs(float(dist[3])) < 1e-6
        want = d[np.arange(49), labels[keep].numpy()]
        np.testing.assert_allclose(dist[keep].double().numpy(), np.clip(want, 0, 2) if metric == "cosine" else want,
                                   rtol=1e-6, atol=1e-6)


def test_assign_k1_and_k_equals_n():
    g = gen(5)
    x = torch.randn(90, 9, generator=g)
    labels, min_dist = assert_matches_reference(x, x[:1].clone())
    assert bool((labels == 0).all())
    x[40] = x[10]  # a duplicated row: its own centroid ties with the earlier copy
    perm = torch.randperm(90, generator=g)
    labels, min_dist = assert_matches_reference(x, x[perm].clone())
    assert_exact(x, x[perm], labels, min_dist)
    assert bool((min_dist == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_assign_batched_one_launch(dtype):
    g = gen(6)
    x = (torch.randn(3, 70, 12, generator=g) + torch.tensor([0.0, 300.0, -50.0])[:, None, None]).to(dtype)
    c = torch.stack([xb[torch.randperm(70, generator=g)[:19]] for xb in x]).to(dtype)
    labels, min_dist = flash_assign(x, c)
    ref_labels, ref_dist = reference.assign(x, c)
    assert labels.shape == (3, 70) and min_dist.shape == (3, 70)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(min_dist, ref_dist, rtol=1e-6, atol=1e-30)
    for b in range(3):
        assert_exact(x[b], c[b], labels[b], min_dist[b])
    shift = x.double().mean(1)  # explicit (B, D) shift = the default
    labels2, _ = flash_assign(x, c, shift=shift)
    assert torch.equal(labels2, labels)


def test_assign_fp16_norms_beyond_fp16_range():
    g = gen(8)
    x = (200.0 * torch.rand(100, 17, generator=g) + 50.0).half()  # |x|^2 ~ 3e5 > 65504
    c = x[:30].clone()
    assert float((x.float() ** 2).sum(1).min()) > 65504
    labels, min_dist = assert_matches_reference(x, c)
    assert bool(torch.isfinite(min_dist).all())
    assert_exact(x, c, labels, min_dist)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's NumPy sees the fp16 overflow
def test_assign_rows_far_outside_the_centroids():
    """Rows whose scaled coordinates overflow fp16 in the fast pass are flagged and still exact."""
    g = gen(9)
    x = torch.randn(80, 8, generator=g)
    c = torch.randn(10, 8, generator=g)
    x[::7] *= 2e3  # still finite in fp16, but 1e5-fold beyond the centroids after scaling
    fast = fast_assign(x.half(), c.half())
    assert bool(fast.flagged[0, ::7].all())
    for dtype in (torch.float32, torch.float16):
        labels, min_dist = assert_matches_reference(x.to(dtype), c.to(dtype))
        assert_exact(x.to(dtype), c.to(dtype), labels, min_dist)


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_cosine(dtype):
    g = gen(10)
    x = torch.randn(130, 17, generator=g)
    x[5] = 0.0  # zero row: cosine 0 to everything -> lowest index
    x[6] = 1e3 * x[7]  # same direction, different norm
    c = torch.randn(23, 17, generator=g)
    x, c = x.to(dtype), c.to(dtype)
    labels, min_dist = assert_matches_reference(x, c, metric="cosine")
    assert int(labels[5]) == 0 and int(labels[6]) == int(labels[7])
    assert_exact(x, c, labels, min_dist, metric="cosine")


def test_assign_mixed_centroid_dtype_and_noncontiguous_x():
    g = gen(11)
    base = torch.randn(17, 90, generator=g).half()
    x = base.T  # non-contiguous rows
    c = torch.randn(25, 17, generator=g)  # fp32 centroids for fp16 data: rounded in the fast pass
    labels, min_dist = flash_assign(x, c)
    assert_exact(x, c, labels, min_dist)
    assert torch.equal(labels, reference.assign(x, c)[0])


def test_assign_far_shift_and_edge_shapes():
    g = gen(12)
    x = torch.randn(64, 5, generator=g)
    c = torch.randn(9, 5, generator=g)
    labels, _ = flash_assign(x, c, shift=torch.full((5,), 1e3))  # a bad shift costs re-checks, not exactness
    assert_exact(x, c, labels)
    empty_labels, empty_dist = flash_assign(x[:0], c)
    assert empty_labels.shape == (0,) and empty_dist.dtype == torch.float32
    labels64, dist64 = flash_assign(x.double(), c.double())  # float64: the reference itself
    assert torch.equal(labels64, reference.assign(x.double(), c.double())[0]) and dist64.dtype == torch.float64


def test_gpu_top2_reduction_matches(monkeypatch):
    """The GPU's one-pass top-2 reduction (a custom tl.reduce, slow in the interpreter: tiny shape here) gives
    the same stage-1 result as the interpreter's formulation."""
    from flashkm_dist.kernels import assign as assign_module

    g = gen(18)
    x = torch.randn(40, 6, generator=g)
    c = torch.randn(20, 6, generator=g)
    c[11] = c[4].clone()  # an exact tie inside the reduction
    plain = fast_assign(x, c)
    monkeypatch.setattr(assign_module, "_FORCE_TOP2_REDUCE", True)
    reduced = fast_assign(x, c)
    assert torch.equal(plain.labels, reduced.labels) and torch.equal(plain.flagged, reduced.flagged)
    assert torch.equal(plain.threshold, reduced.threshold)
    labels, min_dist = flash_assign(x, c)
    assert_exact(x, c, labels, min_dist)


def _stream_planes(x, c):
    """The portable streaming pass's planes on exact arithmetic (small integers, no shift: every score is the
    same fp32 number in any summation order), with what the twins need."""
    from flashkm_dist.kernels import assign as A

    p = A._prepare(x[None], c[None], "euclidean", torch.zeros(x.shape[1], dtype=torch.float64))
    A._prepare_rows(p)
    top, tile_k, key_low = A._stream(p)
    return A, p, top, tile_k, key_low


@pytest.mark.parametrize("k", [5, 40, 1100])  # one tile; one chunk of three tiles; three chunks (tile 16 here)
def test_slot_minima_and_class_pass_equal_their_twins(k):
    """Both passes give their torch twins' bits: ties everywhere (integer data), several tiles, several chunks."""
    g = gen(41)
    x = torch.randint(-4, 5, (70, 6), generator=g).float()
    c = torch.randint(-4, 5, (k, 6), generator=g).float()
    A, p, top, tile_k, key_low = _stream_planes(x, c)
    assert key_low == 2 + max(0, min(-(-k // tile_k), 32) - 1).bit_length()
    twin = reference.stream_slots(p.a_fast, p.rowstat, p.c_fast, p.cc, tile_k, key_low)
    assert torch.equal(top.view(torch.int32), twin.view(torch.int32))
    labels = top[2].view(torch.int32).view(1, -1).long()
    others = reference.class_minimum(p.a_fast, p.rowstat, p.c_fast, p.cc, labels, tile_k, key_low).view(-1)
    A._class_pass(p, top, tile_k, key_low)
    assert torch.equal(top[1], torch.minimum(twin[1], others))
    assert torch.equal(top[0::2].view(torch.int32), twin[0::2].view(torch.int32))  # (untouched)


def test_class_pass_gives_the_same_bits_for_any_segment_of_its_sort(monkeypatch):
    """The class pass sorts rows by class within segments of rows (so its scattered plane accesses stay in L2 on a
    GPU): tiny segments (many per batch, tiles of rows spanning several segments and classes, segments not
    dividing N) give every output the same bits as one segment per batch, batched too."""
    from flashkm_dist.kernels import assign as A

    g = gen(44)
    x = torch.randn(3, 150, 6, generator=g)
    c = x[:, :40].clone() + 0.01 * torch.randn(3, 40, 6, generator=g)
    whole = fast_assign(x, c)
    monkeypatch.setattr(A, "CLASS_SEGMENT_ROWS", 1)  # (segments of next_pow2(classes) rows)
    monkeypatch.setattr(A, "CLASS_SEGMENT_MIN_ROWS", 1)
    p = A._prepare(x, c, "euclidean", None)
    k_pad = p.c_fast.shape[1]
    classes = A.class_count(k_pad, p.cfg.block_k, A.key_bits(k_pad, p.cfg.block_k))
    assert 150 // A.class_segment_rows(classes) >= 3
    parts = fast_assign(x, c)
    for field in ("labels", "min_dist", "flag", "threshold", "counts"):
        assert torch.equal(getattr(parts, field), getattr(whole, field)), field
    assert_exact(x[1], c[1], *flash_assign(x[1], c[1]))


def test_near_ties_within_one_slot_are_caught_by_the_class_pass(monkeypatch):
    """Near-tied centroids in the same slot of different tiles (j and j + tile_k): the slot minima alone cannot
    see the second of them, the class pass does. Without it the margin test would pass wrong labels."""
    from flashkm_dist.kernels import assign as A

    g = gen(42)
    d, k, n = 7, 96, 200
    tile_k = assign_config("cpu", k, d, torch.float32).block_k
    c = 5.0 * torch.randn(k, d, generator=g)
    j = torch.randint(0, k - tile_k, (n,), generator=g)
    c[tile_k:] = c[:k - tile_k] + 0.05 * torch.randn(k - tile_k, d, generator=g)  # j + tile_k near j
    ci, cj = c[j], c[j + tile_k]
    eps = 10.0 ** torch.empty(n).uniform_(-8, -3, generator=g)
    x = 0.5 * (ci + cj) + 0.01 * torch.randn(n, d, generator=g) + eps[:, None] * (ci - cj)
    best = torch.from_numpy(oracle_distances(x, c).argmin(1))
    fast = fast_assign(x, c)
    assert torch.equal(fast.labels[0][~fast.flagged[0]], best[~fast.flagged[0]])
    assert_exact(x, c, *flash_assign(x, c))
    monkeypatch.setattr(A, "_class_pass", lambda p, top, tile_k, key_low: None)
    blind = fast_assign(x, c)
    assert int((blind.labels[0][~blind.flagged[0]] != best[~blind.flagged[0]]).sum()) > 0


def test_near_ties_across_chunks_need_no_class_pass():
    """Near-tied centroids in the same slot of different chunks (j and j + the chunk's width): each chunk's best
    key bounds its whole chunk, so the merged second covers them and the class stays inside the label's chunk."""
    from flashkm_dist.kernels import assign as A

    g = gen(43)
    d, n = 5, 120
    tile_k = assign_config("cpu", 1100, d, torch.float32).block_k
    width = tile_k * MAX_CHUNK_TILES
    k = 2 * width + 3
    c = 5.0 * torch.randn(k, d, generator=g)
    c[width:2 * width] = c[:width] + 0.05 * torch.randn(width, d, generator=g)  # j + width near j
    j = torch.randint(0, width, (n,), generator=g)
    ci, cj = c[j], c[j + width]
    eps = 10.0 ** torch.empty(n).uniform_(-8, -3, generator=g)
    x = 0.5 * (ci + cj) + 0.01 * torch.randn(n, d, generator=g) + eps[:, None] * (ci - cj)
    best = torch.from_numpy(oracle_distances(x, c).argmin(1))
    _, p, top, tile_k, key_low = _stream_planes(x, c)
    assert A.class_count(p.c_fast.shape[1], tile_k, key_low) == 3 * (tile_k // 4)
    fast = fast_assign(x, c)
    assert int(fast.flagged.sum()) > 0  # (the near-ties reach the margin test)
    assert torch.equal(fast.labels[0][~fast.flagged[0]], best[~fast.flagged[0]])
    assert_exact(x, c, *flash_assign(x, c))


def test_prepared_rows_are_kept_across_calls_and_redone_when_they_may_differ():
    """`PreparedRows`: the same results as fresh rows for new centroids; the row pass is skipped while x, the
    shift and the scale stay (shown by a poisoned buffer surviving), and redone after a write into x, a change of
    scale, or for another tensor."""
    from flashkm_dist.kernels import assign as A

    g = gen(44)
    x = torch.randn(200, 12, generator=g)
    c = x[:30].clone()
    shift = x.double().mean(0)

    def fresh(x, c):
        p = A._prepare(x[None], c[None], "euclidean", shift)
        return p, A._fast_pass(p)

    def kept(x, c, rows):
        p = A._prepare(x[None], c[None], "euclidean", shift)
        return p, A._fast_pass(p, rows)

    def same(a, b):
        (pa, fa), (pb, fb) = a, b
        n = pa.x.shape[1]
        assert torch.equal(pa.a_fast[:, :n], pb.a_fast[:, :n]) and torch.equal(pa.rowstat[:, :n], pb.rowstat[:, :n])
        for field in ("labels", "min_dist", "flag", "threshold"):
            assert torch.equal(getattr(fa, field), getattr(fb, field)), field

    rows = A.PreparedRows()
    same(kept(x, c, rows), fresh(x, c))
    c2 = c + 0.01 * torch.randn(c.shape, generator=g)  # (same scale: alpha's power of two does not move)
    same(kept(x, c2, rows), fresh(x, c2))  # E follows the centroids
    poisoned = rows.a_fast.clone()
    rows.a_fast[0, 0, 0] += 1.0
    kept(x, c2, rows)
    assert not torch.equal(rows.a_fast, poisoned)  # skipped: the poison stays
    x.mul_(1.0)  # a write into x (its version counter moves)
    same(kept(x, c2, rows), fresh(x, c2))
    rows.a_fast[0, 0, 0] += 1.0
    same(kept(x, 8.0 * c2, rows), fresh(x, 8.0 * c2))  # another scale: redone
    y = x.clone()
    rows.a_fast[0, 0, 0] += 1.0
    same(kept(y, c2, rows), fresh(y, c2))  # another tensor: redone
    labels, min_dist = A.flash_assign(y, c2, shift=shift, rows=rows)
    assert_exact(y, c2, labels, min_dist)


def test_fast_pass_flags_few_rows_on_random_data():
    g = gen(13)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(256, 32, generator=g).to(dtype)
        c = torch.randn(64, 32, generator=g).to(dtype)
        fast = fast_assign(x, c)
        best = torch.from_numpy(oracle_distances(x, c).argmin(1))
        assert torch.equal(fast.labels[0][~fast.flagged[0]], best[~fast.flagged[0]])
        assert float(fast.flagged.float().mean()) < 0.1


def _round_toward_zero_f32(v):
    f = v.astype(np.float32)
    return np.where(np.abs(f.astype(np.float64)) > np.abs(v), np.nextafter(f, np.float32(0)), f).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["randn", "offset", "aligned"])
@pytest.mark.parametrize("d", [40, 150, 200])
def test_error_bound_covers_a_truncating_accumulator(dtype, case, d):
    """The interpreter's matmul is more accurate than tensor cores, so the bound's derivation is checked here:
    the row pass's operands, accumulated one product at a time in fp32 rounding toward zero (worse than
    hardware), stay within the row's stored E of the exact score for every (row, centroid). d = 40: rows
    resident, the chain starts from fl(aa + |b|^2); d = 150, 200: D streamed, in chains of `cfg.chain` chunks
    from zero (the last one short at d = 150), summed and then added to fl(aa + |b|^2), rounding toward zero
    too."""
    from flashkm_dist.kernels import assign as assign_module

    g = gen(21)
    if case == "randn":
        x, c = torch.randn(120, d, generator=g), torch.randn(30, d, generator=g)
    elif case == "offset":
        x = torch.randn(120, d, generator=g) + 300
        c = x[:30].clone()
    else:  # all-positive: sum |a_i b_i| = |a||b|, rows far outside the centroids
        x, c = torch.rand(120, d, generator=g) * 10, torch.rand(30, d, generator=g)
    x, c = x.to(dtype), c.to(dtype)
    p = assign_module._prepare(x[None], c[None], "euclidean", None)
    assert p.cfg.resident == (d == 40)
    assign_module._prepare_rows(p)  # the row pass: fp16 operands, aa and E as the kernel stores them
    sigma = p.sigma[0].double().numpy()
    alpha = float(p.stats[0, 0])
    ah = p.a_fast[0, :120, :d].double().numpy()
    aa, bound = p.rowstat[0, :120, 0].double().numpy(), p.rowstat[0, :120, 1].double().numpy()
    cf = p.c_fast[0, :30, :d].double().numpy()  # -2 bh
    cc = p.cc[0, :30].double().numpy()
    a_exact, b_exact = alpha * (x.double().numpy() - sigma), alpha * (c.double().numpy() - sigma)
    score = (b_exact ** 2).sum(1)[None, :] - 2.0 * a_exact @ b_exact.T
    init = (aa[:, None] + cc[None, :]).astype(np.float32).astype(np.float64)
    chain = d if p.cfg.resident else p.cfg.chain * p.cfg.block_d
    assert p.cfg.resident or 0 < chain < d
    acc = np.zeros_like(init)
    for g in range(0, d, chain):
        part = init if p.cfg.resident else np.zeros_like(init)
        for i in range(g, min(g + chain, d)):
            part = _round_toward_zero_f32(part + ah[:, i:i + 1] * cf[None, :, i])
        acc = part if p.cfg.resident else _round_toward_zero_f32(acc + part)
    if not p.cfg.resident:
        acc = _round_toward_zero_f32(init + acc)
    assert (np.abs(acc - aa[:, None] - score) <= bound[:, None]).all()


# ----------------------------------------------------------------------------------------------------------------
# update


def assert_same_partials(a, b):
    assert a.scale == b.scale
    assert torch.equal(a.sums, b.sums), "sums differ"
    assert torch.equal(a.weights, b.weights), "weights differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 17, 200])
def test_update_bitwise_equals_reference(dtype, d):
    g = gen(100 + d)
    x = (torch.randn(140, d, generator=g) * 5).to(dtype)
    labels = torch.randint(0, 11, (140,), generator=g)
    weights = torch.rand(140, generator=g) * 3
    assert_same_partials(sort_inverse_update(x, labels, 13), reference.partial_sums(x, labels, 13))
    assert_same_partials(sort_inverse_update(x, labels, 13, weights=weights),
                         reference.partial_sums(x, labels, 13, weights))
    if d <= 17:
        assert_same_partials(sort_inverse_update(x, labels, 13, weights),  # positional, like the reference
                             reference.partial_sums(x, labels, 13, weights))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's casts of the out-of-range values
def test_update_square_sums_equal_the_reference_and_the_float64_moments(dtype):
    """square=True: the second moments behind the tolerance, from the same kernel, bitwise the reference's (a
    fp16 square stays in fp32; tiny values that only fp32 would make subnormal included)."""
    g = gen(140)
    x = (torch.randn(150, 5, generator=g) * 7).to(dtype)
    x[:4] = torch.tensor([2.0 ** -24, -(2.0 ** -14), 2.0 ** -70, 60000.0])[:, None].to(dtype)
    labels = torch.randint(0, 3, (150,), generator=g)
    weights = torch.rand(150, generator=g) * 3
    for scale in (None, fp.FixedPointScale(10, 0, 0), fp.FixedPointScale(120, 0, 0)):
        if scale is not None and float(x.to(torch.float64).square().max()) * 2.0 ** scale.sum_exp >= 2.0 ** 52:
            with pytest.raises(OverflowError):
                sort_inverse_update(x, labels, 3, scale=scale, square=True)
            continue
        assert_same_partials(sort_inverse_update(x, labels, 3, scale=scale, square=True),
                             reference.partial_sums(x, labels, 3, scale=scale, square=True))
    assert_same_partials(sort_inverse_update(x, labels, 3, weights, square=True),
                         reference.partial_sums(x, labels, 3, weights, square=True))
    got = reference.partial_sums(x, labels, 3, scale=fp.FixedPointScale(10, 0, 0), square=True)
    x64 = x.to(torch.float64)
    want = torch.stack([fp.quantize(x64[labels == j] ** 2, 10).sum(dim=1) for j in range(3)], dim=1)
    assert torch.equal(got.sums, fp.normalize(want))


def test_update_runs_just_over_a_chunk_fill_the_whole_grid():
    """Every run one row longer than a chunk: the most pieces the launch's upper bound allows for, all used."""
    cfg = update_config(torch.device("cpu"), 4, torch.float32)
    rows = min(1 << 10, cfg.block_n * cfg.tiles_per_chunk)
    g = gen(150)
    labels = torch.arange(5).repeat_interleave(rows + 1)[torch.randperm(5 * (rows + 1), generator=g)]
    x = torch.randn(labels.shape[0], 4, generator=g)
    assert_same_partials(sort_inverse_update(x, labels, 7), reference.partial_sums(x, labels, 7))


def test_update_round_half_even_ties_and_signs():
    scale = fp.FixedPointScale(sum_exp=1, weight_exp=2, dist_exp=0)
    vals = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 2.75, -3.25, 0.0, -0.0, 1e6 + 0.25, 3.0])
    x = vals.reshape(-1, 1).repeat(1, 3)
    x[:, 1] *= -1
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 3, 3, 1, 0, 2])
    weights = torch.tensor([0.125, 0.375, 1.0, 2.0, 0.625, 1.5, 1.0, 0.875, 1.0, 1.0, 1.0, 0.5])
    for w in (None, weights):
        assert_same_partials(sort_inverse_update(x, labels, 4, weights=w, scale=scale),
                             reference.partial_sums(x, labels, 4, w, scale=scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_fp32_limbs_match_the_int64_split_at_full_range(dtype):
    # unweighted fp16/bf16/fp32 input takes the fp32 limb path: q up to 2**51, both signs, tiny and huge values
    g = gen(31)
    x = (torch.randn(200, 5, generator=g) * torch.logspace(-6, 3, 200)[:, None]).to(dtype)
    x[0, 0] = -float(x.abs().max()) * 0.999
    labels = torch.randint(0, 3, (200,), generator=g)
    scale = fp.FixedPointScale.from_bounds(float(x.abs().max()), 1.0, 1.0)
    assert scale.sum_exp > 26
    assert_same_partials(sort_inverse_update(x, labels, 3, scale=scale),
                         reference.partial_sums(x, labels, 3, scale=scale))


def test_update_order_free_across_permutations_and_chunks():
    g = gen(14)
    x = (torch.randn(300, 7, generator=g) * 40).half()
    labels = torch.randint(0, 9, (300,), generator=g)
    weights = torch.rand(300, generator=g)
    scale = fp.FixedPointScale.from_bounds(float(reference.weighted_rows(x, weights).abs().max()) * 4, 2.0, 0.0)
    whole = sort_inverse_update(x, labels, 12, weights=weights, scale=scale)
    assert_same_partials(whole, reference.partial_sums(x, labels, 12, weights, scale=scale))
    for trial in range(2):
        perm = torch.randperm(300, generator=g)
        assert_same_partials(sort_inverse_update(x[perm], labels[perm], 12, weights=weights[perm], scale=scale),
                             whole)
        cuts = sorted(torch.randint(1, 300, (3,), generator=g).tolist())
        total = None
        for lo, hi in zip([0] + cuts, cuts + [300]):
            part = sort_inverse_update(x[perm[lo:hi]], labels[perm[lo:hi]], 12, weights=weights[perm[lo:hi]],
                                       scale=scale)
            total = part if total is None else total + part
        assert_same_partials(total, whole)


def test_update_empty_clusters_and_one_big_cluster():
    g = gen(15)
    x = torch.randn(250, 5, generator=g)
    one = torch.full((250,), 3)
    p = sort_inverse_update(x, one, 8)  # a single run across every program boundary
    assert_same_partials(p, reference.partial_sums(x, one, 8))
    assert bool((p.weights[:, [0, 1, 2, 4, 5, 6, 7]] == 0).all())
    sparse = torch.randint(0, 3, (250,), generator=g) * 3  # clusters 1, 2, 4, 5, ... stay empty
    assert_same_partials(sort_inverse_update(x, sparse, 9), reference.partial_sums(x, sparse, 9))
    assert_same_partials(sort_inverse_update(x[:0], sparse[:0], 9), reference.partial_sums(x[:0], sparse[:0], 9))


def test_update_batched():
    g = gen(16)
    x = torch.randn(3, 60, 6, generator=g).half()
    labels = torch.randint(0, 5, (3, 60), generator=g)
    weights = torch.rand(3, 60, generator=g)
    p = sort_inverse_update(x, labels, 5, weights=weights)
    assert p.sums.shape == (2, 3, 5, 6) and p.weights.shape == (2, 3, 5)
    for b in range(3):
        r = reference.partial_sums(x[b], labels[b], 5, weights[b], scale=p.scale)
        assert torch.equal(p.sums[:, b], r.sums) and torch.equal(p.weights[:, b], r.weights)


def test_update_errors_like_reference():
    x = torch.randn(20, 3) * 100
    labels = torch.randint(0, 4, (20,))
    tight = fp.FixedPointScale(sum_exp=50, weight_exp=0, dist_exp=0)
    with pytest.raises(OverflowError):
        reference.partial_sums(x, labels, 4, scale=tight)
    with pytest.raises(OverflowError):
        sort_inverse_update(x, labels, 4, scale=tight)
    with pytest.raises(IndexError):
        sort_inverse_update(x, labels + 4, 4)
    with pytest.raises(IndexError):  # a label that a narrow sort key would wrap into range
        sort_inverse_update(x, labels + 65536, 4)


def test_update_checks_can_wait_for_the_callers_read_back():
    """With `deferred`, bad labels or values raise at verify (the Lloyd step's one read-back), not at the call;
    good input passes verify and gives the same partials as the checked call."""
    x = torch.randn(20, 3) * 100
    labels = torch.randint(0, 4, (20,))
    tight = fp.FixedPointScale(sum_exp=50, weight_exp=0, dist_exp=0)
    for bad_labels, scale, error in ((labels + 4, None, IndexError), (labels, tight, OverflowError)):
        checks = DeferredChecks()
        sort_inverse_update(x, bad_labels, 4, scale=scale, deferred=checks)
        with pytest.raises(error):
            checks.verify()
    checks = DeferredChecks()
    p = sort_inverse_update(x, labels, 4, deferred=checks)
    assert len(checks.values("cpu")) == 3
    checks.verify()
    assert_same_partials(p, sort_inverse_update(x, labels, 4))


# ----------------------------------------------------------------------------------------------------------------
# config and launching


def _with_sm90_pass(monkeypatch):
    """Route fast_assign through the sm_90 path here: its streaming kernel (Gluon, Hopper only) is replaced by
    its torch twin, everything after it (rows padded to the pass's multiple, the three planes, the finishing
    kernel) runs as on the GPU, in the interpreter."""
    import dataclasses

    from flashkm_dist.kernels import assign as assign_module
    from flashkm_dist.kernels import assign_sm90, config
    real = assign_module.assign_config

    def with_stream(*args, **kwargs):
        cfg = real(*args, **kwargs)
        return dataclasses.replace(cfg, stream=config.StreamConfig(cfg.block_n, cfg.block_k, 2, 232))
    monkeypatch.setattr(assign_module, "assign_config", with_stream)
    monkeypatch.setattr(assign_sm90, "stream", lambda a, rowstat, c, cc, sc, key_low: reference.stream_slots(
        a, rowstat, c, cc, sc.block_k, key_low))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_sm90_path_finishes_like_the_portable_kernel(monkeypatch, metric):
    g = gen(31)
    x = (torch.randn(2, 75, 20, generator=g) + 3.0).half()  # batched, N not a multiple of the 64-row programs
    c = x[:, :37].clone()
    c[:, 5] = c[:, 6]  # a duplicated centroid: flagged rows, resolved to the lower index
    portable_fast = fast_assign(x, c, metric=metric)
    portable = flash_assign(x, c, metric=metric)
    _with_sm90_pass(monkeypatch)
    fast = fast_assign(x, c, metric=metric)
    labels, min_dist = flash_assign(x, c, metric=metric)
    assert torch.equal(labels, portable[0]) and torch.equal(min_dist, portable[1])
    for b in range(2):
        assert_exact(x[b], c[b], labels[b], metric=metric)  # (min_dist: the portable bits, above)
    assert (labels != 6).all() and (labels == 5).any()  # the duplicate never wins over its lower twin
    sure = ~fast.flagged & ~portable_fast.flagged  # stage 1 (fp32 scores summed in another order): same labels
    assert torch.equal(fast.labels[sure], portable_fast.labels[sure]) and int(fast.counts[:, 0].sum()) > 0


def test_sm90_pass_is_chosen_from_the_device_only_where_it_builds(monkeypatch):
    import dataclasses

    from flashkm_dist.kernels import config
    hopper = config.DeviceTraits(132, 227 * 1024, 228 * 1024, 50 << 20, (9, 0), False)
    monkeypatch.setattr(config, "device_traits", lambda device: hopper)
    def smem(sc, d):
        return sc.rows * d * 2 + sc.stages * (sc.block_k * d * 2 + sc.block_k * 4)

    sc = config.assign_config("cuda", 8192, 128, torch.float16).stream
    assert sc is not None and sc.block_k == 128 and 2 <= sc.stages <= 6
    assert sc.programs == hopper.sm_count  # persistent: one program per SM walks row pairs
    assert smem(sc, 128) <= hopper.smem_per_block
    assert config.assign_config("cuda", 8192, 128, torch.float16).row_multiple == sc.rows
    wide = config.assign_config("cuda", 4096, 200, torch.float16)  # D pads to 256: 128-row tiles leave one slot
    assert wide.stream is not None and wide.stream.block_n == 64 and wide.stream.stages >= 2
    assert smem(wide.stream, 256) <= hopper.smem_per_block
    assert wide.row_multiple == 128 and wide.padded_d(200) == 256
    assert config.assign_config("cuda", 8192, 512, torch.float16).stream is None  # rows not resident: portable
    for cap in ((8, 0), (10, 0)):  # no wgmma / another MMA: portable
        other = dataclasses.replace(hopper, capability=cap)
        monkeypatch.setattr(config, "device_traits", lambda device, other=other: other)
        assert config.assign_config("cuda", 8192, 128, torch.float16).stream is None
    assert assign_config("cpu", 8192, 128, torch.float16).stream is None  # interpreter


def test_streamed_scores_chain_only_where_d_is_large_and_the_chunks_fit(monkeypatch):
    """Chained scores (shorter accumulation chains, a tighter bound, but slower passes) from padded D = 1024 on,
    only where a chain's unrolled chunks with their stages fit in a block's shared memory; never for resident rows."""
    import dataclasses

    from flashkm_dist.kernels import config
    hopper = config.DeviceTraits(132, 227 * 1024, 228 * 1024, 50 << 20, (9, 0), False)
    monkeypatch.setattr(config, "device_traits", lambda device: hopper)
    chains = {d: config.assign_config("cuda", 4096, d, torch.float16).chain for d in (128, 256, 512, 1000, 2048)}
    assert chains == {128: 0, 256: 0, 512: 0, 1000: config.STREAM_CHAIN, 2048: config.STREAM_CHAIN}
    small = dataclasses.replace(hopper, smem_per_block=100 * 1024, smem_per_sm=100 * 1024)
    monkeypatch.setattr(config, "device_traits", lambda device: small)
    assert config.assign_config("cuda", 4096, 1024, torch.float16).chain == 0


def test_configs_are_small_on_cpu_and_bucket_d():
    cfg = assign_config("cpu", 37, 200, torch.float16)
    assert not cfg.resident and cfg.padded_d(200) == 256 and cfg.padded_k(37) == 48
    assert assign_config("cpu", 5, 17, torch.float32).block_d == 32
    assert assign_config("cpu", 5000, 17, torch.float32) == assign_config("cpu", 7, 20, torch.float32)
    assert update_config("cpu", 3, torch.float32).block_d >= 16
