"""Sort-inverse update: exact per-centroid sums of rows and weights, bitwise equal to `reference.partial_sums`.

Why sort: scattering every point into its centroid (atomics per point) serialises on popular centroids and, with
floats, is order-dependent. After argsort(labels) the points of one cluster form a contiguous run; each program
walks a long contiguous range of the sorted order, quantises its rows to the fit's fixed-point grid exactly as the
reference does (float64 x * float64 w, times 2**exp, round half to even, two 26-bit limbs), prefix-sums the limbs
on chip in int64 (carried from tile to tile), and writes only at run ends: + prefix at the run's own label, - prefix at the next run's label
(a telescoping sum, exact in integers). Runs crossing program boundaries meet through int64 atomics, which are
order-free, so the result does not depend on scheduling, chunking or the sort's tie order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fixed_point as fp
from . import reference
from .config import launch, update_config

_LIMIT = float(2 ** fp.VALUE_BITS)


@triton.jit
def _round_half_even(v):
    """float64 round-half-to-even (torch.round) from floor alone: exact for |v| < 2**52, identity above
    (libdevice rint is not available to the interpreter)."""
    f = tl.floor(v)
    frac = v - f  # exact: the fractional part of a float64 is representable
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & f_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _segment_sums_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, perm_ptr, sorted_ptr, scales_ptr,
    sums_ptr, counts_ptr, overflow_ptr,
    n_rows, rows_per_program, D, n_clusters,
    HAS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program walks a long contiguous range of the sorted order in BLOCK_N-row tiles, carrying its running
    prefix of limbs from tile to tile, so that global memory is touched only where a run of equal labels ends
    (a few times per program) instead of at every tile."""
    LIMB_BITS: tl.constexpr = 26
    LIMB_MASK: tl.constexpr = (1 << 26) - 1
    LIMIT: tl.constexpr = 4503599627370496.0  # 2**52
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = pid_n * rows_per_program
    stop = tl.minimum(start + rows_per_program, n_rows)
    idx = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kd = n_clusters * D
    sum_scale = tl.load(scales_ptr)
    carry_hi = tl.zeros([BLOCK_D], dtype=tl.int64)
    carry_lo = tl.zeros([BLOCK_D], dtype=tl.int64)
    wcarry_hi = tl.sum(tl.zeros([BLOCK_N], dtype=tl.int64), 0)
    wcarry_lo = tl.sum(tl.zeros([BLOCK_N], dtype=tl.int64), 0)
    bad = tl.sum(tl.zeros([BLOCK_N], dtype=tl.int32), 0)
    for t0 in range(start, stop, BLOCK_N):
        pos = t0 + idx
        valid = pos < stop
        lab = tl.load(sorted_ptr + pos, mask=valid, other=-1).to(tl.int64)
        lab_next = tl.load(sorted_ptr + pos + 1, mask=(pos + 1) < n_rows, other=-1).to(tl.int64)
        row = tl.load(perm_ptr + pos, mask=valid, other=0).to(tl.int64)
        range_last = pos == stop - 1
        run_end = valid & ((lab_next != lab) | range_last)
        hands_over = run_end & ~range_last  # the next run starts in this range: it must not see our prefix

        if HAS_WEIGHTS:
            w = tl.load(w_ptr + row, mask=valid, other=0.0).to(tl.float64)
        else:
            w = tl.where(valid, 1.0, 0.0).to(tl.float64)
        m = valid[:, None] & d_mask[None, :]
        xv = tl.load(x_ptr + row[:, None] * stride_xn + offs_d[None, :].to(tl.int64) * stride_xd, mask=m,
                     other=0.0).to(tl.float64)
        if HAS_WEIGHTS:
            xv = xv * w[:, None]  # reference.weighted_rows: one IEEE product
        qf = _round_half_even(xv * sum_scale)
        bad = tl.maximum(bad, tl.max(tl.max(tl.where(tl.abs(qf) < LIMIT, 0, 1), 1), 0))
        q = tl.where(m, qf, 0.0).to(tl.int64)
        q_hi = q >> LIMB_BITS
        q_lo = q & LIMB_MASK
        prefix_hi = carry_hi[None, :] + tl.cumsum(q_hi, 0)
        prefix_lo = carry_lo[None, :] + tl.cumsum(q_lo, 0)
        own = lab[:, None] * D + offs_d[None, :]
        nxt = lab_next[:, None] * D + offs_d[None, :]
        end_mask = run_end[:, None] & d_mask[None, :]
        over_mask = hands_over[:, None] & d_mask[None, :]
        tl.atomic_add(sums_ptr + own, prefix_hi, mask=end_mask, sem="relaxed")
        tl.atomic_add(sums_ptr + kd + own, prefix_lo, mask=end_mask, sem="relaxed")
        tl.atomic_add(sums_ptr + nxt, -prefix_hi, mask=over_mask, sem="relaxed")
        tl.atomic_add(sums_ptr + kd + nxt, -prefix_lo, mask=over_mask, sem="relaxed")
        carry_hi += tl.sum(q_hi, 0)
        carry_lo += tl.sum(q_lo, 0)

        if pid_d == 0:  # the weights, once per row
            qw = _round_half_even(w * tl.load(scales_ptr + 1))
            bad = tl.maximum(bad, tl.max(tl.where(tl.abs(qw) < LIMIT, 0, 1), 0))
            qwi = tl.where(valid, qw, 0.0).to(tl.int64)
            qw_hi = qwi >> LIMB_BITS
            qw_lo = qwi & LIMB_MASK
            pw_hi = wcarry_hi + tl.cumsum(qw_hi, 0)
            pw_lo = wcarry_lo + tl.cumsum(qw_lo, 0)
            tl.atomic_add(counts_ptr + lab, pw_hi, mask=run_end, sem="relaxed")
            tl.atomic_add(counts_ptr + n_clusters + lab, pw_lo, mask=run_end, sem="relaxed")
            tl.atomic_add(counts_ptr + lab_next, -pw_hi, mask=hands_over, sem="relaxed")
            tl.atomic_add(counts_ptr + n_clusters + lab_next, -pw_lo, mask=hands_over, sem="relaxed")
            wcarry_hi += tl.sum(qw_hi, 0)
            wcarry_lo += tl.sum(qw_lo, 0)
    tl.store(overflow_ptr + pid_n * tl.num_programs(1) + pid_d, bad)


def _scale_for(x2: torch.Tensor, weights) -> fp.FixedPointScale:
    """reference._single_call_scale without forming the float64 rows: max_i |x_i w| = (max_i |x_i|) |w| exactly,
    because float64 rounding is monotone."""
    if x2.numel() == 0:
        if weights is None:
            max_w = 1.0 if x2.shape[0] else 0.0
        else:
            max_w = float(weights.to(torch.float64).abs().max()) if weights.numel() else 0.0
        return fp.FixedPointScale.from_bounds(0.0, max_w, 0.0)
    row_max = x2.abs().amax(dim=1).to(torch.float64)
    if weights is None:
        return fp.FixedPointScale.from_bounds(float(row_max.max()), 1.0, 0.0)
    w = weights.to(torch.float64).abs()
    return fp.FixedPointScale.from_bounds(float((row_max * w).max()), float(w.max()), 0.0)


def sort_inverse_update(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, weights=None, *,
                        scale: fp.FixedPointScale | None = None) -> reference.Partials:
    """Exact partial sums of the rows of x per label: bitwise `reference.partial_sums(x, labels, n_clusters,
    weights, scale=scale)`, and called the same way (a drop-in for it).

    Batched x (B, N, D) with labels (B, N) (and weights (B, N)) is one launch: labels are offset by b * n_clusters
    and the result has sums (2, B, K, D), weights (2, B, K), equal to stacking the per-batch reference results
    computed with the same `scale` (by default one scale for all batches, from the whole x).
    """
    batched = x.dim() == 3
    bsz = x.shape[0] if batched else 1
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    labels = torch.as_tensor(labels, device=x.device).reshape(-1).to(torch.int64)
    if weights is not None:
        weights = torch.as_tensor(weights, device=x.device).reshape(-1)
    if labels.shape[0] != x2.shape[0] or (weights is not None and weights.shape[0] != x2.shape[0]):
        raise ValueError("x, labels and weights must have the same number of rows")
    if batched:
        labels = labels + torch.arange(bsz, device=x.device).repeat_interleave(x.shape[1]) * n_clusters
    total = bsz * n_clusters
    if scale is None:
        scale = _scale_for(x2, weights)
    n = x2.shape[0]
    sums = torch.zeros((2, total, d), dtype=torch.int64, device=x.device)
    counts = torch.zeros((2, total), dtype=torch.int64, device=x.device)
    if n and d:
        key = labels.to(torch.int32) if total < 2 ** 31 else labels
        sorted_labels, perm = torch.sort(key)
        lo_hi = torch.stack([sorted_labels[0], sorted_labels[-1]]).tolist()
        if lo_hi[0] < 0 or lo_hi[1] >= total:
            raise IndexError(f"labels must lie in [0, {n_clusters}), got range [{lo_hi[0]}, {lo_hi[1]}]")
        cfg = update_config(x.device, d, x.dtype)
        d_blocks = triton.cdiv(d, cfg.block_d)
        # enough long programs to fill the device a few times over; each touches memory per run end only
        rows_per_program = triton.cdiv(triton.cdiv(n, max(1, cfg.programs // d_blocks)), cfg.block_n) * cfg.block_n
        grid = (triton.cdiv(n, rows_per_program), d_blocks)
        overflow = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device)
        scales = torch.tensor([2.0 ** scale.sum_exp, 2.0 ** scale.weight_exp], dtype=torch.float64,
                              device=x.device)
        w_arg = weights if weights is not None else scales  # unused pointer when HAS_WEIGHTS is False
        launch(_segment_sums_kernel, grid,
               x2, x2.stride(0), x2.stride(1), w_arg, perm, sorted_labels, scales,
               sums, counts, overflow, n, rows_per_program, d, total,
               HAS_WEIGHTS=weights is not None, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
               num_warps=cfg.num_warps)
        if bool(overflow.any()):
            raise OverflowError(
                f"a value exceeds the fixed-point range chosen for this fit (2**{fp.VALUE_BITS} after scaling by "
                f"2**{scale.sum_exp} / 2**{scale.weight_exp}); the scale must be built from a bound on every value "
                f"summed")
    sums, counts = fp.normalize(sums), fp.normalize(counts)
    if batched:
        sums, counts = sums.reshape(2, bsz, n_clusters, d), counts.reshape(2, bsz, n_clusters)
    return reference.Partials(sums, counts, scale)
