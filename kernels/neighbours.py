"""FlashAssign's neighbour tier: a flagged row settled from its centroid's nearest centroids instead of all K.

A row the fast pass flags (its top two scores too close for the fp16 error bound) has a fast label l and the
exact distance r = |x - c_l| (the finishing kernel computes it for every row). Any centroid c at least as near
to x as c_l has |c - c_l| <= |x - c| + |x - c_l| <= 2r. A table lists, for each centroid, its M nearest centroids
with lower bounds on their distances (ascending) and a lower bound on the distance to every centroid it leaves
out (`beyond`). Where 2r < beyond, every centroid that can win is listed, and the float64 argmin (ties -> lowest
index) over the listed ones within 2r, c_l among them, is the exact label; the other flagged rows go on to the
resolve pass, which streams all K centroids again. In fits from random rows several centroids share a cluster,
and most rows near a tie are near a tie between those few: the resolve pass's O(K D) work per row becomes a
few float64 distances. Measured on an H200 (benchmarks/near_ties.py, engine_fit.py; N=2^26, K=8192, after 12
iterations from random rows): 9.9M of 67M rows flagged, 5766 of them left to the resolve pass; the assignment
282 ms instead of 365 (the tier 14.7 ms, the resolve pass it replaces 104 ms); Lloyd steps 0.304 s instead of
0.383 in the later half of the fit.

The table costs one float64 K x K product per set of centroids (`table_for` keeps the last one per device, so
the chunks of a Lloyd step share it); FlashAssign builds it only where that is small next to the call's work.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import assign
from .assign import _append_rows, _exact_score, _take, _x_rows
from .config import launch

NEIGHBOURS = 16  # centroids listed per centroid
MIN_CENTROIDS = 2048  # fewer: the resolve pass over all of them is cheap enough (see `table_for`)
ROWS_PER_CENTROID = 1024  # a table is built only for at least this many rows per centroid (see `table_for`)
TABLE_ELEMENTS = 1 << 25  # float64 K x K scores per block of the table's build (256 MiB: few blocks, few launches)
_SLACK = 2.0 ** -40  # relative and absolute slack of the table's lower bounds (float64 rounding is 2**-53)


@dataclass(frozen=True)
class NeighbourTable:
    """Per batch and centroid k: `index` (int32 (B, K, M)) its M nearest centroids by `low` (float64 (B, K, M),
    ascending, lower bounds on |c_k - c_index|; k itself first or tied first), and `beyond` (float64 (B, K)), a
    lower bound on |c_k - c_j| for every j not listed (+inf when all are; -inf for a batch with a non-finite
    centroid: no row is settled from it)."""

    index: torch.Tensor
    low: torch.Tensor
    beyond: torch.Tensor

    @property
    def m(self) -> int:
        return self.index.shape[-1]


def neighbour_table(centroids: torch.Tensor, m: int = NEIGHBOURS) -> NeighbourTable:
    """The table of `centroids` (K, D) or (B, K, D), any float dtype, on their device; m a power of two.
    Why the bounds hold: with c~ = fl(c - mean) in float64 (each within 2**-53 |c~| of c - mean), the computed
    squared distance g_ij = |c~_i|^2 + (|c~_j|^2 - 2 c~_i.c~_j) is within (D + 8) 2**-52 S_i^2 of |c~_i - c~_j|^2,
    S_i = |c~_i| + max_j |c~_j| (the dot product, norms and sums, any summation order), so
    f_i(g) = sqrt(g - (D + 8) 2**-52 S_i^2) less the centring error bounds |c_i - c_j| from below (`_SLACK`
    covers the sqrt's rounding). f_i grows with g: the M + 1 smallest g of a row are its M + 1 smallest bounds,
    so only they are turned into bounds (one product and one top-k per block of rows; no K x K passes besides)."""
    c = centroids.to(torch.float64)
    c = c[None] if c.dim() == 2 else c
    b, k, d = c.shape
    c = c - c.mean(dim=1, keepdim=True)
    sq = (c * c).sum(dim=2)
    norm = sq.sqrt()
    big_s = norm + norm.max(dim=1, keepdim=True).values  # (B, K): S_i
    index = torch.zeros((b, k, m), dtype=torch.int32, device=c.device)
    low = torch.full((b, k, m), float("inf"), dtype=torch.float64, device=c.device)  # (K < M: the rest unused)
    beyond = torch.full((b, k), float("inf"), dtype=torch.float64, device=c.device)
    listed, gamma = min(m, k), (d + 8) * 2.0 ** -52
    rows = max(1, TABLE_ELEMENTS // max(1, b * k))
    for r0 in range(0, k, rows):
        r1 = min(k, r0 + rows)
        h = torch.baddbmm(sq[:, None, :], c[:, r0:r1], c.transpose(1, 2), alpha=-2.0)  # g less |c~_i|^2
        top = torch.topk(h, min(m + 1, k), dim=2, largest=False, sorted=True)
        si = big_s[:, r0:r1, None]
        g = top.values + sq[:, r0:r1, None]
        bound = (g - gamma * si * si).clamp_min(0.0).sqrt() * (1.0 - _SLACK) - _SLACK * si
        index[:, r0:r1, :listed] = top.indices[..., :listed].to(torch.int32)
        low[:, r0:r1, :listed] = bound[..., :listed]
        if k > m:
            beyond[:, r0:r1] = bound[..., m]
    finite = torch.isfinite(c).flatten(1).all(dim=1)  # (no host sync: a bad batch just settles nothing)
    beyond = torch.where(finite[:, None], beyond, float("-inf"))
    return NeighbourTable(index, low, beyond)


_LAST: dict = {}  # device -> (weak reference to the centroids' storage owner, their place, the table)


def _place(c: torch.Tensor) -> tuple:
    return (c.storage_offset(), tuple(c.shape), tuple(c.stride()), c.dtype, c._version)


def table_for(centroids: torch.Tensor, n_rows: int, m: int = NEIGHBOURS) -> NeighbourTable | None:
    """The table of `centroids` (B, K, D) for a call over n_rows rows per batch: the last one built on this
    device if it is for the same tensor (unchanged since: its version counter), a new one if the call has at
    least ROWS_PER_CENTROID rows per centroid and K >= MIN_CENTROIDS, else None (the resolve pass does it all).
    Why these rules: the build (a float64 product and a top-k over K x K; on an H200 0.55 ms at K=1024,
    1.0-1.6 ms at K=4096, 2.9 ms at K=8192, 162 ms at K=65536) must be small next to the resolve pass it saves,
    which scores the flagged rows against all K: 9-15 % of the rows in fits, but 0.5-2 % with fixed centroids
    such as benchmarks/gpu_check.py's, where the tier (with 4x smaller build blocks, slower) cost its N=1M K=4096
    rows about 1 ms and its N=8M K=1024 row 0.2 ms. A Lloyd step over many chunks asks once for all of them
    (`prepare`)."""
    root = centroids if centroids._base is None else centroids._base
    last = _LAST.get(centroids.device)
    if last is not None and last[0]() is root and last[1] == (_place(centroids), m):
        return last[2]
    k = centroids.shape[1]
    if k < MIN_CENTROIDS or n_rows < ROWS_PER_CENTROID * k:
        return None
    table = neighbour_table(centroids, m)
    _LAST[centroids.device] = (weakref.ref(root), (_place(centroids), m), table)
    return table


def prepare(centroids: torch.Tensor, n_rows: int) -> None:
    """Before a Lloyd step's FlashAssign calls on `centroids` (K, D) over n_rows rows in all: build their table
    now if the whole step meets `table_for`'s rules, so that every call of the step uses it, however few rows
    each has (chunks, a bounded step's rows to score again)."""
    if assign.NEIGHBOUR_TIER:
        table_for(centroids[None], n_rows)


def forget() -> None:
    """Drop the kept tables (benchmarks time a table's build as a new Lloyd step would)."""
    _LAST.clear()


@triton.jit(do_not_specialize=["stride_xb", "n_rows"])
def _neighbour_kernel(x_ptr, stride_xb, stride_xn, stride_xd, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
                      index_ptr, low_ptr, beyond_ptr, labels_ptr, dist_ptr, list_ptr, count_ptr, rest_ptr,
                      n_rows, D, K, stride_list,
                      M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr, XB16: tl.constexpr):
    """Persistent over batch b's flagged rows (`list_ptr[b, :count[b, 0]]`, count (B, 4)): settles each row it
    can (label and exact distance, in place) and appends the others to `rest_ptr[b, :count[b, 3]]`."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)
    n_flag = tl.load(count_ptr + pid_b * 4)
    list_ptr += pid_b.to(tl.int64) * stride_list
    offs_m = tl.arange(0, M)
    one = tl.zeros([BLOCK_N], dtype=tl.float64) + 1.0
    for tile in range(pid, tl.cdiv(n_flag, BLOCK_N), nprog):
        slot = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = slot < n_flag
        rows = tl.load(list_ptr + slot, mask=valid, other=0)
        out_off = pid_b.to(tl.int64) * n_rows + rows
        label = tl.load(labels_ptr + out_off, mask=valid, other=-1)
        ok = valid & (label >= 0) & (label < K)
        t_off = pid_b.to(tl.int64) * K + tl.where(ok, label, 0)
        # reach >= 2 |x - c_l|: min_dist is the float64 distance rounded to float32 (subnormals: + 2**-125)
        md = tl.load(dist_ptr + out_off, mask=ok, other=float("nan")).to(tl.float64)
        reach = 2.0 * tl.sqrt(md * (1.0 + 9.5367431640625e-07) + 2.350988701644575e-38)
        beyond = tl.load(beyond_ptr + t_off, mask=ok, other=float("-inf"))
        ok = ok & (reach < beyond)  # (False for NaN)
        low = tl.load(low_ptr + t_off[:, None] * M + offs_m[None, :], mask=ok[:, None], other=float("inf"))
        n_near = tl.sum((low <= reach[:, None]).to(tl.int32), 1)  # (ascending: the listed ones within reach)
        row_off = _x_rows(pid_b, rows, stride_xb, stride_xn, XB16)
        best = tl.full([BLOCK_N], float("inf"), tl.float64)
        best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j in range(0, tl.max(n_near, 0)):
            use = ok & (j < n_near)
            idx = tl.load(index_ptr + t_off * M + j, mask=use, other=0)
            c_off = pid_b.to(tl.int64) * stride_cdb + idx.to(tl.int64) * stride_cdk
            score = _exact_score(x_ptr, row_off, stride_xd, cd_ptr, c_off, stride_cdd, D, use, one, False,
                                 BLOCK_N, EPI_D)
            best, best_idx = _take(best, best_idx, score, idx, use)
        tl.store(labels_ptr + out_off, best_idx.to(tl.int64), mask=ok)
        tl.store(dist_ptr + out_off, best.to(tl.float32), mask=ok)
        _append_rows(rest_ptr + pid_b.to(tl.int64) * stride_list, count_ptr + pid_b * 4 + 3, rows, valid & ~ok)


def settle_launch(x: torch.Tensor, c_dist: torch.Tensor, table: NeighbourTable, labels: torch.Tensor,
                  min_dist: torch.Tensor, flagged: torch.Tensor, counts: torch.Tensor, rest: torch.Tensor,
                  programs: int, epi_d: int, interpreted: bool, xb16: bool) -> None:
    """The neighbour tier over batch b's flagged rows `flagged[b, :counts[b, 0]]` (x (B, N, D), c_dist (B, K, D)):
    the rows it settles get their label and distance in place, the others go to `rest[b, :counts[b, 3]]`. Sizes
    come from the device (persistent programs): no host synchronisation."""
    b, n, d = x.shape
    block_n = 16 if interpreted else 32
    grid = (max(1, min(triton.cdiv(n, block_n), programs)), b)
    launch(_neighbour_kernel, grid, x, x.stride(0), x.stride(1), x.stride(2),
           c_dist, c_dist.stride(0), c_dist.stride(1), c_dist.stride(2),
           table.index, table.low, table.beyond, labels, min_dist, flagged, counts, rest,
           n, d, c_dist.shape[1], flagged.stride(0), M=table.m, BLOCK_N=block_n, EPI_D=epi_d, XB16=xb16,
           num_warps=1 if interpreted else 4)
