"""Bounded Lloyd steps (Hamerly's algorithm, exact): which rows cannot change label, without scoring them.

A row keeps a lower bound L on its distance to every centroid but its label a (`flash_assign(lower_bound=True)`).
When the centroids move by drift_j, d(x, c_j') >= L - drift_j for every j, so L' = L - max_{j != a} drift_j bounds
the new distances to the others. The row's exact distance to its own new centroid, |x - c_a'|, is needed anyway
(inertia). If |x - c_a'| (1 + 1e-6) < L', c_a' is strictly the nearest centroid, by a margin far above the float64
rounding of any exact re-check, so the label stays what a full assignment gives, bit for bit; only the other rows
(`stale`) go through FlashAssign. In a converging fit most rows stay, so most of the O(N K D) work is skipped.

With a neighbour table of the new centroids (`kernels.neighbours`: each centroid's nearest ones, and a lower bound
`beyond` on its distance to all others) the bound is sharper (`neighbour_moves`): the listed centroids moved by
at most near_a, and an unlisted c_j is at least beyond_a - |x - c_a'| away, so
L' = min(L - near_a, max(beyond_a - |x - c_a'|, L - dec_a)). One far centroid that moves a lot then no longer
loosens every row's bound.

Rows the bound does not settle can often be settled from the same table (`settle_rows`, after Exponion, Newling
and Fleuret 2016): with r >= |x - c_a'|, a centroid whose distance to c_a' is at least r + s is at least s from
x. The listed centroids are scored in float64 in ascending order of that distance until the next one's r + s
exceeds the best so far (the label; the lower bound is the smaller of that s and the second best), or the list
ends and `beyond` - r exceeds the best. Early in a fit, when centroids move too far for Hamerly's test, such a
row costs a few float64 distances (often none: Hamerly's half-distance test) instead of FlashAssign over all K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .assign import _exact_score
from .config import launch

BLOCK_N = 64
EPI_D = 32
SETTLE_NEAREST = reference.SETTLE_NEAREST


@triton.jit
def _sharper(left, lower, own_root, lab, valid, near_ptr, beyond_ptr):
    """`neighbour_moves`' bound: min(L - near, max(beyond - |x - c'|, left)), the middle term rounded down
    (float64 slack 2**-40, far above its roundings). NaN distances leave `left` (such rows are stale anyway)."""
    near = tl.load(near_ptr + lab, mask=valid, other=0.0)
    beyond = tl.load(beyond_ptr + lab, mask=valid, other=float("-inf"))
    far = beyond * (1.0 - 9.094947017729282e-13) - own_root * (1.0 + 9.094947017729282e-13)  # (+inf: all listed)
    far = tl.where(far == far, far, float("-inf"))
    top = tl.where(far > left, far, left)  # (torch.maximum: NaN in left stays NaN)
    low = lower - near
    return tl.where((low < top) | (low != low), low, top)  # (torch.minimum)


@triton.jit
def _settle(x_ptr, row_off, stride_xd, c_ptr, stride_ck, stride_cd, own, r_up, lab, active, index_ptr, low_ptr,
            beyond, D, M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr):
    """`settle_rows`' search over the table row of each active row's label (own: the float64 score of the label's
    centroid, r_up >= its root; beyond: the label's): (settled, label, its float64 score, lower bound on the
    others, rounded down). Margins of 2**-20 cover every float64 rounding many times."""
    one = tl.zeros([BLOCK_N], dtype=tl.float64) + 1.0
    t_off = lab.to(tl.int64) * M
    best = own
    best_idx = lab.to(tl.int32)
    second = tl.full([BLOCK_N], float("inf"), tl.float64)
    gap = tl.full([BLOCK_N], float("inf"), tl.float64)  # a bound on the distances of the centroids not scored
    done = active & ~active
    for j in range(0, M):
        if tl.max(active.to(tl.int32), 0) > 0:
            edge = tl.load(low_ptr + t_off + j, mask=active, other=float("inf")) - r_up
            stop = active & (edge > tl.sqrt(best) * (1.0 + 9.5367431640625e-07))  # (False for NaN)
            gap = tl.where(stop, edge, gap)
            done = done | stop
            active = active & ~stop
            idx = tl.load(index_ptr + t_off + j, mask=active, other=0)
            use = active & (idx != lab)
            if tl.max(use.to(tl.int32), 0) > 0:
                score = _exact_score(x_ptr, row_off, stride_xd, c_ptr, idx.to(tl.int64) * stride_ck, stride_cd, D,
                                     use, one, False, BLOCK_N, EPI_D)
                take = use & ((score < best) | ((score == best) & (idx < best_idx)))
                second = tl.where(take, best, tl.where(use & (score < second), score, second))
                best = tl.where(take, score, best)
                best_idx = tl.where(take, idx, best_idx)
    far = tl.where(active, beyond, float("-inf")) - r_up  # (the list ended: the rest)
    ended = active & (far * (1.0 - 9.5367431640625e-07) > tl.sqrt(best) * (1.0 + 9.5367431640625e-07))
    gap = tl.where(ended, far, gap)
    low = tl.sqrt(second)
    low = tl.where(gap < low, gap, low) * (1.0 - 9.5367431640625e-07)
    return done | ended, best_idx, best, low


@triton.jit(do_not_specialize=["n_rows"])
def _bounded_kernel(x_ptr, stride_xn, stride_xd, c_ptr, stride_ck, stride_cd, labels_ptr, lower_ptr, dec_ptr,
                    dist_ptr, new_lower_ptr, stale_ptr, n_rows, D, K, near_ptr, beyond_ptr, index_ptr, low_ptr,
                    new_labels_ptr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr, NEAR: tl.constexpr,
                    M: tl.constexpr, SETTLE: tl.constexpr, SETTLE_NEAREST: tl.constexpr):
    """Per row: the float64 distance to its label's centroid (stored as float32, as FlashAssign stores it), the
    test against its decremented lower bound, and the bound it keeps (0 where stale). SETTLE: rows the test
    leaves go through `_settle`; stale holds 0 (kept), 1 (settled from the table) or 2 (still stale)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    label = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    valid = row_mask & (label >= 0) & (label < K)
    lab = tl.where(valid, label, 0)
    one = tl.zeros([BLOCK_N], dtype=tl.float64) + 1.0
    row_off = rows.to(tl.int64) * stride_xn
    own = _exact_score(x_ptr, row_off, stride_xd, c_ptr, lab.to(tl.int64) * stride_ck, stride_cd, D, row_mask,
                       one, False, BLOCK_N, EPI_D)
    lower = tl.load(lower_ptr + rows, mask=row_mask, other=0.0).to(tl.float64)
    dec = tl.load(dec_ptr + lab, mask=valid, other=0.0)
    left = lower - dec
    if NEAR:
        left = _sharper(left, lower, tl.sqrt(own), lab, valid, near_ptr, beyond_ptr)
    keep = valid & (tl.sqrt(own) * (1.0 + 1e-6) < left)  # (False for NaN)
    # rounded down (x (1 - 2**-20) before the nearest fp32): still a lower bound
    bound = tl.where(keep, left * (1.0 - 9.5367431640625e-07), 0.0)
    code = (~keep).to(tl.int8)
    if SETTLE:
        nearest = tl.where(left < tl.sqrt(own), left, tl.sqrt(own))
        beyond = tl.load(beyond_ptr + lab, mask=valid, other=float("-inf"))
        r_up = tl.sqrt(own) * (1.0 + 9.5367431640625e-07)
        floor = tl.where(nearest > 0.0, nearest, 0.0)
        floor = tl.where(floor > SETTLE_NEAREST * r_up, floor, SETTLE_NEAREST * r_up)
        hopeful = beyond - r_up > floor  # (see SETTLE_NEAREST)
        settled, best_idx, best, low = _settle(x_ptr, row_off, stride_xd, c_ptr, stride_ck, stride_cd, own, r_up,
                                               lab, valid & ~keep & hopeful, index_ptr, low_ptr, beyond, D, M,
                                               BLOCK_N, EPI_D)
        own = tl.where(settled, best, own)
        bound = tl.where(settled, low, bound)
        code = tl.where(settled, 1, code * 2).to(tl.int8)
        tl.store(new_labels_ptr + rows, tl.where(settled, best_idx.to(tl.int64), label), mask=row_mask)
    tl.store(dist_ptr + rows, own.to(tl.float32), mask=row_mask)
    tl.store(new_lower_ptr + rows, bound.to(tl.float32), mask=row_mask)
    tl.store(stale_ptr + rows, code, mask=row_mask)


def bounded_rows(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor,
                 dec: torch.Tensor, near: tuple | None = None):
    """(min_dist float32, new lower float32, stale bool) of rows x (N, D) labelled `labels` (int64; -1: none)
    with lower bounds `lower` (float32, for the previous centroids) against `centroids` (K, D), whose moves
    decrement each label's bound by dec[label] (float64 (K,): the largest move among the other centroids);
    `near`: `neighbour_moves` of the new centroids, for the sharper bound. The same as `reference.bounded_rows`.
    Rows with no label or no bound (0) are stale."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.shape[0] == 0:
        return reference.bounded_rows(x, centroids, labels, lower, dec, near)
    _, dist, new_lower, code = _launch(x, centroids, labels, lower, dec, near, None)
    return dist, new_lower, code.bool()


def settle_rows(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor,
                dec: torch.Tensor, near: tuple, table) -> tuple:
    """`bounded_rows`, and the rows its test leaves settled from the new centroids' neighbour table (`table`:
    a `kernels.neighbours.NeighbourTable` of one batch, whose moves gave `near`) where it can: (labels int64,
    min_dist, new lower, code int8: 0 kept by the bound, 1 settled from the table (its label may have changed),
    2 stale: for FlashAssign). The same as `reference.settle_rows`."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.shape[0] == 0:
        return reference.settle_rows(x, centroids, labels, lower, dec, near, table)
    return _launch(x, centroids, labels, lower, dec, near, table)


def _launch(x, centroids, labels, lower, dec, near, table) -> tuple:
    n, d = x.shape
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    new_lower = torch.empty(n, dtype=torch.float32, device=x.device)
    code = torch.empty(n, dtype=torch.int8, device=x.device)
    new_labels = labels if table is None else torch.empty(n, dtype=torch.int64, device=x.device)
    index, low = (labels, dec) if table is None else (table.index[0].contiguous(), table.low[0].contiguous())
    c = centroids  # (any float dtype: read as float64, like FlashAssign's exact distance)
    dec = dec.to(torch.float64).contiguous()
    launch(_bounded_kernel, (triton.cdiv(n, BLOCK_N),), x, x.stride(0), x.stride(1), c, c.stride(0), c.stride(1),
           labels.contiguous(), lower.contiguous(), dec, dist, new_lower, code, n, d, c.shape[0],
           *(dec, dec) if near is None else near, index, low, new_labels, BLOCK_N=BLOCK_N, EPI_D=EPI_D,
           NEAR=near is not None, M=1 if table is None else table.m, SETTLE=table is not None,
           SETTLE_NEAREST=SETTLE_NEAREST, num_warps=4)
    return new_labels, dist, new_lower, code


def upper_of(dist: torch.Tensor) -> torch.Tensor:
    """float32 upper bounds on the distances (not squared) of rows whose float32 squared distances FlashAssign or
    `bounded_rows` stored (the nearest float32 to the float64 square): the root raised by 2**-20, which covers
    the float64 and float32 roundings (about 2**-24 each) several times over. NaN stays NaN."""
    return (torch.sqrt(dist.to(torch.float64)) * (1.0 + 2.0 ** -20)).to(torch.float32)


def centroid_moves(previous: torch.Tensor, centroids: torch.Tensor) -> tuple:
    """(drift, dec), float64 (K,) each, from the centroids of the last bounded step to these: how far each one
    moved (an upper bound's growth) and how far each label's lower bound drops, the largest move among the other
    centroids (both rounded up)."""
    drift = torch.linalg.vector_norm(centroids.to(torch.float64) - previous.to(torch.float64), dim=1) * (1.0 + 1e-12)
    if drift.numel() == 1:
        return drift, torch.zeros_like(drift)
    top = torch.topk(drift, 2)
    dec = torch.full_like(drift, 0.0) + top.values[0]
    dec[top.indices[0]] = top.values[1]
    return drift, dec


def neighbour_moves(index: torch.Tensor, beyond: torch.Tensor, drift: torch.Tensor) -> tuple:
    """(near, beyond), float64 (K,) each, for the sharper bound of `bounded_rows` and `upper_test`, from a
    neighbour table of the new centroids (index (K, M) and beyond (K,) of one batch) and each centroid's move
    (drift, rounded up): near_a is the largest move among the centroids listed for a (itself left out; unused
    slots of a table with K < M list centroid 0, which only loosens it)."""
    own = torch.arange(index.shape[0], device=index.device)[:, None]
    moves = torch.where(index == own, 0.0, drift[index.long()])
    return moves.max(dim=1).values, beyond.to(torch.float64).contiguous()


def upper_test(labels: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, drift: torch.Tensor,
               dec: torch.Tensor, near: tuple | None = None):
    """The bound test of rows that are not on the device (Hamerly's first test): (stale bool, new lower, new
    upper), from each row's label, lower bound and upper bound `upper` on its distance to its label's centroid,
    all for the previous centroids. The label's centroid moved by drift[label] (float64 (K,), rounded up), the
    others by at most dec[label], so u = upper + drift[label] bounds the new distance to the label's centroid and
    L = lower - dec[label] those to the others: u (1 + 1e-6) < L settles the label exactly as `bounded_rows`'s
    test does with the exact distance in place of u (the same margin; u is at least that distance), without
    reading the row. Settled rows keep L (rounded down) and u (rounded up); the others are stale (lower 0).
    `near`: `neighbour_moves`, as in `bounded_rows`, with u in place of the exact distance."""
    lab = labels.clamp(min=0)
    up = upper.to(torch.float64) + drift[lab]
    left = lower.to(torch.float64) - dec[lab]
    if near is not None:
        left = reference.sharper_bound(left, lower, up, near[0][lab], near[1][lab])
    keep = (labels >= 0) & (up * (1.0 + 1e-6) < left)  # (False for NaN)
    new_lower = torch.where(keep, left * (1.0 - 2.0 ** -20), 0.0).to(torch.float32)
    return ~keep, new_lower, (up * (1.0 + 2.0 ** -20)).to(torch.float32)
