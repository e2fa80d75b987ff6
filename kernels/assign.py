"""FlashAssign: nearest centroid of every row in one streaming pass, exact per the numerics contract.

A row pass turns x into centred, power-of-two scaled fp16 operands plus two numbers per row (|a|^2 and the error
bound E). Then one program owns BLOCK_N rows and streams all centroids through shared memory in BLOCK_K tiles;
the N x K distance matrix never exists. Scores come from fp16 tensor-core products with fp32 accumulation (the
fastest path on H100/H200, for every input dtype); the exact float64 distance of the chosen centroid is computed
from the original x at the end. Each row keeps its best and second-best score; the provable per-row bound
(below) decides whether the fast label is certainly the exact argmin. The few rows where it is not are resolved
exactly: a second pass of the same kernel collects every centroid that could still win, and those candidates
are compared in float64 (or, if there are too many, the row goes to `reference.assign`). Labels are therefore the exact float64 argmin up to float64 rounding (~1e-16), far
inside the contract, and ties go to the lowest index.

Why it is exact (everything in units scaled by alpha = 2**e, exact):
  a = alpha (x - s), b_c = alpha (c - s) exactly, with s the kernel's shift (fp32, from the data mean: a shift
  changes no exact distance, it only keeps the magnitudes that enter the bound small). Cosine: a = r x with r > 0
  a per-row power of two and b_c the float64 unit centroid; ranking by -a.b_c is the cosine ranking. The kernel
  ranks S(c) = cc_c - 2 a.b_c (+ the row constant aa): it computes d(c) = fl(aa + cc_c) + sum_i ah_i (-2 bh_ci),
  ah = fp16(a_comp), bh = fp16(b) (a_comp = a in fp32, one rounding in x - s). With Ea >= |a - ah| (measured
  per row from the exact fp32 residual a_comp - ah, plus u|a| for the centring), Eb >= max_c |b_c - bh_c|,
  Bh >= max |bh_c|, Bsq >= max cc_c, Ah >= |ah|, u = 2**-24 and gamma = (3 D_pad + 16) 2**-23 (a fp32
  accumulation of D_pad exact fp16 products, allowing truncating block-FMA tensor cores), every centroid has
      |d(c) - aa - S(c)| <= E = 2u Bsq + u (aa + Bsq) + gamma (aa + Bsq + 2 Ah Bh) + 2 (Ea Bh + Ah Eb + Ea Eb)
                                + 2**-13 sqrt(D_pad) (Ah + Bh)
  (cc rounding, the init add, the accumulation, a.b - ah.bh = ea.bh + ah.eb + ea.eb, and fp16 subnormals even if
  flushed), inflated for the rounding of the fp32 norms; the tests check the stored E against a sequential fp32
  accumulator that truncates every add. The best and second keys t1 <= t2 carry the in-tile index in their low
  log2(BLOCK_K) mantissa bits (|key - d| < BLOCK_K 2**-23 |key| =: T|key|). If
      (t2 - t1) - T (|t1| + |t2|) > 2 E
  then S(label) < S(c) for every other c: the label is the unique exact argmin. Otherwise every c that can still
  win has d(c) - aa <= t1 + T|t1| - aa + 2E (the row's `threshold`), which the collect pass uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference
from .config import AssignConfig, assign_config, launch

MAX_CANDIDATES = 8  # a flagged row with more possible winners than this goes to reference.assign
_FAR = 1.0e38  # score of padded centroid columns: finite, so margins stay finite (K = 1 works)
_ALPHA_TARGET_EXP = 10  # alpha * max|c - s| lands in [2**9, 2**10): rows up to 64x farther still fit fp16
_COSINE_ALPHA = 2.0 ** 12  # unit rows: coordinates <= 1 -> <= 4096
_EXACT_ELEMENTS = 1 << 25  # float64 elements (rows x candidates x D) per exact candidate check: 256 MiB
_FORCE_TOP2_REDUCE = False  # tests: run the GPU's one-pass top-2 reduction in the interpreter too


# ----------------------------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _centred_tile(x_ptr, row_off, offs_d, D, stride_xd, shift_ptr, row_scale, row_mask):
    """fp32 tile (x - s) * row_scale, zero outside the data: the kernel's `a_comp`."""
    d_mask = offs_d < D
    m = row_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + row_off[:, None] + offs_d[None, :].to(tl.int64) * stride_xd, mask=m, other=0.0)
    s = tl.load(shift_ptr + offs_d, mask=d_mask, other=0.0)
    a = (x.to(tl.float32) - s[None, :]) * row_scale[:, None]
    return tl.where(m, a, 0.0)


@triton.jit
def _top2_combine(a1, a2, b1, b2):
    """(smallest, second smallest) of two pairs: 3 min/max per score in a sequential reduction."""
    return tl.minimum(a1, b1), tl.minimum(tl.maximum(a1, b1), tl.minimum(a2, b2))


@triton.jit
def _score_keys(acc, offs_k, BLOCK_K: tl.constexpr, LOP3: tl.constexpr):
    """Scores with the in-tile index in their low log2(BLOCK_K) mantissa bits: (bits & -BLOCK_K) | k.
    LOP3: one PTX lop3 per score (ptxas emits and + or otherwise); GPU only, the interpreter has no inline asm."""
    bits = acc.to(tl.int32, bitcast=True)
    if LOP3:
        idx = offs_k[None, :] + tl.zeros(acc.shape, tl.int32)
        mask = tl.full(acc.shape, -BLOCK_K, tl.int32)
        key = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [bits, mask, idx],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        key = (bits & (-BLOCK_K)) | offs_k[None, :]
    return key.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["stride_xb", "n_rows"])
def _rows_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, shift_ptr, stats_ptr, a_ptr, rowstat_ptr,
    n_rows, n_pad, D, d_pad,
    COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row pass: the fp16 operand ah = fp16(a_comp) of every row (zero-padded to (n_pad, d_pad)), and per row
    aa = |a_comp|^2 and the error bound E. Keeping this out of the streaming kernel lets its x tile come straight
    from memory into shared memory (tensor-core operands read from there; far fewer registers)."""
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    pad_mask = rows < n_pad
    row_off = pid_b.to(tl.int64) * stride_xb + rows.to(tl.int64) * stride_xn
    out_off = pid_b.to(tl.int64) * n_pad + rows
    offs_d = tl.arange(0, BLOCK_D)
    shift_ptr += pid_b * D
    alpha = tl.load(stats_ptr + pid_b * 4 + 0)
    b_hat = tl.load(stats_ptr + pid_b * 4 + 1)
    e_b = tl.load(stats_ptr + pid_b * 4 + 2)
    b_sq = tl.load(stats_ptr + pid_b * 4 + 3)

    # per-row scale: alpha, or for cosine the power of two just below alpha/|x| (so x * scale is exact)
    row_scale = tl.zeros([BLOCK_N], dtype=tl.float32) + alpha
    if COSINE:
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d_pad, BLOCK_D):
            xr = _centred_tile(x_ptr, row_off, d0 + offs_d, D, stride_xd, shift_ptr, row_scale * 0.0 + 1.0,
                               row_mask)
            sq += tl.sum(xr * xr, 1)
        r = alpha / tl.sqrt(tl.where(sq > 0.0, sq, 1.0))
        row_scale = (r.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)

    aa = tl.zeros([BLOCK_N], dtype=tl.float32)
    ah_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    res_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d_pad, BLOCK_D):
        a = _centred_tile(x_ptr, row_off, d0 + offs_d, D, stride_xd, shift_ptr, row_scale, row_mask)
        a16 = a.to(tl.float16)
        ah = a16.to(tl.float32)
        res = a - ah  # exact in fp32
        aa += tl.sum(a * a, 1)
        ah_sq += tl.sum(ah * ah, 1)
        res_sq += tl.sum(res * res, 1)
        tl.store(a_ptr + out_off[:, None] * d_pad + (d0 + offs_d)[None, :], a16, mask=pad_mask[:, None])

    # the error bound E of the module docstring, every norm inflated for its own fp32 rounding
    # (stored per row; the tests check it against a sequential fp32 accumulator that truncates every add)
    slack = 1.0 + (d_pad + 8) * 1.1920928955078125e-07
    # (+1.1e-19 >= sqrt(2**-126): a flush-to-zero approximate sqrt of a subnormal must not shrink a norm)
    a_hat = tl.sqrt(ah_sq) * slack + 1.1e-19
    e_a = tl.sqrt(res_sq) * slack + 1.01 * U * (tl.sqrt(aa) * slack + 1.1e-19) + 1.1e-19
    init = (aa + b_sq) * (1.0 + 2.0 * U)
    gamma = (3 * d_pad + 16) * 1.1920928955078125e-07
    # (+ 2**-13 sqrt(D) (|ah| + |bh|): products of fp16 subnormals, < 2**-14, even if tensor cores flushed them)
    err = 2.0 * U * b_sq + U * init + gamma * (init + 2.0 * a_hat * b_hat) \
        + 2.0 * (e_a * b_hat + a_hat * e_b + e_a * e_b) + 1.220703125e-04 * tl.sqrt(d_pad * 1.0) * (a_hat + b_hat)
    tl.store(rowstat_ptr + out_off * 2, aa, mask=pad_mask)
    tl.store(rowstat_ptr + out_off * 2 + 1, err, mask=pad_mask)


@triton.jit(do_not_specialize=["stride_xb", "n_rows"])
def _assign_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, a_ptr, rowstat_ptr,
    cf_ptr, cc_ptr, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
    labels_ptr, dist_ptr, flag_ptr, thr_ptr, cand_ptr, count_ptr,
    n_rows, n_pad, D, k_pad, d_pad,
    COSINE: tl.constexpr, COLLECT: tl.constexpr, MAX_CAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
    EPI_D: tl.constexpr, LOP3: tl.constexpr, TOP2_REDUCE: tl.constexpr,
):
    """Streaming pass: scores of BLOCK_N prepared rows against every centroid tile, running best/second key per
    row (or, COLLECT, every centroid under the row's threshold), then the margin test and the exact distance."""
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    out_off = pid_b.to(tl.int64) * n_rows + rows
    a_off = pid_b.to(tl.int64) * n_pad + rows  # prepared rows are padded to n_pad: no masks in the stream
    a_rows = a_ptr + a_off[:, None] * d_pad
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    cf_ptr += pid_b.to(tl.int64) * k_pad * d_pad
    cc_ptr += pid_b.to(tl.int64) * k_pad
    aa = tl.load(rowstat_ptr + a_off * 2)

    if COLLECT:
        thr = tl.load(thr_ptr + out_off, mask=row_mask, other=-float("inf"))
    if RESIDENT:
        a_fast = tl.load(a_rows + offs_d[None, :])
    best = tl.full([BLOCK_N], 3.0e38, tl.float32)
    second = tl.full([BLOCK_N], 3.0e38, tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)

    for k0 in range(0, k_pad, BLOCK_K):
        cc = tl.load(cc_ptr + k0 + offs_k)
        acc = aa[:, None] + cc[None, :]
        c_rows = cf_ptr + (k0 + offs_k)[:, None].to(tl.int64) * d_pad
        if RESIDENT:
            c = tl.load(c_rows + offs_d[None, :])
            acc = tl.dot(a_fast, tl.trans(c), acc)
        else:
            for d0 in range(0, d_pad, BLOCK_D):
                a_chunk = tl.load(a_rows + d0 + offs_d[None, :])
                c = tl.load(c_rows + d0 + offs_d[None, :])
                acc = tl.dot(a_chunk, tl.trans(c), acc)
        if COLLECT:
            # every centroid that may still beat the stage-1 label: d - aa <= threshold (rounding allowed for)
            rel = (acc - aa[:, None]) - 2.0 * U * (tl.abs(acc) + aa[:, None])
            hit = (rel <= thr[:, None]) & row_mask[:, None]
            h = hit.to(tl.int32)
            pos = count[:, None] + tl.cumsum(h, 1) - h
            tl.store(cand_ptr + out_off[:, None] * MAX_CAND + pos, (k0 + offs_k)[None, :] + 0 * pos,
                     mask=hit & (pos < MAX_CAND))
            count += tl.sum(h, 1)
        else:
            # key = score with its in-tile index in the low mantissa bits: one min gives value and argmin
            key = _score_keys(acc, offs_k, BLOCK_K, LOP3)
            if TOP2_REDUCE:  # one pass (3 min/max per score); the interpreter runs custom combines slowly
                t1, t2 = tl.reduce((key, tl.full(key.shape, 3.0e38, tl.float32)), 1, _top2_combine)
            else:  # keys are distinct (distinct index bits), so dropping the minimum leaves the second
                t1 = tl.min(key, 1)
                t2 = tl.min(tl.where(key == t1[:, None], 3.0e38, key), 1)
            i1 = (t1.to(tl.int32, bitcast=True) & (BLOCK_K - 1)) + k0
            better = t1 < best  # strict: an earlier tile keeps a tie (and the tie shows as a zero margin)
            second = tl.where(better, tl.minimum(best, t2), tl.minimum(second, t1))
            best_idx = tl.where(better, i1, best_idx)
            best = tl.where(better, t1, best)

    if COLLECT:
        tl.store(count_ptr + out_off, count, mask=row_mask)
    else:
        bound = 2.0 * tl.load(rowstat_ptr + a_off * 2 + 1) * (1.0 + 1.52587890625e-05)
        trunc = BLOCK_K * 1.1920928955078125e-07 + 2.384185791015625e-07
        gap = (second - best) * (1.0 - 2.384185791015625e-07) - trunc * (tl.abs(best) + tl.abs(second)) - 1e-36
        exact = gap > bound  # False for NaN / inf bounds: such rows are re-checked
        thr_out = best + trunc * tl.abs(best) - aa + bound
        thr_out += 4.0 * U * (tl.abs(best) + aa + bound) + bound * 0.00390625 + 1e-30
        # a non-finite bound (fp16 overflow, inf/NaN input) says nothing about candidates: NaN sends the row to
        # reference.assign (no centroid passes a NaN threshold)
        thr_out = tl.where(bound <= 3.0e38, thr_out, float("nan"))
        tl.store(labels_ptr + out_off, best_idx.to(tl.int64), mask=row_mask)
        tl.store(flag_ptr + out_off, (~exact).to(tl.int8), mask=row_mask)
        tl.store(thr_ptr + out_off, thr_out, mask=row_mask)

        # exact float64 distance to the chosen centroid, as reference.assign computes it
        row_off = pid_b.to(tl.int64) * stride_xb + rows.to(tl.int64) * stride_xn
        offs_e = tl.arange(0, EPI_D)
        c_off = pid_b.to(tl.int64) * stride_cdb + best_idx.to(tl.int64) * stride_cdk
        total = tl.zeros([BLOCK_N], dtype=tl.float64)
        inv_norm = tl.zeros([BLOCK_N], dtype=tl.float64) + 1.0
        if COSINE:
            nsq = tl.zeros([BLOCK_N], dtype=tl.float64)
            for d0 in range(0, D, EPI_D):
                m = row_mask[:, None] & ((d0 + offs_e) < D)[None, :]
                xv = tl.load(x_ptr + row_off[:, None] + (d0 + offs_e)[None, :].to(tl.int64) * stride_xd,
                             mask=m, other=0.0).to(tl.float64)
                nsq += tl.sum(xv * xv, 1)
            norm = tl.sqrt(nsq)
            inv_norm = 1.0 / tl.where(norm > 0.0, norm, 1.0)  # (reference divides each element: ~1 ulp apart)
        for d0 in range(0, D, EPI_D):
            m = row_mask[:, None] & ((d0 + offs_e) < D)[None, :]
            xv = tl.load(x_ptr + row_off[:, None] + (d0 + offs_e)[None, :].to(tl.int64) * stride_xd,
                         mask=m, other=0.0).to(tl.float64)
            cv = tl.load(cd_ptr + c_off[:, None] + (d0 + offs_e)[None, :].to(tl.int64) * stride_cdd,
                         mask=m, other=0.0).to(tl.float64)
            if COSINE:
                total += tl.sum((xv * inv_norm[:, None]) * cv, 1)
            else:
                diff = xv - cv
                total += tl.sum(diff * diff, 1)
        if COSINE:
            total = tl.minimum(tl.maximum(1.0 - total, 0.0), 2.0)
        tl.store(dist_ptr + out_off, total.to(tl.float32), mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# host side


@dataclass
class _Prepared:
    """Per-call operands of the kernel, batched (B, ...)."""

    cfg: AssignConfig
    cosine: bool
    x: torch.Tensor  # (B, N, D) original
    centroids: torch.Tensor  # (B, K, D) original
    shift64: torch.Tensor | None  # (B, D) float64: the reference's shift (None for cosine)
    c_fast: torch.Tensor  # (B, K_pad, D_pad) fp16: -2 * fp16(alpha (c - s))
    cc: torch.Tensor  # (B, K_pad) fp32
    sigma: torch.Tensor  # (B, D) fp32: the kernel's shift s
    stats: torch.Tensor  # (B, 4) fp32: alpha, Bh, Eb, Bsq (upper bounds)
    c_dist: torch.Tensor  # (B, K, D): centroids the exact distance is taken to (float64 unit rows for cosine)
    a_fast: torch.Tensor | None = None  # (B, N_pad, D_pad) fp16 prepared rows (the row pass)
    rowstat: torch.Tensor | None = None  # (B, N_pad, 2) fp32: aa, E


@dataclass
class FastAssignment:
    """Stage-1 result: labels exact wherever `flagged` is False."""

    labels: torch.Tensor  # int64 (B, N)
    min_dist: torch.Tensor  # float32 (B, N), exact for the returned label
    flagged: torch.Tensor  # bool (B, N): margin under the error bound
    threshold: torch.Tensor  # float32 (B, N): collect-pass threshold on d - aa


def _round_up_f32(v: torch.Tensor) -> torch.Tensor:
    return (v.to(torch.float64) * (1.0 + 2.0 ** -20)).to(torch.float32)


def _kernel_shift(x: torch.Tensor, centroids64: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """fp32 shift s per (b, d). Any s is exact; this one keeps fp16 input exact after centring: for fp16/bf16 x
    s is mu on x's own grid (x - s then exact by Sterbenz near mu), or 0 where mu is inside the spread of the
    centroids (no cancellation to avoid, and x - 0 is exact)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return mu.to(torch.float32)
    spread = (centroids64 - mu[:, None, :]).abs().amax(dim=1)
    snapped = mu.to(x.dtype).to(torch.float64)
    snapped = torch.where(torch.isfinite(snapped), snapped, mu)
    return torch.where(mu.abs() <= spread, torch.zeros_like(mu), snapped).to(torch.float32)


def _prepare(x: torch.Tensor, centroids: torch.Tensor, metric: str, shift) -> _Prepared:
    b, n, d = x.shape
    k = centroids.shape[1]
    dev = x.device
    cfg = assign_config(dev, k, d, x.dtype)
    cosine = metric == "cosine"
    c64 = centroids.to(torch.float64)
    if cosine:
        shift64 = None
        sigma = torch.zeros((b, d), dtype=torch.float32, device=dev)
        alpha = torch.full((b,), _COSINE_ALPHA, dtype=torch.float64, device=dev)
        c_dist = reference.unit_rows(c64)
        b64 = c_dist * _COSINE_ALPHA
        cc64 = torch.full((b, k), _COSINE_ALPHA ** 2, dtype=torch.float64, device=dev)
    else:
        if shift is None:
            shift64 = x.mean(dim=1, dtype=torch.float64) if n else torch.zeros((b, d), dtype=torch.float64,
                                                                                 device=dev)
        else:
            shift64 = torch.as_tensor(shift, dtype=torch.float64, device=dev)
            shift64 = shift64.expand(b, d) if shift64.dim() == 1 else shift64.reshape(b, d)
        sigma = _kernel_shift(x, c64, shift64)
        centred = c64 - sigma.to(torch.float64)[:, None, :]
        m = centred.abs().amax(dim=(1, 2))
        _, e = torch.frexp(m)  # m = f 2**e, f in [0.5, 1)
        exp = torch.where(m > 0, _ALPHA_TARGET_EXP - e, torch.zeros_like(e)).clamp(-120, 120)
        alpha = torch.pow(2.0, exp.to(torch.float64))
        b64 = centred * alpha[:, None, None]
        cc64 = (b64 * b64).sum(dim=2)
        c_dist = centroids
    b_fast = b64.to(torch.float16)
    bh64 = b_fast.to(torch.float64)
    e_b = torch.linalg.vector_norm(b64 - bh64, dim=2).amax(dim=1) * (1 + 2.0 ** -40) \
        + 2.0 ** -50 * torch.linalg.vector_norm(b64, dim=2).amax(dim=1)
    b_hat = torch.linalg.vector_norm(bh64, dim=2).amax(dim=1)
    cc = cc64.to(torch.float32)
    stats = torch.stack([alpha.to(torch.float32), _round_up_f32(b_hat), _round_up_f32(e_b),
                         cc.amax(dim=1)], dim=1).contiguous()
    k_pad, d_pad = cfg.padded_k(k), cfg.padded_d(d)
    c_fast = torch.zeros((b, k_pad, d_pad), dtype=torch.float16, device=dev)
    c_fast[:, :k, :d] = b_fast * -2.0
    cc_pad = torch.full((b, k_pad), _FAR, dtype=torch.float32, device=dev)
    cc_pad[:, :k] = cc
    return _Prepared(cfg, cosine, x, centroids, shift64, c_fast, cc_pad, sigma.contiguous(), stats, c_dist)


def _prepare_rows(p: _Prepared) -> None:
    """The row pass: fp16 operands and (aa, E) of every row of x."""
    b, n, d = p.x.shape
    cfg = p.cfg
    n_pad = triton.cdiv(n, cfg.block_n) * cfg.block_n
    d_pad = p.c_fast.shape[2]
    p.a_fast = torch.empty((b, n_pad, d_pad), dtype=torch.float16, device=p.x.device)
    p.rowstat = torch.empty((b, n_pad, 2), dtype=torch.float32, device=p.x.device)
    x = p.x
    launch(_rows_kernel, (n_pad // cfg.block_n, b),
           x, x.stride(0), x.stride(1), x.stride(2), p.sigma, p.stats, p.a_fast, p.rowstat,
           n, n_pad, d, d_pad, COSINE=p.cosine, BLOCK_N=cfg.block_n, BLOCK_D=cfg.row_block_d,
           num_warps=cfg.num_warps, num_stages=2)


def _run_kernel(p: _Prepared, a_fast, rowstat, n: int, *, collect: bool, labels, dist, flag, thr, cand, count):
    b, n_pad, d_pad = a_fast.shape
    cfg = p.cfg
    x = p.x
    block_n = _collect_block_n(cfg) if collect else cfg.block_n
    launch(_assign_kernel, (n_pad // block_n, b),
           x, x.stride(0), x.stride(1), x.stride(2), a_fast, rowstat,
           p.c_fast, p.cc, p.c_dist, p.c_dist.stride(0), p.c_dist.stride(1), p.c_dist.stride(2),
           labels, dist, flag, thr, cand, count,
           n, n_pad, x.shape[2], p.c_fast.shape[1], d_pad,
           COSINE=p.cosine, COLLECT=collect, MAX_CAND=MAX_CANDIDATES,
           # (collect: narrow centroid tiles, its per-tile scan needs shared memory; padding stays a multiple)
           BLOCK_N=block_n, BLOCK_K=min(cfg.block_k, 32) if collect else cfg.block_k, BLOCK_D=cfg.block_d,
           RESIDENT=cfg.resident, EPI_D=cfg.epilogue_d, LOP3=not cfg.interpreted,
           TOP2_REDUCE=not cfg.interpreted or _FORCE_TOP2_REDUCE,
           num_warps=4 if collect else cfg.num_warps, num_stages=2 if collect else cfg.num_stages)


def _collect_block_n(cfg: AssignConfig) -> int:
    """Short row tiles for the collect pass: it sees only the few flagged rows, and more programs fill the GPU."""
    return min(cfg.block_n, 64)


def _fast_pass(p: _Prepared) -> FastAssignment:
    b, n, _ = p.x.shape
    dev = p.x.device
    _prepare_rows(p)
    labels = torch.empty((b, n), dtype=torch.int64, device=dev)
    dist = torch.empty((b, n), dtype=torch.float32, device=dev)
    flag = torch.empty((b, n), dtype=torch.int8, device=dev)
    thr = torch.empty((b, n), dtype=torch.float32, device=dev)
    dummy = torch.empty(1, dtype=torch.int32, device=dev)
    _run_kernel(p, p.a_fast, p.rowstat, n, collect=False, labels=labels, dist=dist, flag=flag, thr=thr,
                cand=dummy, count=dummy)
    return FastAssignment(labels, dist, flag.bool(), thr)


def _as_batched(x: torch.Tensor, centroids: torch.Tensor):
    if x.dim() == 2:
        if centroids.dim() != 2 or centroids.shape[1] != x.shape[1]:
            raise ValueError(f"centroids {tuple(centroids.shape)} do not match x {tuple(x.shape)}")
        return x[None], centroids[None], False
    if x.dim() != 3 or centroids.dim() != 3 or centroids.shape[0] != x.shape[0] or centroids.shape[2] != x.shape[2]:
        raise ValueError(f"batched x (B, N, D) needs centroids (B, K, D); got {tuple(x.shape)}, "
                         f"{tuple(centroids.shape)}")
    return x, centroids, True


def fast_assign(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", shift=None
                ) -> FastAssignment:
    """Stage 1 only (the row pass and one streaming launch), for tests and diagnostics: labels are exact where
    not `flagged`. Results are batched (B, N) even for 2-D input."""
    reference.check_metric(metric)
    xb, cb, _ = _as_batched(x, centroids)
    if xb.dtype == torch.float64 or xb.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fast_assign takes fp16, bf16 or fp32 input, got {xb.dtype}")
    return _fast_pass(_prepare(xb, cb, metric, shift))


def _exact_among(x_rows: torch.Tensor, cands: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor,
                 cosine: bool):
    """float64 argmin over each row's candidate list (ascending indices: ties -> lowest index)."""
    labels, dists = [], []
    chunk = max(1024, _EXACT_ELEMENTS // max(1, cands.shape[1] * x_rows.shape[1]))
    for r0 in range(0, x_rows.shape[0], chunk):
        xr = x_rows[r0:r0 + chunk].to(torch.float64)
        cr = cands[r0:r0 + chunk].long()
        valid = torch.arange(cr.shape[1], device=cr.device)[None, :] < counts[r0:r0 + chunk, None]
        cvec = centroids[cr.clamp_min(0)]  # (R, M, D) float64 (unit rows for cosine)
        if cosine:
            score = -(reference.unit_rows(xr)[:, None, :] * cvec).sum(dim=2)
        else:
            diff = xr[:, None, :] - cvec
            score = (diff * diff).sum(dim=2)
        score = torch.where(valid, score, torch.full_like(score, float("inf")))
        best, arg = score.min(dim=1)
        labels.append(cr.gather(1, arg[:, None])[:, 0])
        dists.append((1.0 + best).clamp(0.0, 2.0) if cosine else best)
    return torch.cat(labels), torch.cat(dists)


def _resolve(p: _Prepared, fast: FastAssignment) -> None:
    """Make the flagged rows exact, in place: collect pass, float64 among candidates, reference as last resort."""
    idx = fast.flagged.nonzero()
    if idx.shape[0] == 0:
        return
    bsz, _, d = p.x.shape
    dev = p.x.device
    bi, ni = idx[:, 0], idx[:, 1]
    per_batch = torch.bincount(bi, minlength=bsz)
    starts = torch.cumsum(per_batch, 0) - per_batch
    pos = torch.arange(idx.shape[0], device=dev) - starts[bi]
    f_max = int(per_batch.max())
    f_pad = triton.cdiv(f_max, _collect_block_n(p.cfg)) * _collect_block_n(p.cfg)
    # the flagged rows' prepared operands and aa, bit for bit those of stage 1 (the threshold relies on it)
    af = torch.zeros((bsz, f_pad, p.a_fast.shape[2]), dtype=torch.float16, device=dev)
    af[bi, pos] = p.a_fast[bi, ni]
    rs = torch.zeros((bsz, f_pad, 2), dtype=torch.float32, device=dev)
    rs[bi, pos] = p.rowstat[bi, ni]
    thr = torch.full((bsz, f_max), -float("inf"), dtype=torch.float32, device=dev)
    thr[bi, pos] = fast.threshold[bi, ni]
    cand = torch.full((bsz, f_max, MAX_CANDIDATES), -1, dtype=torch.int32, device=dev)
    count = torch.zeros((bsz, f_max), dtype=torch.int32, device=dev)
    dummy = torch.empty(1, dtype=torch.int32, device=dev)
    _run_kernel(p, af, rs, f_max, collect=True, labels=dummy, dist=dummy, flag=dummy, thr=thr, cand=cand,
                count=count)

    cnt = count[bi, pos]
    ok = (cnt >= 1) & (cnt <= MAX_CANDIDATES)
    used = max(1, int(cnt.clamp(max=MAX_CANDIDATES).max()))  # usually 2 or 3 of the MAX_CANDIDATES slots
    centroid_rows = p.c_dist.to(torch.float64) if p.cosine else p.centroids.to(torch.float64)
    if bool(ok.any()):
        sel = ok.nonzero()[:, 0]
        flat_cands = cand[bi[sel], pos[sel], :used].long() + (bi[sel] * p.centroids.shape[1])[:, None]
        lab, dist = _exact_among(p.x[bi[sel], ni[sel]], flat_cands, cnt[sel],
                                 centroid_rows.reshape(-1, d), p.cosine)
        fast.labels[bi[sel], ni[sel]] = lab - bi[sel] * p.centroids.shape[1]
        fast.min_dist[bi[sel], ni[sel]] = dist.to(torch.float32)
    if not bool(ok.all()):
        rest = (~ok).nonzero()[:, 0]
        for b in torch.unique(bi[rest]).tolist():
            rows = ni[rest][bi[rest] == b]
            shift = None if p.shift64 is None else p.shift64[b]
            lab, dist = reference.assign(p.x[b, rows], p.centroids[b], metric="cosine" if p.cosine else "euclidean",
                                         shift=shift)
            fast.labels[b, rows] = lab
            fast.min_dist[b, rows] = dist.to(torch.float32)


def flash_assign(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", shift=None):
    """Nearest centroid of every row: (labels int64, min_dist), the semantics of `reference.assign`.

    x (N, D) with centroids (K, D), or batched x (B, N, D) with centroids (B, K, D) in one launch. fp16, bf16 and
    fp32 run on the kernel (float64 goes to the reference). Labels are exact (see the module docstring);
    min_dist is the float64 distance to the chosen centroid, returned as float32.
    """
    reference.check_metric(metric)
    xb, cb, batched = _as_batched(x, centroids)
    if xb.dtype not in (torch.float16, torch.bfloat16, torch.float32) or cb.shape[1] == 0:
        return reference.assign(x, centroids, metric=metric, shift=shift)
    if xb.shape[1] == 0:
        shape = xb.shape[:2] if batched else xb.shape[1:2]
        return (torch.empty(shape, dtype=torch.int64, device=x.device),
                torch.empty(shape, dtype=torch.float32, device=x.device))
    p = _prepare(xb, cb, metric, shift)
    fast = _fast_pass(p)
    _resolve(p, fast)
    if batched:
        return fast.labels, fast.min_dist
    return fast.labels[0], fast.min_dist[0]
