"""Sort-inverse update: exact per-centroid sums of rows and weights, bitwise equal to `reference.partial_sums`.

Why sort: scattering every point into its centroid (atomics per point) serialises on popular centroids and, with
floats, is order-dependent. After argsort(labels) the points of one cluster form a contiguous run. The runs are cut
into chunks; each program reduces one chunk on chip, quantising its rows to the fit's fixed-point grid exactly as the
reference does (float64 x * float64 w, times 2**exp, round half to even), summing them as int64, and touches global
memory once: an int64 atomic add per 26-bit limb and feature at the chunk's end. Integer addition is order-free, so the
result does not depend on scheduling, chunking or the sort's tie order.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import fixed_point as fp
from . import reference
from .checks import DeferredChecks
from .config import launch, update_config

_FP32_EXACT = (torch.float16, torch.bfloat16, torch.float32)  # input an fp32 product by 2**exp keeps exact
_FP32_EXACT_SQUARE = (torch.float16,)  # whose square is a normal fp32 number (a bf16 square can be subnormal)


@triton.jit
def _round_half_even(v):
    """float round-half-to-even (torch.round) from floor alone: exact for |v| < 2**52 (2**23 in fp32), identity
    above. The interpreter's path; the GPU rounds and converts in one instruction (`_to_int64`)."""
    f = tl.floor(v)
    frac = v - f  # exact: the fractional part of a float is representable
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & f_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _to_int64(v, RNI: tl.constexpr, F64: tl.constexpr):
    """round-half-even(v) as int64, for |v| < 2**62. RNI (GPU only, the interpreter has no inline asm): one PTX
    cvt.rni per value, where the floor-based rounding and a conversion cost about ten instructions."""
    if RNI:
        if F64:
            return tl.inline_asm_elementwise("cvt.rni.s64.f64 $0, $1;", "=l,d", [v], dtype=tl.int64, is_pure=True,
                                             pack=1)
        else:
            return tl.inline_asm_elementwise("cvt.rni.s64.f32 $0, $1;", "=l,f", [v], dtype=tl.int64, is_pure=True,
                                             pack=1)
    else:
        return _round_half_even(v).to(tl.int64)


@triton.jit
def _power_of_two(exp):
    """2.0 ** exp in float64, exactly, for |exp| <= 1000: built from the exponent bits (the grid's exponents are
    plain integer arguments, so no scale tensor has to be copied to the device before the launch)."""
    return ((exp.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _flush(ptr, lo_offset, total, mask):
    """Add an exact int64 chunk total to the two 26-bit limb arrays (hi at ptr, lo at ptr + lo_offset); `normalize`
    carries later, so hi = total >> 26 and lo = total & (2**26 - 1) need no further care."""
    tl.atomic_add(ptr, total >> 26, mask=mask, sem="relaxed")
    tl.atomic_add(ptr + lo_offset, total & 67108863, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["sum_exp", "weight_exp"])  # (the grid of a new fit is no new kernel)
def _cluster_sums_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, perm_ptr, chunk_label_ptr, chunk_start_ptr, chunk_stop_ptr,
    sums_ptr, counts_ptr, overflow_ptr,
    D, n_clusters, sum_exp, weight_exp,
    HAS_WEIGHTS: tl.constexpr, SQUARE: tl.constexpr, FP32_PRODUCT: tl.constexpr, RNI: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program reduces one chunk (at most 2**10 rows) of one cluster's run in the sorted order and touches
    global memory once, at the end. Every value is quantised to q = round(v * 2**exp) (|q| < 2**52, else the
    overflow flag) and summed as int64 per element: a chunk's total stays below 2**10 * 2**52 = 2**62."""
    LIMIT: tl.constexpr = 4503599627370496.0  # 2**52
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    lab = tl.load(chunk_label_ptr + pid_c).to(tl.int64)
    start = tl.load(chunk_start_ptr + pid_c)
    stop = tl.load(chunk_stop_ptr + pid_c)
    idx = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    sum_scale = _power_of_two(sum_exp)
    weight_scale = _power_of_two(weight_exp)
    # per-element accumulators, reduced across rows once at the end (a per-tile cross-thread reduction costs more
    # than the arithmetic)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.int64)
    worst = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_N], dtype=tl.int64)
    w_worst = tl.zeros([BLOCK_N], dtype=tl.float32)
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
        if FP32_PRODUCT:  # fp16/bf16/fp32 (or the square of fp16) times a power of two: exact in fp32
            v = xv.to(tl.float32)
            if SQUARE:
                v = v * v
            v = v * sum_scale.to(tl.float32)
            worst = tl.maximum(worst, tl.abs(v))
            acc += _to_int64(v, RNI, False)
        else:
            v = xv.to(tl.float64)
            if SQUARE:
                v = v * v  # reference.weighted_rows: one IEEE product
            if HAS_WEIGHTS:
                v = v * w[:, None]  # reference.weighted_rows: one IEEE product
            v = v * sum_scale
            worst = tl.maximum(worst, tl.abs(v).to(tl.float32))  # (rounds up to 2**52 at the limit: still bad)
            acc += _to_int64(v, RNI, True)
        if pid_d == 0:  # the weights, once per row
            vw = w * weight_scale
            w_worst = tl.maximum(w_worst, tl.abs(vw).to(tl.float32))
            w_acc += _to_int64(vw, RNI, True)
    # (programs past the last piece have no rows: their totals are zero, and their sums' atomics are skipped)
    _flush(sums_ptr + lab * D + offs_d, n_clusters * D, tl.sum(acc, 0), d_mask & (offs_d * 0 + stop > start))
    if pid_d == 0:
        _flush(counts_ptr + lab, n_clusters, tl.sum(w_acc, 0), None)
    bad = tl.max(tl.max(tl.where(worst < LIMIT, 0, 1), 1), 0) | tl.max(tl.where(w_worst < LIMIT, 0, 1), 0)
    tl.store(overflow_ptr + pid_c * tl.num_programs(1) + pid_d, bad)


def _chunks(offsets: torch.Tensor, rows: int, n_programs: int):
    """(label, start, stop) for each of `n_programs` programs: each cluster's run in the sorted order (from
    `offsets`, the first position of every run and the end) cut into pieces of <= rows, then empty pieces
    (start == stop) for the programs beyond the last one. Built on the device: the grid is an upper bound on the
    number of pieces, so no count comes back to the host before the launch."""
    total = offsets.shape[0] - 1
    per = (offsets[1:] - offsets[:-1] + rows - 1) // rows
    ends = torch.cumsum(per, 0)
    chunk = torch.arange(n_programs, device=offsets.device)
    label = torch.searchsorted(ends, chunk, right=True).clamp_max(total - 1)  # (past the end: the last run)
    start = offsets[label] + (chunk - (ends - per)[label]) * rows
    stop = torch.where(chunk < ends[-1], torch.minimum(start + rows, offsets[label + 1]), start)
    return label, start, stop


def _scale_for(x2: torch.Tensor, weights, square: bool) -> fp.FixedPointScale:
    """reference._single_call_scale without forming the float64 rows: max_i |x_i w| = (max_i |x_i|) |w| exactly,
    because float64 rounding is monotone (and max x_i^2 = fl((max |x_i|)^2) for the same reason)."""
    if x2.numel() == 0:
        if weights is None:
            max_w = 1.0 if x2.shape[0] else 0.0
        else:
            max_w = float(weights.to(torch.float64).abs().max()) if weights.numel() else 0.0
        return fp.FixedPointScale.from_bounds(0.0, max_w, 0.0)
    row_max = x2.abs().amax(dim=1).to(torch.float64)
    if square:
        row_max = row_max * row_max
    if weights is None:
        return fp.FixedPointScale.from_bounds(float(row_max.max()), 1.0, 0.0)
    w = weights.to(torch.float64).abs()
    return fp.FixedPointScale.from_bounds(float((row_max * w).max()), float(w.max()), 0.0)


def _check_update(found: list, *, n_clusters: int, total: int, scale: fp.FixedPointScale) -> None:
    first, last, overflowed = found
    if first < 0 or last >= total:
        raise IndexError(f"labels must lie in [0, {n_clusters}), got range [{first}, {last}]")
    if overflowed:
        raise OverflowError(
            f"a value exceeds the fixed-point range chosen for this fit (2**{fp.VALUE_BITS} after scaling by "
            f"2**{scale.sum_exp} / 2**{scale.weight_exp}); the scale must be built from a bound on every value "
            f"summed")


def sort_inverse_update(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, weights=None, *,
                        scale: fp.FixedPointScale | None = None, square: bool = False,
                        deferred: DeferredChecks | None = None) -> reference.Partials:
    """Exact partial sums of the rows of x per label: bitwise `reference.partial_sums(x, labels, n_clusters,
    weights, scale=scale, square=square)`, and called the same way (a drop-in for it).

    Batched x (B, N, D) with labels (B, N) (and weights (B, N)) is one launch: labels are offset by b * n_clusters
    and the result has sums (2, B, K, D), weights (2, B, K), equal to stacking the per-batch reference results
    computed with the same `scale` (by default one scale for all batches, from the whole x).

    The range checks of labels and values wait for the device; with `deferred` they are queued there instead and
    raise at its `verify` (a Lloyd step reads them back with its other scalars, in one transfer).
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
        scale = _scale_for(x2, weights, square)
    n = x2.shape[0]
    sums = torch.zeros((2, total, d), dtype=torch.int64, device=x.device)
    counts = torch.zeros((2, total), dtype=torch.int64, device=x.device)
    if n and d:
        # the narrowest key: the radix sort makes one pass per byte (int16 halves the passes of int32 for K < 32767)
        key = labels.to(torch.int16 if total < 2 ** 15 - 1 else torch.int32 if total < 2 ** 31 - 1 else torch.int64)
        sorted_labels, perm = torch.sort(key)
        cfg = update_config(x.device, d, x.dtype)
        d_blocks = triton.cdiv(d, cfg.block_d)
        # short chunks: many independent programs hide the latency of the gathered rows (a long loop per
        # program cannot), at the price of one flush of atomics per chunk; <= 2**10 rows keep int64 totals exact
        rows = min(1 << 10, cfg.block_n * cfg.tiles_per_chunk)
        # run boundaries by binary search in the sorted labels (a histogram of few bins serialises on atomics)
        offsets = torch.searchsorted(sorted_labels, torch.arange(total + 1, dtype=key.dtype, device=x.device))
        # sum over runs of ceil(run / rows) <= n // rows + (number of runs): the grid, without asking the device
        label, start, stop = _chunks(offsets, rows, n // rows + min(total, n) + 1)
        grid = (label.shape[0], d_blocks)
        overflow = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device)
        w_arg = weights if weights is not None else overflow  # unused pointer when HAS_WEIGHTS is False
        launch(_cluster_sums_kernel, grid,
               x2, x2.stride(0), x2.stride(1), w_arg, perm, label, start, stop,
               sums, counts, overflow, d, total, scale.sum_exp, scale.weight_exp,
               HAS_WEIGHTS=weights is not None, SQUARE=square, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
               FP32_PRODUCT=weights is None and x.dtype in (_FP32_EXACT_SQUARE if square else _FP32_EXACT)
               and -126 <= scale.sum_exp <= 126,
               RNI=not cfg.interpreted, num_warps=cfg.num_warps)
        # a label out of range (even one that a narrow key wraps into range) only put a valid row into a wrong
        # run or none: memory-safe, and reported before any result is used, at once or at the caller's next wait
        found = torch.stack([*torch.aminmax(labels), overflow.max().to(torch.int64)])
        check = functools.partial(_check_update, n_clusters=n_clusters, total=total, scale=scale)
        if deferred is None:
            check(found.tolist())
        else:
            deferred.add(found, check)
    sums, counts = fp.normalize(sums), fp.normalize(counts)
    if batched:
        sums, counts = sums.reshape(2, bsz, n_clusters, d), counts.reshape(2, bsz, n_clusters)
    return reference.Partials(sums, counts, scale)
