"""Plain-torch twins of the Triton kernels: the test oracle and the CPU backend.

Every function works on CPU or CUDA tensors and keeps memory bounded by tiling over N and K (the N x K distance
matrix is never formed for large inputs). Distances are computed in float64 on data centred on `shift` (the fit's
data mean): float64 makes the expansion |x|^2 - 2 x.c + |c|^2 exact to ~1e-14 relative, far inside the numerics
contract, and the shift keeps data far from the origin from cancelling. Ties go to the lowest centroid index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fixed_point as fp

METRICS = ("euclidean", "cosine")
_TILE_ELEMENTS = 1 << 22  # float64 elements per distance tile (32 MiB)
# A row can settle from the table only if some centroid lies farther than r + its nearest (at least its lower
# bound), and rows whose nearest is much nearer than r (labels that change a lot: few) would take most of the list:
# rows with beyond - r below max(that bound, SETTLE_NEAREST r) go to the assignment without the search (H100,
# N=180M, K=8192, early in a fit: without the second term the search cost 3.4 ns per row it was tried on, more
# than it saved; FlashAssign takes 5-7 ns a row). Used by `settle_rows` and its kernel; exact in float32, so
# the kernel's constant has the same bits.
SETTLE_NEAREST = 0.875


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in float64; zero rows stay zero (cosine similarity 0 to every centroid)."""
    x = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _prepared(x: torch.Tensor, metric: str, shift) -> torch.Tensor:
    if metric == "cosine":
        return unit_rows(x)
    x = x.to(torch.float64)
    if shift is not None:
        x = x - torch.as_tensor(shift, dtype=torch.float64, device=x.device)
    return x


def _tiles(n: int, k: int):
    k_tile = max(1, min(k, 4096))
    n_tile = max(1, _TILE_ELEMENTS // k_tile)
    return n_tile, k_tile


def _scores(xs: torch.Tensor, cs: torch.Tensor, cc: torch.Tensor, metric: str) -> torch.Tensor:
    """Smaller is closer: |c|^2 - 2 x.c for euclidean (|x|^2 added later), -x.c for cosine."""
    dots = xs @ cs.T
    return -dots if metric == "cosine" else cc - 2.0 * dots


def _result_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def assign(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", shift=None):
    """Nearest centroid of every row: (labels int64 (N,), min_dist (N,)).

    x is (N, D) or batched (B, N, D) with centroids (B, K, D). min_dist is the squared euclidean distance (or the
    cosine distance 1 - cos), recomputed directly from the difference for the chosen centroid, in float64 for float64
    input and float32 otherwise. `shift` defaults to the mean of x (translation invariance).
    """
    check_metric(metric)
    if x.dim() == 3:
        shifts = [None if shift is None else torch.as_tensor(shift)[b] if torch.as_tensor(shift).dim() == 2
                  else shift for b in range(x.shape[0])]
        results = [assign(xb, cb, metric=metric, shift=s) for xb, cb, s in zip(x, centroids, shifts)]
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])
    n, k = x.shape[0], centroids.shape[0]
    if shift is None and metric == "euclidean" and n:
        shift = x.to(torch.float64).mean(dim=0)
    cs = _prepared(centroids, metric, shift)
    cc = (cs * cs).sum(dim=1)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    min_dist = torch.empty(n, dtype=torch.float64, device=x.device)
    n_tile, k_tile = _tiles(n, k)
    for r0 in range(0, n, n_tile):
        xs = _prepared(x[r0:r0 + n_tile], metric, shift)
        best = torch.full((xs.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
        arg = torch.zeros(xs.shape[0], dtype=torch.int64, device=x.device)
        for c0 in range(0, k, k_tile):
            scores = _scores(xs, cs[c0:c0 + k_tile], cc[c0:c0 + k_tile], metric)
            tile_best, tile_arg = scores.min(dim=1)  # first minimum: lowest index within the tile
            better = tile_best < best  # strict: an earlier tile wins ties
            best = torch.where(better, tile_best, best)
            arg = torch.where(better, tile_arg + c0, arg)
        labels[r0:r0 + n_tile] = arg
        if metric == "cosine":
            min_dist[r0:r0 + n_tile] = (1.0 + best).clamp(0.0, 2.0)
        else:
            diff = x[r0:r0 + n_tile].to(torch.float64) - centroids[arg].to(torch.float64)
            min_dist[r0:r0 + n_tile] = (diff * diff).sum(dim=1)
    return labels, min_dist.to(_result_dtype(x))


def assign_lower(x: torch.Tensor, centroids: torch.Tensor, *, shift=None):
    """`assign` (euclidean) plus a lower bound on |x - c| for every centroid c but the label (float32; +inf for
    K = 1): the twin of `flash_assign(lower_bound=True)`, from the float64 second-smallest score less a bound
    on the expansion's rounding."""
    labels, min_dist = assign(x, centroids, shift=shift)
    n, k = x.shape[-2], centroids.shape[-2]
    if x.dim() == 3:
        lower = torch.stack([assign_lower(xb, cb, shift=None if shift is None else torch.as_tensor(shift)[b]
                                          if torch.as_tensor(shift).dim() == 2 else shift)[2]
                             for b, (xb, cb) in enumerate(zip(x, centroids))])
        return labels, min_dist, lower
    lower = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    if k < 2 or n == 0:
        return labels, min_dist, lower
    if shift is None:
        shift = x.to(torch.float64).mean(dim=0)
    cs = _prepared(centroids, "euclidean", shift)
    cc = (cs * cs).sum(dim=1)
    n_tile = max(1, _TILE_ELEMENTS // k)  # (whole rows of scores: the second smallest needs them all)
    for r0 in range(0, n, n_tile):
        xs = _prepared(x[r0:r0 + n_tile], "euclidean", shift)
        xx = (xs * xs).sum(dim=1)
        scores = _scores(xs, cs, cc, "euclidean")
        scores.scatter_(1, labels[r0:r0 + n_tile, None], float("inf"))
        second = scores.min(dim=1).values
        # |error| of xx + cc - 2 x.c in float64 <= (D + 3) 2**-53 (xx + 2|x||c| + cc) <= 1e-11 (xx + max cc)
        low = (xx + second - 1e-11 * (xx + cc.max())).clamp_min(0.0).sqrt() * (1.0 - 2.0 ** -20)
        lower[r0:r0 + n_tile] = low.to(torch.float32)
    return labels, min_dist, lower


def bounded_rows(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor,
                 dec: torch.Tensor, near: tuple | None = None):
    """Twin of `kernels.bounds.bounded_rows`: the exact distance of each row to its label's centroid, whether
    its decremented lower bound (sharpened by `near`) proves that label still nearest, and the bound it keeps."""
    own, left, keep, _ = _bound_test(x, centroids, labels, lower, dec, near)
    return own.to(_result_dtype(x)), _kept_lower(left, keep), ~keep


def _kept_lower(left: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The float32 lower bound a row keeps: its decremented bound rounded down (0 where stale)."""
    return torch.where(keep, left * (1.0 - 2.0 ** -20), torch.zeros_like(left)).to(torch.float32)


def _bound_test(x, centroids, labels, lower, dec, near) -> tuple:
    """(float64 squared distance to the label's centroid, decremented lower bound, kept, the label clamped into
    range) of `bounded_rows`; rows without a valid label are not kept."""
    k = centroids.shape[0]
    valid = (labels >= 0) & (labels < k)
    lab = torch.where(valid, labels, torch.zeros_like(labels))
    diff = x.to(torch.float64) - centroids.to(torch.float64)[lab]
    own = (diff * diff).sum(dim=1)
    left = lower.to(torch.float64) - dec.to(torch.float64)[lab]
    if near is not None:
        left = sharper_bound(left, lower, own.sqrt(), near[0][lab], near[1][lab])
    return own, left, valid & (own.sqrt() * (1.0 + 1e-6) < left), lab


def settle_rows(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor,
                dec: torch.Tensor, near: tuple, table) -> tuple:
    """Twin of `kernels.bounds.settle_rows`: `bounded_rows`, then each row its test leaves scores the listed
    centroids of its label's table row in order until the next one lies farther than r + its best (settled: the
    label, and the smaller of that distance less r and the second best as its lower bound), or the list ends
    (settled where beyond - r exceeds the best)."""
    slack = 2.0 ** -20
    own, left, keep, lab = _bound_test(x, centroids, labels, lower, dec, near)
    dist, stale, new_lower = own.to(_result_dtype(x)), ~keep, _kept_lower(left, keep)
    valid = (labels >= 0) & (labels < centroids.shape[0])
    r_up = own.sqrt() * (1.0 + slack)
    beyond = table.beyond[0][lab]
    nearest = torch.where(left < own.sqrt(), left, own.sqrt())  # (the kernel's NaN rules)
    floor = torch.where(nearest > 0.0, nearest, 0.0)
    reach = SETTLE_NEAREST * r_up
    hopeful = beyond - r_up > torch.where(floor > reach, floor, reach)  # (see kernels.bounds.SETTLE_NEAREST)
    index, low = table.index[0][lab].long(), table.low[0][lab]
    active, done = stale & valid & hopeful, torch.zeros_like(stale)
    inf = torch.full_like(r_up, float("inf"))
    best, second, gap, best_idx = own.clone(), inf.clone(), inf.clone(), lab.clone()
    x64, c64 = x.to(torch.float64), centroids.to(torch.float64)
    for j in range(table.m):
        edge = low[:, j] - r_up
        stop = active & (edge > best.sqrt() * (1.0 + slack))
        gap = torch.where(stop, edge, gap)
        done, active = done | stop, active & ~stop
        use = active & (index[:, j] != lab)
        diff = x64 - c64[index[:, j]]
        score = (diff * diff).sum(dim=1)
        take = use & ((score < best) | ((score == best) & (index[:, j] < best_idx)))
        second = torch.where(take, best, torch.where(use & (score < second), score, second))
        best, best_idx = torch.where(take, score, best), torch.where(take, index[:, j], best_idx)
    far = torch.where(active, beyond, float("-inf")) - r_up
    ended = active & (far * (1.0 - slack) > best.sqrt() * (1.0 + slack))
    gap = torch.where(ended, far, gap)
    bound = torch.where(gap < second.sqrt(), gap, second.sqrt()) * (1.0 - slack)
    settled = done | ended
    code = torch.where(settled, 1, stale.to(torch.int8) * 2).to(torch.int8)
    return (torch.where(settled, best_idx, labels), torch.where(settled, best.to(dist.dtype), dist),
            torch.where(settled, bound.to(torch.float32), new_lower), code)


def sharper_bound(left, lower, own_root, near, beyond):
    """`kernels.bounds`' sharper lower bound: min(L - near, max(beyond - |x - c'|, left)), the middle term rounded
    down by 2**-40 (float64); NaN in the middle term leaves `left`."""
    far = beyond * (1.0 - 2.0 ** -40) - own_root * (1.0 + 2.0 ** -40)  # (+inf where all are listed)
    far = torch.where(torch.isnan(far), torch.full_like(far, float("-inf")), far)
    return torch.minimum(lower.to(torch.float64) - near, torch.maximum(far, left))


def neighbour_settle(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, min_dist: torch.Tensor,
                     index: torch.Tensor, low: torch.Tensor, beyond: torch.Tensor):
    """Twin of FlashAssign's neighbour tier (`kernels.neighbours`) on rows x (N, D) with fast labels and their
    min_dist, and one batch's table (index, low (K, M), beyond (K,)): (settled bool, labels, min_dist), the
    float64 argmin over the listed centroids within 2 |x - c_label| where the table lists all of them."""
    k = centroids.shape[0]
    ok = (labels >= 0) & (labels < k)
    lab = torch.where(ok, labels, torch.zeros_like(labels))
    reach = 2.0 * (min_dist.to(torch.float64) * (1.0 + 2.0 ** -20) + 2.0 ** -125).sqrt()
    ok &= reach < beyond[lab]
    near = ok[:, None] & (low[lab] <= reach[:, None])
    idx = index[lab].long()
    diff = x.to(torch.float64)[:, None, :] - centroids.to(torch.float64)[idx]
    score = torch.where(near, (diff * diff).sum(dim=2), float("inf"))
    best = score.min(dim=1).values
    first = torch.where(near & (score == best[:, None]), idx, k).min(dim=1).values  # ties: the lowest index
    return ok, torch.where(ok, first, labels), torch.where(ok, best.to(min_dist.dtype), min_dist)


def distances(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", shift=None) -> torch.Tensor:
    """Full (N, K) float64 matrix of squared euclidean (or cosine) distances, for transform and seeding."""
    check_metric(metric)
    if metric == "cosine":
        return (1.0 - unit_rows(x) @ unit_rows(centroids).T).clamp(0.0, 2.0)
    if shift is None and x.shape[0]:
        shift = x.to(torch.float64).mean(dim=0)
    xs, cs = _prepared(x, metric, shift), _prepared(centroids, metric, shift)
    d = (xs * xs).sum(1, keepdim=True) - 2.0 * (xs @ cs.T) + (cs * cs).sum(1)
    return d.clamp_min_(0.0)


@dataclass
class Partials:
    """Per-centroid weighted sums and weights as exact fixed-point limbs; adding two is exact and order-free."""

    sums: torch.Tensor  # int64 (2, K, D)
    weights: torch.Tensor  # int64 (2, K)
    scale: fp.FixedPointScale

    def __add__(self, other: "Partials") -> "Partials":
        if self.scale != other.scale or self.sums.shape != other.sums.shape:
            raise ValueError("partials of different fits (scale or shape differ) cannot be added")
        return Partials(fp.normalize(self.sums + other.sums.to(self.sums.device)),
                        fp.normalize(self.weights + other.weights.to(self.weights.device)), self.scale)

    def to(self, device) -> "Partials":
        return Partials(self.sums.to(device), self.weights.to(device), self.scale)


def _prepared_scores(a_fast, rowstat, c_fast, cc):
    """aa + cc + a.c_fast in fp32 for every prepared row and centroid (B, n_pad, k_pad); the summation order
    differs from the tensor cores', so the last bit may too."""
    return (rowstat[..., :1] + cc[:, None, :]) + torch.bmm(a_fast.float(), c_fast.float().transpose(1, 2))


def stream_slots(a_fast: torch.Tensor, rowstat: torch.Tensor, c_fast: torch.Tensor, cc: torch.Tensor,
                 tile_k: int, key_low: int) -> torch.Tensor:
    """Twin of FlashAssign's streaming passes (`assign._assign_kernel`, `assign_sm90.stream`) on their prepared
    operands, as (3, B n_pad) fp32 planes: per row the smallest score key, the smallest key outside the best's
    slot, and the label of the best (int32 bits). A key is a score's bits with its place in the low key_low bits:
    tile within the chunk (chunks of 2**(key_low - 2) tiles of tile_k centroids), then the column's place in its
    slot ((j & 1) + 2 (j >= tile_k / 2); slots as `assign.slot_of`). Chunks are merged in order; an earlier chunk
    keeps a tie."""
    b, n_pad, _ = a_fast.shape
    k_pad = c_fast.shape[1]
    dev = cc.device
    keys = _prepared_scores(a_fast, rowstat, c_fast, cc).view(torch.int32)
    j = torch.arange(k_pad, device=dev, dtype=torch.int32)
    col, chunk_tiles, slots = j % tile_k, 1 << (key_low - 2), tile_k // 4
    tag = (((j // tile_k) % chunk_tiles) << 2) | ((col & 1) + 2 * (col >= tile_k // 2).to(torch.int32))
    keys = ((keys & -(1 << key_low)) | tag).view(torch.float32)
    best = torch.full((b, n_pad), 3.0e38, device=dev)
    second, label = best.clone(), torch.zeros((b, n_pad), dtype=torch.int32, device=dev)
    width = chunk_tiles * tile_k
    for c0 in range(0, k_pad, width):
        part = keys[..., c0:c0 + width]
        # columns of a tile in the order (half h, slot g, pair member p): col = h tile_k/2 + 2 g + p
        run = part.reshape(b, n_pad, -1, 2, slots, 2).amin(dim=(2, 3, 5))
        t1, g1 = run.min(dim=-1)  # (the first minimum: the lowest slot)
        t2 = run.scatter(-1, g1[..., None], 3.0e38).amin(dim=-1)
        low = t1.view(torch.int32) & ((1 << key_low) - 1)
        i1 = c0 + (low >> 2) * tile_k + 2 * (g1.to(torch.int32) + slots * ((low >> 1) & 1)) + (low & 1)
        better = t1 < best
        second = torch.where(better, torch.minimum(best, t2), torch.minimum(second, t1))
        label = torch.where(better, i1, label)
        best = torch.where(better, t1, best)
    return torch.stack([best, second, label.view(torch.float32)]).reshape(3, b * n_pad)


def class_minimum(a_fast: torch.Tensor, rowstat: torch.Tensor, c_fast: torch.Tensor, cc: torch.Tensor,
                  labels: torch.Tensor, tile_k: int, key_low: int) -> torch.Tensor:
    """Twin of FlashAssign's class pass: per prepared row (labels (B, n_pad)), the smallest score over the other
    centroids of its label's slot in every tile of the label's chunk (chunks of 2**(key_low - 2) tiles; 3e38 if
    there are none)."""
    scores = _prepared_scores(a_fast, rowstat, c_fast, cc)
    j = torch.arange(c_fast.shape[1], device=cc.device)
    width = tile_k << (key_low - 2)

    def place(c):  # (chunk, slot)
        return c // width, (c % tile_k) % (tile_k // 2) // 2

    (chunk, slot), (l_chunk, l_slot) = place(j), place(labels)
    same = (slot == l_slot[..., None]) & (chunk == l_chunk[..., None]) & (j != labels[..., None])
    return torch.where(same, scores, torch.full_like(scores, 3.0e38)).amin(dim=-1)


def weighted_rows(x: torch.Tensor, weights, square: bool = False) -> torch.Tensor:
    """The float64 rows whose sums make the centroids: x times the sample weights (one IEEE product each); with
    `square`, x * x (one IEEE product) before the weights."""
    rows = x.to(torch.float64)
    if square:
        rows = rows * rows
    return rows if weights is None else rows * weights.to(torch.float64)[:, None]


def partial_sums(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, weights=None, *,
                 scale: fp.FixedPointScale | None = None, square: bool = False, deferred=None) -> Partials:
    """Exact per-centroid sums of weighted rows and of weights (of squared coordinates with `square`: the second
    moments behind the tolerance, summed the same order-free way).

    Partials of the same fit (same `scale`) add to the same bits in any order and any chunking. Without `scale`,
    one is derived from this x alone, which is only right for a single call. For spherical (cosine) k-means the
    caller passes unit rows: the sums are metric-free. `deferred` (a `checks.DeferredChecks`) takes the range
    checks, as in the kernel.
    """
    rows = weighted_rows(x, weights, square)
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weights is None \
        else weights.to(torch.float64)
    if scale is None:
        scale = _single_call_scale(rows, w)
    labels = labels.to(device=x.device, dtype=torch.int64)
    sums = torch.zeros((2, n_clusters, x.shape[1]), dtype=torch.int64, device=x.device)
    counts = torch.zeros((2, n_clusters), dtype=torch.int64, device=x.device)
    sums.index_add_(1, labels, fp.quantize(rows, scale.sum_exp, deferred))
    counts.index_add_(1, labels, fp.quantize(w, scale.weight_exp, deferred))
    return Partials(fp.normalize(sums), fp.normalize(counts), scale)


def _single_call_scale(rows: torch.Tensor, w: torch.Tensor) -> fp.FixedPointScale:
    """A scale for partials that will not be combined with others (no fit-wide bound is known)."""
    max_x = float(rows.abs().max()) if rows.numel() else 0.0
    max_w = float(w.abs().max()) if w.numel() else 0.0
    return fp.FixedPointScale.from_bounds(max_x, max_w, 0.0)


def move_points(partials: Partials, rows: torch.Tensor, row_weights: torch.Tensor,
                from_labels: torch.Tensor, to_labels: torch.Tensor) -> Partials:
    """Move weighted rows (as produced by `weighted_rows`) between clusters in the exact sums: the re-seeding of
    empty clusters. A moved row leaves its old cluster and becomes the whole of its new (empty) one."""
    sums, counts = partials.sums.clone(), partials.weights.clone()
    q_rows = fp.quantize(rows, partials.scale.sum_exp)
    q_w = fp.quantize(row_weights.to(torch.float64), partials.scale.weight_exp)
    sums.index_add_(1, from_labels, -q_rows)
    counts.index_add_(1, from_labels, -q_w)
    sums[:, to_labels] = q_rows
    counts[:, to_labels] = q_w
    return Partials(fp.normalize(sums), fp.normalize(counts), partials.scale)


def finalize(partials: Partials, *, dtype: torch.dtype = torch.float32, metric: str = "euclidean",
             previous: torch.Tensor | None = None):
    """Summed partials -> (centroids (K, D) in `dtype`, weights (K,) float64).

    centroid = sum / weight in float64, then cast (renormalised to unit length for cosine). A cluster of zero
    weight keeps its `previous` centroid (zeros when none is given); the caller re-seeds empty clusters first.
    """
    check_metric(metric)
    sums = fp.to_float(partials.sums, partials.scale.sum_exp)
    weights = fp.to_float(partials.weights, partials.scale.weight_exp)
    nonempty = weights > 0
    centers = sums / torch.where(nonempty, weights, torch.ones_like(weights))[:, None]
    if metric == "cosine":
        centers = unit_rows(centers)
    fallback = torch.zeros_like(centers) if previous is None else previous.to(centers.device, torch.float64)
    centers = torch.where(nonempty[:, None], centers, fallback)
    return centers.to(dtype), weights
