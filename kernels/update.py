"""Sort-inverse update: exact per-centroid sums of rows and weights, bitwise equal to `reference.partial_sums`.

Why sort: scattering every point into its centroid (atomics per point) serialises on popular centroids and, with
floats, is order-dependent. After argsort(labels) the points of one cluster form a contiguous run. The runs are cut
into chunks; each program reduces one chunk on chip, quantising its rows to the fit's fixed-point grid exactly as the
reference does (float64 x * float64 w, times 2**exp, round half to even, two 26-bit limbs), and touches global
memory once: an int64 atomic add per limb and feature at the chunk's end. Integer addition is order-free, so the
result does not depend on scheduling, chunking or the sort's tie order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fixed_point as fp
from . import reference
from .config import launch, update_config

_FP32_EXACT = (torch.float16, torch.bfloat16, torch.float32)  # input an fp32 product by 2**exp keeps exact


@triton.jit
def _round_half_even(v):
    """float64 round-half-to-even (torch.round) from floor alone: exact for |v| < 2**52, identity above
    (libdevice rint is not available to the interpreter)."""
    f = tl.floor(v)
    frac = v - f  # exact: the fractional part of a float64 is representable
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & f_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _limbs(v, scale):
    """Fixed-point limbs of v * scale as exact float64 integers: q = round-half-even(v * scale), hi = floor(q / 2**26),
    lo = q - hi * 2**26 in [0, 2**26) (the int64 split q >> 26, q & (2**26 - 1), without integer work)."""
    q = _round_half_even(v * scale)
    hi = tl.floor(q * 1.4901161193847656e-08)  # 2**-26, exact
    return q, hi, q - hi * 67108864.0


@triton.jit
def _limbs_fp32(v, scale):
    """The same integer q as `_limbs` for unweighted fp16/bf16/fp32 input, in fp32 arithmetic (much cheaper than
    float64 on GPUs): v * scale is a power-of-two scaling, exact; q = round(v * scale) keeps at most 24 significant
    bits. The split is by truncation, hi = trunc(q / 2**26) and lo = q - hi * 2**26 = sign(q) (|q| mod 2**26):
    lo spans the bits of q below 2**26 (at most 24 of them), so it is exact in fp32. The limbs differ from the
    int64 split for negative q but sum to the same integer, which is all `normalize` and the totals depend on."""
    q = _round_half_even(v * scale)
    t = q * 1.4901161193847656e-08  # 2**-26, exact
    hi = tl.where(t >= 0.0, tl.floor(t), -tl.floor(-t))
    return q, hi, q - hi * 67108864.0


@triton.jit
def _cluster_sums_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, perm_ptr, chunk_label_ptr, chunk_start_ptr, chunk_stop_ptr, scales_ptr,
    sums_ptr, counts_ptr, overflow_ptr,
    D, n_clusters,
    HAS_WEIGHTS: tl.constexpr, FP32_LIMBS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program reduces one chunk (at most 2**26 rows) of one cluster's run in the sorted order and touches
    global memory once, at the end. Limb sums are kept as float64 integers: each limb is below 2**26 in magnitude,
    so up to 2**26 of them add exactly in any order (< 2**52), and integer work is left to the one flush."""
    LIMIT: tl.constexpr = 4503599627370496.0  # 2**52
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    lab = tl.load(chunk_label_ptr + pid_c).to(tl.int64)
    start = tl.load(chunk_start_ptr + pid_c)
    stop = tl.load(chunk_stop_ptr + pid_c)
    idx = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    sum_scale = tl.load(scales_ptr)
    weight_scale = tl.load(scales_ptr + 1)
    # per-element accumulators, reduced across rows once at the end (a per-tile cross-thread reduction costs more
    # than the arithmetic): int32 for the fp32 path (< tiles * 2**26 < 2**31), float64 integers otherwise
    if FP32_LIMBS:
        acc_hi = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.int32)
        acc_lo = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.int32)
    else:
        acc_hi = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
        acc_lo = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
    w_hi = tl.zeros([BLOCK_N], dtype=tl.float64)
    w_lo = tl.zeros([BLOCK_N], dtype=tl.float64)
    worst = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, stop, BLOCK_N):
        pos = t0 + idx
        valid = pos < stop
        row = tl.load(perm_ptr + pos, mask=valid, other=0).to(tl.int64)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + row, mask=valid, other=0.0).to(tl.float64)
        else:
            w = tl.where(valid, 1.0, 0.0).to(tl.float64)
        m = valid[:, None] & d_mask[None, :]
        xv = tl.load(x_ptr + row[:, None] * stride_xn + offs_d[None, :].to(tl.int64) * stride_xd, mask=m,
                     other=0.0)
        if FP32_LIMBS:
            q, hi, lo = _limbs_fp32(xv.to(tl.float32), sum_scale.to(tl.float32))
            worst = tl.maximum(worst, tl.abs(q))
            acc_hi += hi.to(tl.int32)
            acc_lo += lo.to(tl.int32)
        else:
            xv = xv.to(tl.float64)
            if HAS_WEIGHTS:
                xv = xv * w[:, None]  # reference.weighted_rows: one IEEE product
            q, hi, lo = _limbs(xv, sum_scale)
            worst = tl.maximum(worst, tl.abs(q).to(tl.float32))  # (rounds up to 2**52 at the limit: still bad)
            acc_hi += hi
            acc_lo += lo
        if pid_d == 0:  # the weights, once per row
            qw, whi, wlo = _limbs(w, weight_scale)
            worst = tl.maximum(worst, tl.abs(qw).to(tl.float32)[:, None])
            w_hi += whi
            w_lo += wlo
    flush_hi = tl.sum(acc_hi.to(tl.int64), 0)
    flush_lo = tl.sum(acc_lo.to(tl.int64), 0)
    tl.atomic_add(sums_ptr + lab * D + offs_d, flush_hi, mask=d_mask, sem="relaxed")
    tl.atomic_add(sums_ptr + n_clusters * D + lab * D + offs_d, flush_lo, mask=d_mask, sem="relaxed")
    if pid_d == 0:
        tl.atomic_add(counts_ptr + lab, tl.sum(w_hi, 0).to(tl.int64), sem="relaxed")
        tl.atomic_add(counts_ptr + n_clusters + lab, tl.sum(w_lo, 0).to(tl.int64), sem="relaxed")
    tl.store(overflow_ptr + pid_c * tl.num_programs(1) + pid_d, tl.max(tl.max(tl.where(worst < LIMIT, 0, 1), 1), 0))


def _chunks(sorted_labels: torch.Tensor, total: int, rows: int):
    """(label, start, stop) of every chunk: each cluster's run in the sorted order, cut into pieces of <= rows."""
    counts = torch.bincount(sorted_labels, minlength=total)
    offsets = torch.cumsum(counts, 0) - counts
    per = (counts + rows - 1) // rows
    n_chunks = int(per.sum())
    label = torch.repeat_interleave(torch.arange(total, device=counts.device), per, output_size=n_chunks)
    first = torch.cumsum(per, 0) - per
    start = offsets[label] + (torch.arange(n_chunks, device=counts.device) - first[label]) * rows
    stop = torch.minimum(start + rows, offsets[label] + counts[label])
    return label, start, stop


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
        # short chunks: many independent programs hide the latency of the gathered rows (a long loop per
        # program cannot), at the price of one flush of atomics per chunk
        rows = min(1 << 26, cfg.block_n * cfg.tiles_per_chunk)
        label, start, stop = _chunks(sorted_labels, total, rows)
        grid = (label.shape[0], d_blocks)
        overflow = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device)
        scales = torch.tensor([2.0 ** scale.sum_exp, 2.0 ** scale.weight_exp], dtype=torch.float64,
                              device=x.device)
        w_arg = weights if weights is not None else scales  # unused pointer when HAS_WEIGHTS is False
        launch(_cluster_sums_kernel, grid,
               x2, x2.stride(0), x2.stride(1), w_arg, perm, label, start, stop, scales,
               sums, counts, overflow, d, total,
               HAS_WEIGHTS=weights is not None, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
               FP32_LIMBS=weights is None and x.dtype in _FP32_EXACT and -126 <= scale.sum_exp <= 126,
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
