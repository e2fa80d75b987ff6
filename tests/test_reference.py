"""The plain-torch twins (reference.py) against the float64 oracle, and the order-free partial sums."""
import numpy as np
import pytest
import torch

from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels.checks import DeferredChecks
from flashkm_dist.kernels import reference as R
from oracle import assert_labels_exact, cos_dists, sq_dists


def data(n, d, k, seed=0, offset=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) + offset).to(dtype)
    c = x[torch.randperm(n, generator=g)[:k]].clone()
    return x, c


@pytest.mark.parametrize("d", [1, 3, 17, 200])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_assign_exact_any_dim_and_dtype(d, dtype):
    x, c = data(300, d, 13, seed=d, dtype=dtype)
    labels, dist = R.assign(x, c)
    oracle = assert_labels_exact(x.double(), c.double(), labels)
    np.testing.assert_allclose(dist.double().numpy(), oracle[np.arange(300), labels.numpy()], rtol=1e-6)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("offset", [300.0, 1e4, -1e5])
def test_assign_exact_far_from_origin(offset):
    # fp32 data offset by `offset`: the expansion |x|^2 - 2x.c + |c|^2 would cancel without the centring shift.
    x, c = data(400, 8, 20, seed=1, offset=offset)
    labels, _ = R.assign(x, c)
    assert_labels_exact(x.double(), c.double(), labels)
    assert (labels.numpy() == sq_dists(x, c).argmin(1)).mean() > 0.999


def test_assign_near_ties_and_exact_ties_go_to_lowest_index():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    c0 = torch.randn(1, 5, generator=g, dtype=torch.float64)
    c = torch.cat([c0, c0 + 1e-9, c0, torch.randn(2, 5, generator=g, dtype=torch.float64)])  # 0 == 2, 1 ~ 0
    labels, _ = R.assign(x, c)
    d = assert_labels_exact(x, c, labels)
    assert not (labels == 2).any(), "an exact tie must go to the lowest index"
    # points equidistant from two centres: midpoint plane between c[3] and c[4]
    mid = ((c[3] + c[4]) / 2).expand(7, 5).clone()
    labels, _ = R.assign(mid, c[3:5], shift=torch.zeros(5, dtype=torch.float64))
    assert (labels == 0).all()


def test_assign_fp16_huge_norms():
    # |x|^2 > 65504 would overflow an fp16 norm; norms are never computed in fp16.
    x, c = data(256, 64, 10, seed=4, offset=60.0, dtype=torch.float16)
    assert float((x.double() ** 2).sum(1).min()) > 65504
    labels, dist = R.assign(x, c)
    assert torch.isfinite(dist).all()
    assert_labels_exact(x.double(), c.double(), labels)


@pytest.mark.parametrize("k", [1, "n"])
def test_assign_k_equals_one_and_n(k):
    x, _ = data(50, 4, 1, seed=5)
    c = x[:1] if k == 1 else x.clone()
    labels, dist = R.assign(x, c)
    if k == 1:
        assert (labels == 0).all()
    else:
        assert (labels == torch.arange(50)).all() and (dist == 0).all()


def test_assign_tiles_over_n_and_k_without_changing_the_answer(monkeypatch):
    x, c = data(500, 6, 300, seed=6)
    whole = R.assign(x, c)
    monkeypatch.setattr(R, "_TILE_ELEMENTS", 64 * 7)  # forces many N tiles and K tiles of 64
    monkeypatch.setattr(R, "_tiles", lambda n, k: (7, 64))
    tiled = R.assign(x, c)
    assert torch.equal(whole[0], tiled[0]) and torch.equal(whole[1], tiled[1])


def test_assign_batched_and_cosine():
    x, c = data(60, 7, 5, seed=7)
    xb, cb = torch.stack([x, x * 2 + 1]), torch.stack([c, c * 2 + 1])
    labels, _ = R.assign(xb, cb)
    for b in range(2):
        assert_labels_exact(xb[b].double(), cb[b].double(), labels[b])
    labels, dist = R.assign(x, c, metric="cosine")
    oracle = cos_dists(x, c)
    slack = oracle[np.arange(60), labels.numpy()] - oracle.min(1)
    assert (slack <= 1e-6).all()
    np.testing.assert_allclose(dist.numpy(), oracle.min(1), atol=1e-6)


def test_distances_match_oracle():
    x, c = data(40, 9, 6, seed=8, offset=300.0, dtype=torch.float64)
    np.testing.assert_allclose(R.distances(x, c).numpy(), sq_dists(x, c), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(R.distances(x, c, metric="cosine").numpy(), cos_dists(x, c), atol=1e-12)


def test_bad_metric_is_named():
    with pytest.raises(ValueError, match="metric"):
        R.assign(torch.zeros(2, 2), torch.zeros(1, 2), metric="manhattan")


# ------------------------------------------------------------------------------------------- partial sums
def scale_for(x, w=None):
    max_w = 1.0 if w is None else float(w.max())
    return fp.FixedPointScale.from_bounds(float(x.abs().max()) * max_w, max_w, 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_partials_bitwise_equal_for_any_chunking_and_order(dtype, weighted):
    x, _ = data(997, 11, 1, seed=9, offset=3.0, dtype=dtype)
    x[5] *= 1e3  # a large value among small ones
    g = torch.Generator().manual_seed(10)
    labels = torch.randint(0, 17, (997,), generator=g)
    labels[labels == 4] = 3  # cluster 4 is empty
    w = torch.rand(997, generator=g, dtype=torch.float64) * 3 if weighted else None
    scale = scale_for(x, w)
    whole_centers, whole_w = R.finalize(R.partial_sums(x, labels, 17, w, scale=scale), dtype=torch.float64)
    for trial in range(20):
        perm = torch.randperm(997, generator=g)
        cuts = sorted(torch.randint(0, 997, (trial % 7,), generator=g).tolist())
        parts = [R.partial_sums(x[idx], labels[idx], 17, None if w is None else w[idx], scale=scale)
                 for idx in torch.tensor_split(perm, cuts)]
        order = torch.randperm(len(parts), generator=g).tolist()
        total = parts[order[0]]
        for i in order[1:]:
            total = total + parts[i]
        centers, weights = R.finalize(total, dtype=torch.float64)
        assert torch.equal(centers, whole_centers) and torch.equal(weights, whole_w)
    # and the exact value is the float64 mean to within rounding
    xn, ln = x.double().numpy(), labels.numpy()
    wn = np.ones(997) if w is None else w.numpy()
    for j in [0, 3, 16]:
        m = ln == j
        np.testing.assert_allclose(whole_centers[j].numpy(), (xn[m] * wn[m, None]).sum(0) / wn[m].sum(),
                                   rtol=1e-12, atol=1e-12 * float(x.abs().max()))
    assert whole_w[4] == 0 and torch.equal(whole_centers[4], torch.zeros(11, dtype=torch.float64))


def test_partials_of_different_fits_do_not_add():
    x, _ = data(10, 2, 1)
    a = R.partial_sums(x, torch.zeros(10, dtype=torch.long), 2, scale=scale_for(x))
    b = R.partial_sums(x * 1e6, torch.zeros(10, dtype=torch.long), 2, scale=scale_for(x * 1e6))
    with pytest.raises(ValueError, match="different fits"):
        a + b


def test_values_outside_the_grid_raise_instead_of_wrapping():
    x, _ = data(10, 2, 1)
    with pytest.raises(OverflowError, match="fixed-point range"):
        R.partial_sums(x * 1e3, torch.zeros(10, dtype=torch.long), 1, scale=scale_for(x))


def test_grid_check_can_wait_and_names_the_value():
    checks = DeferredChecks()
    fp.quantize(torch.tensor([1.0, -3.0e6, float("nan")], dtype=torch.float64), 40, checks)  # (no raise yet)
    with pytest.raises(OverflowError, match="fixed-point range"):
        checks.verify()
    checks = DeferredChecks()
    fp.quantize(torch.tensor([1.0, -3.0e6]), 32, checks)
    with pytest.raises(OverflowError, match="value 3000000.0 exceeds"):
        checks.verify()
    checks = DeferredChecks()
    fp.quantize(torch.tensor([1.0, -3.0]), 20, checks)
    checks.verify()  # on the grid: nothing raised


def test_limbs_absorb_many_terms_and_normalize_keeps_the_value():
    q = fp.quantize(torch.tensor([1.0 - 2 ** -40, -3.5, 0.0], dtype=torch.float64), 40)
    total = q * (1 << 30)  # as if 2**30 identical rows had been added
    assert torch.equal(fp.to_float(total, 40), torch.tensor([(1.0 - 2 ** -40) * 2 ** 30, -3.5 * 2 ** 30, 0.0],
                                                             dtype=torch.float64))
    assert torch.equal(fp.to_float(fp.normalize(total), 40), fp.to_float(total, 40))


@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1e-5, 1.0, 1e5, 1e30, 1e300])
def test_exact_total_on_the_device_equals_the_host_exact_sum(scale):
    """`exact_total` (no wait for the device) rounds the same exact integer as the host-side recipe."""
    g = torch.Generator().manual_seed(5)
    cases = [torch.rand(1000, 17, generator=g, dtype=torch.float64) * scale, torch.zeros(4, 3, dtype=torch.float64),
             torch.tensor([5e-324, 0.0], dtype=torch.float64), torch.tensor([4e307, 3e307], dtype=torch.float64)]
    for values in cases:
        exp = fp.exponent_for(float(values.abs().max()))
        assert float(fp.exact_total(values)) == float(fp.to_float(fp.exact_sum(values, exp), exp))
    assert float(fp.exact_total(torch.empty(0, dtype=torch.float64))) == 0.0
    halves = torch.full((1 << 12,), 0.5, dtype=torch.float64)  # on the grid: the sum is exact
    assert float(fp.exact_total(halves)) == 2048.0 and float(fp.exact_total(halves.flip(0) - 1)) == -2048.0


def test_move_points_and_cosine_finalize():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0])
    scale = scale_for(x)
    p = R.partial_sums(x, labels, 2, scale=scale)
    p = R.move_points(p, x[2:], torch.ones(1, dtype=torch.float64), labels[2:], torch.tensor([1]))
    centers, weights = R.finalize(p, dtype=torch.float64)
    assert torch.equal(weights, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(centers, torch.tensor([[0.5, 0.5], [3.0, 4.0]], dtype=torch.float64))
    unit, _ = R.finalize(p, dtype=torch.float64, metric="cosine")
    assert torch.allclose(unit.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_join_and_split_are_exact_inverses_or_refuse():
    from flashkm_dist.kernels import fixed_point as fp
    rng = torch.Generator().manual_seed(0)
    q = torch.randint(-(1 << 52), 1 << 52, (3, 7), generator=rng, dtype=torch.int64)
    limbs = fp.normalize(torch.stack([q >> 26, q & ((1 << 26) - 1)]) * 1000)  # sums of 1000 such values
    joined = fp.join(limbs)
    assert torch.equal(joined, q * 1000) and torch.equal(fp.split(joined), limbs)
    assert fp.join(torch.stack([torch.tensor([1 << 40]), torch.tensor([0])])) is None  # 2**66 does not fit
