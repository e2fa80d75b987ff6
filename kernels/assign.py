"""FlashAssign: nearest centroid of every row in one streaming pass, exact per the numerics contract.

Two small kernels prepare the centroid side (shift s, scale alpha, fp16 operands and their bounds; no host
synchronisation). A row pass turns x into centred, power-of-two scaled fp16 operands plus two numbers per row
(|a|^2 and the error bound E). Then one program owns BLOCK_N rows and streams all centroids through shared memory
in BLOCK_K tiles; the N x K distance matrix never exists. Scores come from fp16 tensor-core products with fp32
accumulation (the fastest path on H100/H200, for every input dtype); the exact float64 distance of the chosen
centroid is computed from the original x at the end.

The streaming pass does two ALU operations per score (the min/max pipe bounds it on sm_90): one lop3 makes the
score's key (its place in the low bits: tile within the chunk, column within the slot) and one min folds it into the
row's running slot minimum. A tile's columns {2g, 2g + 1, BLOCK_K/2 + 2g, BLOCK_K/2 + 2g + 1} share slot g
(`slot_of`; on sm_90 they are four registers of one thread): BLOCK_K/4 slot minima per row, kept across a chunk of
up to 32 tiles, then reduced to the row's best key, the smallest key of its other slots, and the label. The
centroids of the best's slot in the other tiles of its chunk (its class: at most 4 x 32 = 128 of them) are not
covered by that second key (other chunks are: a chunk's best key bounds all of it): the class pass (`_class_kernel`,
rows sorted by class on the device) scores each row against its label's class and folds the smallest of the others
into the row's second. The finishing kernel (`_finish_kernel`) then runs the margin test with the provable per-row
bound (below): it decides whether the fast label is certainly the exact argmin. The few rows where it is not
(`flagged`) are appended to a list on the device. Where the call has a neighbour table (`neighbours`: large
calls, or a Lloyd step's chunks together), the neighbour tier settles most of them exactly from their centroid's
nearest centroids. The rest are resolved exactly by the resolve pass (`_resolve_kernel`,
persistent programs over the list): it streams the centroids again for those rows and keeps every centroid under the
row's threshold (a superset of the centroids that can still win), at most two per centroid tile as candidate slots
(a tile with more hits is remembered and checked whole); the float64 argmin over those is the label. The rare rows
it cannot settle (more than MAX_CANDIDATES candidates, wide hits in two tiles, a NaN bound) go to float64 brute
force over all centroids (`_brute_kernel`). No step waits for the host. Labels are therefore the exact float64
argmin up to float64 rounding (~1e-16), far inside the contract, and ties go to the lowest index.

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
  flushed), inflated for the rounding of the fp32 norms. Where D is streamed the accumulation starts from zero and
  fl(aa + cc_c) is added after it: gamma (aa + Bsq + 2 Ah Bh) becomes gamma 2 Ah Bh + 2u (aa + Bsq + 2 Ah Bh); from
  D_pad = `config.STREAM_CHAIN_MIN_D` on, chains of L products start from zero and G chains are summed by rounded
  adds, so gamma = (3 L + 16 + 1.01 (G - 1)) 2**-23 (`_tile_scores`, `_row_bound`).
  The tests check the stored E against a sequential fp32 accumulator that truncates every add. The best and
  second keys t1 <= t2 carry their place in their low key_low mantissa bits (`config.key_bits`, at most 7:
  |key - d| < 2**key_low 2**-23 |key| =: T|key|); the class pass
  gives plain scores of the same operands. Every other centroid lies in another slot of its chunk, in another
  chunk (whose best key the second already took), or in the label's class, so t2 is at most its key or score. If
      (t2 - t1) - T (|t1| + |t2|) > 2 E
  then S(label) < S(c) for every other c: the label is the unique exact argmin. Otherwise every c that can still
  win has d(c) - aa <= t1 + T|t1| - aa + 2E (the row's `threshold`), which the resolve pass uses: its own scores
  d'(c) of the same operands obey the same bound, so d'(c) - aa <= threshold for every c that can still win.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import compile_ahead, reference
from .config import AssignConfig, assign_config, key_bits, launch, next_pow2

MAX_CANDIDATES = 8  # a flagged row with more possible winners than this goes to float64 brute force
_FAR = 1.0e38  # score of padded centroid columns: finite, so margins stay finite (K = 1 works)
_ALPHA_TARGET_EXP = 10  # alpha * max|c - s| lands in [2**9, 2**10): rows up to 64x farther still fit fp16
_COSINE_ALPHA = 2.0 ** 12  # unit rows: coordinates <= 1 -> <= 4096
_FORCE_TOP2_REDUCE = False  # tests: the resolve pass's one-pass top-2 reduction in the interpreter too
SM90_STREAM = True  # sm_90: the warp-specialised streaming pass (assign_sm90); False: the portable kernel (A/B)
NEIGHBOUR_TIER = True  # flagged rows go through `neighbours` before the resolve pass (False: A/B, tests)


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
def _x_rows(pid_b, rows, stride_xb, stride_xn, XB16: tl.constexpr):
    """Element offsets of rows `rows` of batch pid_b in x. stride_xb is not specialised (it is N x D: a new N must
    not compile anew), so the compiler would assume nothing about it and load x element by element; XB16 (the
    launcher's `_xb16`) says it is a multiple of 16 or unused (B = 1), which keeps 16-byte loads."""
    off = pid_b.to(tl.int64) * stride_xb
    if XB16:
        off = tl.multiple_of(off, 16)
    return off + rows.to(tl.int64) * stride_xn


@triton.jit
def _top2_combine(a1, a2, b1, b2):
    """(smallest, second smallest) of two pairs: 3 min/max per score in a sequential reduction."""
    return tl.minimum(a1, b1), tl.minimum(tl.maximum(a1, b1), tl.minimum(a2, b2))


@triton.jit
def _row_top2(key, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(smallest, second smallest) key of every row. Columns are paired first: one min and one max make a sorted
    pair, which is its own top-2, so the tree of `_top2_combine` starts from BLOCK_K / 2 leaves: 3 min/max per
    score instead of 4 with (key, +inf) leaves (the min/max pipe is what bounds the streaming pass on sm_90)."""
    a, b = tl.split(tl.reshape(key, (BLOCK_N, BLOCK_K // 2, 2)))
    return tl.reduce((tl.minimum(a, b), tl.maximum(a, b)), 1, _top2_combine)


@triton.jit
def _resident_rows(a_rows, offs_d, aa, RESIDENT: tl.constexpr):
    """The row tile kept on chip for the whole centroid stream (unused placeholder when D is streamed)."""
    if RESIDENT:
        return tl.load(a_rows + offs_d[None, :])
    else:
        return aa


@triton.jit
def _add_rn(a, b, PTX: tl.constexpr):
    """a + b in fp32, rounded to nearest, as an instruction of its own. PTX: an add.rn that no compiler pass can
    fold into a tensor-core product (Triton rewrites `c + dot(x, y)` as `dot(x, y, c)`, one accumulation chain)."""
    if PTX:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def _tile_scores(aa, a_fast, a_rows, cf_ptr, cc_ptr, cidx, offs_d, d_pad,
                 BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr, PTX: tl.constexpr, CHAIN: tl.constexpr):
    """aa + |b|^2 - 2 a.b for a tile of centroids (indices cidx, contiguous in the streaming passes, gathered in
    the class pass): fp16 tensor-core products, fp32 accumulation. Resident rows: one accumulation chain from
    aa + |b|^2 (free as the product's accumulator; the sm_90 pass does the same). D streamed: the chain starts
    from zero and aa + |b|^2 is added after it, so the accumulation term of the error bound (D_pad roundings)
    no longer scales aa + |b|^2 (`_row_bound`; H200, blobs at N=1M K=4096 D=1024: 9.7 % of rows flagged
    instead of 18.2 %, assign 27.0 ms instead of 29.8, benchmarks/assign_ab.py). CHAIN > 0: the products of
    every CHAIN chunks of BLOCK_D features are one chain from zero, and the chains are summed by rounded adds
    (`_add_rn`), so the bound's accumulation term follows CHAIN BLOCK_D products, not D_pad (`_row_bound`)."""
    cc = tl.load(cc_ptr + cidx)
    acc = aa[:, None] + cc[None, :]
    c_rows = cf_ptr + cidx[:, None].to(tl.int64) * d_pad
    if RESIDENT:
        c = tl.load(c_rows + offs_d[None, :])
        acc = tl.dot(a_fast, tl.trans(c), acc)
    elif CHAIN == 0:
        prod = tl.zeros_like(acc)
        for d0 in range(0, d_pad, BLOCK_D):
            a_chunk = tl.load(a_rows + d0 + offs_d[None, :])
            c = tl.load(c_rows + d0 + offs_d[None, :])
            prod = tl.dot(a_chunk, tl.trans(c), prod)
        acc = _add_rn(acc, prod, PTX)
    else:
        prod = tl.zeros_like(acc)
        for g0 in range(0, d_pad, BLOCK_D * CHAIN):
            part = tl.zeros_like(acc)
            for j in tl.static_range(CHAIN):
                d = g0 + j * BLOCK_D + offs_d[None, :]
                inside = d < d_pad  # (past D_pad: zero products, which add exactly)
                part = tl.dot(tl.load(a_rows + d, mask=inside, other=0.0),
                              tl.trans(tl.load(c_rows + d, mask=inside, other=0.0)), part)
            prod = _add_rn(prod, part, PTX)
        acc = _add_rn(acc, prod, PTX)
    return acc


@triton.jit
def _row_bound(aa, a_hat, e_a, stats_ptr, pid_b, d_pad, FROM_ZERO: tl.constexpr, CHAIN_D: tl.constexpr):
    """The error bound E of the module docstring from a row's aa, |ah| and |a - ah| bounds and the centroid side's
    bounds (stats): one formula for the row pass and for `_bound_kernel` (rows kept across calls). FROM_ZERO: the
    scores' accumulation chain starts from zero and aa + |b|^2 is added after it (D streamed, `_tile_scores`).
    CHAIN_D > 0 (streamed): chains of at most CHAIN_D products each, summed by G - 1 rounded adds (G chains):
    sum_g |chain_g - its exact sum| + the adds' roundings <= ((3 CHAIN_D + 16) + 1.01 (G - 1)) 2**-23 sum |products|
    (each add errs by at most one ulp of its result, which the running sum |products| bounds)."""
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    b_hat = tl.load(stats_ptr + pid_b * 4 + 1)
    e_b = tl.load(stats_ptr + pid_b * 4 + 2)
    b_sq = tl.load(stats_ptr + pid_b * 4 + 3)
    init = (aa + b_sq) * (1.0 + 2.0 * U)
    if FROM_ZERO and CHAIN_D > 0:
        chains = (d_pad + CHAIN_D - 1) // CHAIN_D
        gamma = ((3 * tl.minimum(d_pad, CHAIN_D) + 16) + 1.01 * (chains - 1)) * 1.1920928955078125e-07
    else:
        gamma = (3 * d_pad + 16) * 1.1920928955078125e-07
    if FROM_ZERO:  # the chain errs by gamma sum |products| <= gamma 2 Ah Bh, the add after it by 2u |its sum|
        acc_err = gamma * 2.0 * a_hat * b_hat + 2.0 * U * (init + 2.0 * a_hat * b_hat)
    else:
        acc_err = gamma * (init + 2.0 * a_hat * b_hat)
    # (+ 2**-13 sqrt(D) (|ah| + |bh|): products of fp16 subnormals, < 2**-14, even if tensor cores flushed them)
    return 2.0 * U * b_sq + U * init + acc_err \
        + 2.0 * (e_a * b_hat + a_hat * e_b + e_a * e_b) + 1.220703125e-04 * tl.sqrt(d_pad * 1.0) * (a_hat + b_hat)


@triton.jit
def _row_pass(x_ptr, stride_xb, stride_xn, stride_xd, shift_ptr, stats_ptr, a_ptr, rowstat_ptr, rownorm_ptr,
              n_rows, n_pad, D, d_pad, pid_n, pid_b,
              COSINE: tl.constexpr, NORMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              XB16: tl.constexpr, FROM_ZERO: tl.constexpr, CHAIN_D: tl.constexpr):
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    pad_mask = rows < n_pad
    row_off = _x_rows(pid_b, rows, stride_xb, stride_xn, XB16)
    out_off = pid_b.to(tl.int64) * n_pad + rows
    offs_d = tl.arange(0, BLOCK_D)
    shift_ptr += pid_b * D
    alpha = tl.load(stats_ptr + pid_b * 4 + 0)

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
    tl.store(rowstat_ptr + out_off * 2, aa, mask=pad_mask)
    tl.store(rowstat_ptr + out_off * 2 + 1, _row_bound(aa, a_hat, e_a, stats_ptr, pid_b, d_pad, FROM_ZERO, CHAIN_D),
             mask=pad_mask)
    if NORMS:  # (kept rows: `_bound_kernel` recomputes E from these when the centroids change)
        tl.store(rownorm_ptr + out_off * 2, a_hat, mask=pad_mask)
        tl.store(rownorm_ptr + out_off * 2 + 1, e_a, mask=pad_mask)


@triton.jit(do_not_specialize=["stride_xb", "n_rows"])
def _rows_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, shift_ptr, stats_ptr, a_ptr, rowstat_ptr, rownorm_ptr, stale_ptr,
    n_rows, n_pad, D, d_pad,
    COSINE: tl.constexpr, KEPT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, XB16: tl.constexpr,
    FROM_ZERO: tl.constexpr, CHAIN_D: tl.constexpr,
):
    """Row pass: the fp16 operand ah = fp16(a_comp) of every row (zero-padded to (n_pad, d_pad)), and per row
    aa = |a_comp|^2 and the error bound E. Keeping this out of the streaming kernel lets its x tile come straight
    from memory into shared memory (tensor-core operands read from there; far fewer registers).
    KEPT (`PreparedRows`): the rows of an earlier call are still valid unless stale_ptr says otherwise (the
    kernel's shift or scale changed): then nothing is read or written; the norms behind E are stored too."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    if KEPT:
        if tl.load(stale_ptr) != 0:
            _row_pass(x_ptr, stride_xb, stride_xn, stride_xd, shift_ptr, stats_ptr, a_ptr, rowstat_ptr,
                      rownorm_ptr, n_rows, n_pad, D, d_pad, pid_n, pid_b, COSINE, True, BLOCK_N, BLOCK_D, XB16,
                      FROM_ZERO, CHAIN_D)
    else:
        _row_pass(x_ptr, stride_xb, stride_xn, stride_xd, shift_ptr, stats_ptr, a_ptr, rowstat_ptr, rownorm_ptr,
                  n_rows, n_pad, D, d_pad, pid_n, pid_b, COSINE, False, BLOCK_N, BLOCK_D, XB16, FROM_ZERO,
                  CHAIN_D)


@triton.jit
def _bound_kernel(rowstat_ptr, rownorm_ptr, stats_ptr, n_pad, d_pad, BLOCK_N: tl.constexpr, FROM_ZERO: tl.constexpr,
                  CHAIN_D: tl.constexpr):
    """E of kept rows for this call's centroids (`_row_bound` from the stored aa, |ah| and |a - ah| bounds)."""
    pid_b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    off = pid_b.to(tl.int64) * n_pad + rows
    aa = tl.load(rowstat_ptr + off * 2)
    err = _row_bound(aa, tl.load(rownorm_ptr + off * 2), tl.load(rownorm_ptr + off * 2 + 1), stats_ptr, pid_b,
                     d_pad, FROM_ZERO, CHAIN_D)
    tl.store(rowstat_ptr + off * 2 + 1, err)


@triton.jit
def _tagged_keys(acc, tag, low_mask, PTX: tl.constexpr):
    """Scores with a tag in their low bits: (bits & low_mask) | tag, tag one int32 per column.
    PTX: one lop3 per score in inline PTX (ptxas emits and + or otherwise); GPU only, the interpreter has no
    inline asm."""
    bits = acc.to(tl.int32, bitcast=True)
    if PTX:
        idx = tag[None, :] + tl.zeros(acc.shape, tl.int32)
        mask = low_mask + tl.zeros(acc.shape, tl.int32)
        key = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [bits, mask, idx],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        key = (bits & low_mask) | tag[None, :]
    return key.to(tl.float32, bitcast=True)


@triton.jit
def _slot_tags(offs_k, BLOCK_K: tl.constexpr):
    """Each tile column's place in its slot (see `slot_of`): (j & 1) + 2 (j >= BLOCK_K / 2)."""
    return (offs_k & 1) + 2 * (offs_k >= BLOCK_K // 2).to(tl.int32)


@triton.jit
def _fold_slots(key, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) keys -> (BLOCK_N, BLOCK_K / 4): the smallest of each slot's four columns
    {2g, 2g + 1, BLOCK_K/2 + 2g, BLOCK_K/2 + 2g + 1} (on sm_90 the four registers one thread holds)."""
    a, b = tl.split(tl.reshape(key, (BLOCK_N, BLOCK_K // 2, 2)))
    pair = tl.minimum(a, b)
    lo, hi = tl.split(tl.permute(tl.reshape(pair, (BLOCK_N, 2, BLOCK_K // 4)), (0, 2, 1)))
    return tl.minimum(lo, hi)


@triton.jit
def _chunk_top(run, c0, key_low, BLOCK_K: tl.constexpr):
    """A chunk's best key, the smallest key of its other slots, and the label of the best (slot ties -> lowest
    slot, which is the lowest label: equal keys carry the same tile and place)."""
    S: tl.constexpr = BLOCK_K // 4
    g = tl.arange(0, S)
    t1 = tl.min(run, 1)
    g1 = tl.minimum(tl.min(tl.where(run == t1[:, None], g[None, :], S), 1), S - 1)
    t2 = tl.min(tl.where(g[None, :] == g1[:, None], 3.0e38, run), 1)
    low = t1.to(tl.int32, bitcast=True) & ((1 << key_low) - 1)
    label = c0 + (low >> 2) * BLOCK_K + 2 * (g1 + S * ((low >> 1) & 1)) + (low & 1)
    return t1, t2, label


@triton.jit
def _merge_top(best, second, best_idx, t1, t2, i1):
    """Fold a chunk's (best, second, label) into the row's: strict, so an earlier chunk keeps a tie (and the tie
    shows as a zero margin)."""
    better = t1 < best
    second = tl.where(better, tl.minimum(best, t2), tl.minimum(second, t1))
    best_idx = tl.where(better, i1, best_idx)
    best = tl.where(better, t1, best)
    return best, second, best_idx


@triton.jit(do_not_specialize=["n_pad"])
def _assign_kernel(
    a_ptr, rowstat_ptr, cf_ptr, cc_ptr, top_ptr, top_stride, n_pad, k_pad, d_pad, key_low,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
    PTX: tl.constexpr, CHAIN: tl.constexpr,
):
    """Streaming pass (portable): scores of BLOCK_N prepared rows against every centroid tile, reduced per slot
    (see `slot_of`): one min per score into the chunk's running slot minima, no per-tile row reduction. Writes
    each row's (best key, smallest key outside the best's slot, label) to top_ptr's three planes; the class pass
    then covers the best's slot and `_finish_kernel` the rest."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_off = pid_b.to(tl.int64) * n_pad + rows  # prepared rows are padded to n_pad: no masks in the stream
    a_rows = a_ptr + a_off[:, None] * d_pad
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    cf_ptr += pid_b.to(tl.int64) * k_pad * d_pad
    cc_ptr += pid_b.to(tl.int64) * k_pad
    aa = tl.load(rowstat_ptr + a_off * 2)
    a_fast = _resident_rows(a_rows, offs_d, aa, RESIDENT)
    place = _slot_tags(offs_k, BLOCK_K)
    low_mask = -(1 << key_low)
    chunk = BLOCK_K << (key_low - 2)
    best = tl.full([BLOCK_N], 3.0e38, tl.float32)
    second = tl.full([BLOCK_N], 3.0e38, tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, k_pad, chunk):
        run = tl.full([BLOCK_N, BLOCK_K // 4], 3.0e38, tl.float32)
        for k0 in range(c0, tl.minimum(c0 + chunk, k_pad), BLOCK_K):
            acc = _tile_scores(aa, a_fast, a_rows, cf_ptr, cc_ptr, k0 + offs_k, offs_d, d_pad, BLOCK_D, RESIDENT,
                               PTX, CHAIN)
            key = _tagged_keys(acc, (((k0 - c0) // BLOCK_K) << 2) + place, low_mask, PTX)
            run = tl.minimum(run, _fold_slots(key, BLOCK_N, BLOCK_K))
        t1, t2, i1 = _chunk_top(run, c0, key_low, BLOCK_K)
        best, second, best_idx = _merge_top(best, second, best_idx, t1, t2, i1)
    tl.store(top_ptr + a_off, best)
    tl.store(top_ptr + top_stride + a_off, second)
    tl.store(top_ptr + 2 * top_stride + a_off, best_idx.to(tl.float32, bitcast=True))


@triton.jit(do_not_specialize=["n_total", "segs"])
def _class_kernel(
    order_ptr, group_ptr, top_ptr, top_stride, a_ptr, rowstat_ptr, cf_ptr, cc_ptr,
    n_total, k_pad, d_pad, chunk_tiles, segs,
    TILE_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr, PTX: tl.constexpr, CHAIN: tl.constexpr,
):
    """Class pass: for every prepared row, the smallest score over the other centroids of its label's class
    (the label's slot in every tile of the label's chunk: `class_of`), folded into the row's second plane. The
    rows come sorted by (batch, segment of rows, class) (`order_ptr`, `group_ptr`: `_group_kernel`), so a tile
    of rows shares one or a few classes, whose centroids are gathered once per tile, and the rows' planes are
    read and written within one segment at a time (see `class_segment_rows`)."""
    S: tl.constexpr = TILE_K // 4
    tiles = k_pad // TILE_K
    classes = tl.cdiv(tiles, chunk_tiles) * S
    pos = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = pos < n_total
    flat = tl.load(order_ptr + pos, mask=valid, other=0).to(tl.int64)
    group = tl.load(group_ptr + pos, mask=valid, other=-1).to(tl.int32)
    label = tl.load(top_ptr + 2 * top_stride + flat).to(tl.int32, bitcast=True)
    aa = tl.load(rowstat_ptr + flat * 2)
    a_rows = a_ptr + flat[:, None] * d_pad
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    a_fast = _resident_rows(a_rows, offs_d, aa, RESIDENT)
    low = tl.full([BLOCK_N], 3.0e38, tl.float32)
    grp = tl.min(tl.where(valid, group, 2147483647), 0)
    g_last = tl.max(group, 0)
    while grp <= g_last:  # the groups present in the tile, in order
        pid_b = grp // (segs * classes)
        cls = grp % classes
        chunk = cls // S
        g = cls % S
        class_size = 4 * tl.minimum(chunk_tiles, tiles - chunk * chunk_tiles)
        c0 = chunk * chunk_tiles * TILE_K
        member = valid & (group == grp)
        for m0 in range(0, class_size, BLOCK_C):
            m = tl.minimum(m0 + offs_c, class_size - 1)  # (a repeated member changes no minimum)
            cidx = c0 + (m >> 2) * TILE_K + 2 * (g + S * ((m >> 1) & 1)) + (m & 1)
            acc = _tile_scores(aa, a_fast, a_rows, cf_ptr + pid_b.to(tl.int64) * k_pad * d_pad,
                               cc_ptr + pid_b.to(tl.int64) * k_pad, cidx, offs_d, d_pad, BLOCK_D, RESIDENT,
                               PTX, CHAIN)
            acc = tl.where(cidx[None, :] == label[:, None], 3.0e38, acc)
            low = tl.where(member, tl.minimum(low, tl.min(acc, 1)), low)
        grp = tl.min(tl.where(valid & (group > grp), group, 2147483647), 0)
    second = tl.load(top_ptr + top_stride + flat, mask=valid)
    tl.store(top_ptr + top_stride + flat, tl.minimum(second, low), mask=valid)


@triton.jit(do_not_specialize=["n_total", "n_pad", "seg_rows", "segs"])
def _group_kernel(top_ptr, top_stride, group_ptr, n_total, n_pad, classes, chunk_tiles, seg_rows, segs,
                  TILE_K: tl.constexpr, BLOCK: tl.constexpr):
    """The class pass's sort key of every row: (batch * segs + its segment of seg_rows rows) * classes + `class_of`
    its label (one pass, not a chain of torch operations over B n_pad rows)."""
    S: tl.constexpr = TILE_K // 4
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = pos < n_total
    label = tl.load(top_ptr + 2 * top_stride + pos, mask=m, other=0.0).to(tl.int32, bitcast=True)
    col = label % TILE_K
    segment = (pos // n_pad) * segs + (pos % n_pad) // seg_rows
    key = segment * classes + label // (chunk_tiles * TILE_K) * S + (col % (TILE_K // 2)) // 2
    tl.store(group_ptr + pos, key.to(group_ptr.dtype.element_ty), mask=m)


@triton.jit
def _append_rows(list_ptr, counter_ptr, rows, mask):
    """Append the rows under mask to a device list whose length is *counter_ptr: one atomic per program reserves
    their slots (in no particular order across programs)."""
    take = mask.to(tl.int32)
    n = tl.sum(take, 0)
    base = tl.atomic_add(counter_ptr, n, mask=n > 0)
    tl.store(list_ptr + base + tl.cumsum(take, 0) - take, rows, mask=mask)


@triton.jit
def _lower_bound(second, aa, bound, trunc, alpha, D):
    """A lower bound on |x - c| for every centroid c but the label, from the second key t2 (Hamerly's bound,
    which lets the next Lloyd steps skip rows whose label cannot change). Every other c has d(c) >= t2 - T|t2|
    (the key truncation) and |d(c) - aa - S(c)| <= E (bound = 2E): scaled, |a - b_c|^2 = |a|^2 + S(c) >=
    t2 - T|t2| - 2E - (aa - |a|^2), with aa - |a|^2 <= (2 D + 32) 2**-23 aa (aa is the fp32 square sum of a_comp,
    one rounding from a). 4u(...) covers this formula's own roundings, (1 - 2**-18) the approximate sqrt."""
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    slack = (2 * D + 32).to(tl.float32) * 1.1920928955078125e-07
    low = second - trunc * tl.abs(second) - bound - slack * aa - 4.0 * U * (tl.abs(second) + aa + bound) - 1e-30
    return tl.sqrt(tl.maximum(low, 0.0)) / alpha * (1.0 - 3.814697265625e-06)


@triton.jit
def _finish_rows(best, second, best_idx, aa, rows, row_mask, a_off, out_off, pid_b,
                 x_ptr, stride_xb, stride_xn, stride_xd, rowstat_ptr, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
                 labels_ptr, dist_ptr, flag_ptr, thr_ptr, list_ptr, count_ptr, n_pad, D, key_low,
                 lower_ptr, stats_ptr,
                 COSINE: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr, XB16: tl.constexpr,
                 LOWER: tl.constexpr):
    """After the stream: the margin test, the label, the resolve threshold, the flagged rows appended to the
    batch's list, and the exact distance of the label. LOWER (euclidean): also a lower bound on the distance
    (not squared) from the row to every centroid but its label, 0 where the margin test fails (`_lower_bound`)."""
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    bound = 2.0 * tl.load(rowstat_ptr + a_off * 2 + 1) * (1.0 + 1.52587890625e-05)
    # a key differs from its score in the low key_low bits: |key - d| < 2**key_low ulp(d)
    trunc = (1 << key_low).to(tl.float32) * 1.1920928955078125e-07 + 2.384185791015625e-07
    gap = (second - best) * (1.0 - 2.384185791015625e-07) - trunc * (tl.abs(best) + tl.abs(second)) - 1e-36
    exact = gap > bound  # False for NaN / inf bounds: such rows are re-checked
    thr_out = best + trunc * tl.abs(best) - aa + bound
    thr_out += 4.0 * U * (tl.abs(best) + aa + bound) + bound * 0.00390625 + 1e-30
    # a non-finite bound (fp16 overflow, inf/NaN input) says nothing about candidates: NaN sends the row to
    # float64 brute force (no centroid passes a NaN threshold)
    thr_out = tl.where(bound <= 3.0e38, thr_out, float("nan"))
    tl.store(labels_ptr + out_off, best_idx.to(tl.int64), mask=row_mask)
    tl.store(flag_ptr + out_off, (~exact).to(tl.int8), mask=row_mask)
    tl.store(thr_ptr + out_off, thr_out, mask=row_mask)
    if LOWER:
        lower = _lower_bound(second, aa, bound, trunc, tl.load(stats_ptr + pid_b * 4), D)
        tl.store(lower_ptr + out_off, tl.where(exact, lower, 0.0), mask=row_mask)
    _append_rows(list_ptr + pid_b.to(tl.int64) * n_pad, count_ptr + pid_b * 4, rows, (~exact) & row_mask)

    # exact float64 distance to the chosen centroid, as reference.assign computes it
    row_off = _x_rows(pid_b, rows, stride_xb, stride_xn, XB16)
    inv_norm = _inv_norm(x_ptr, row_off, stride_xd, D, row_mask, COSINE, BLOCK_N, EPI_D)
    c_off = pid_b.to(tl.int64) * stride_cdb + best_idx.to(tl.int64) * stride_cdk
    total = _exact_score(x_ptr, row_off, stride_xd, cd_ptr, c_off, stride_cdd, D, row_mask, inv_norm,
                         COSINE, BLOCK_N, EPI_D)
    if COSINE:
        total = _cosine_dist(total)
    tl.store(dist_ptr + out_off, total.to(tl.float32), mask=row_mask)


@triton.jit(do_not_specialize=["stride_xb", "n_rows"])
def _finish_kernel(
    top_ptr, top_stride, x_ptr, stride_xb, stride_xn, stride_xd, rowstat_ptr,
    cd_ptr, stride_cdb, stride_cdk, stride_cdd,
    labels_ptr, dist_ptr, flag_ptr, thr_ptr, list_ptr, count_ptr,
    n_rows, n_pad, D, key_low, lower_ptr, stats_ptr,
    COSINE: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr, XB16: tl.constexpr, LOWER: tl.constexpr,
):
    """The rest of FlashAssign's fast pass after the streaming pass (either one) and the class pass: reads each
    row's (best key, second key, label) from its three planes and runs `_finish_rows`."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    out_off = pid_b.to(tl.int64) * n_rows + rows
    a_off = pid_b.to(tl.int64) * n_pad + rows
    aa = tl.load(rowstat_ptr + a_off * 2)
    best = tl.load(top_ptr + a_off)
    second = tl.load(top_ptr + top_stride + a_off)
    best_idx = tl.load(top_ptr + 2 * top_stride + a_off).to(tl.int32, bitcast=True)
    _finish_rows(best, second, best_idx, aa, rows, row_mask, a_off, out_off, pid_b,
                 x_ptr, stride_xb, stride_xn, stride_xd, rowstat_ptr, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
                 labels_ptr, dist_ptr, flag_ptr, thr_ptr, list_ptr, count_ptr, n_pad, D, key_low,
                 lower_ptr, stats_ptr, COSINE, BLOCK_N, EPI_D, XB16, LOWER)


@triton.jit
def _rows64(ptr, row_off, stride_d, d0, offs_e, D, row_mask):
    """float64 columns [d0, d0 + EPI_D) of the rows at row_off (zeros outside the data)."""
    m = row_mask[:, None] & ((d0 + offs_e) < D)[None, :]
    return tl.load(ptr + row_off[:, None] + (d0 + offs_e)[None, :].to(tl.int64) * stride_d, mask=m,
                   other=0.0).to(tl.float64)


@triton.jit
def _inv_norm(x_ptr, row_off, stride_xd, D, row_mask, COSINE: tl.constexpr, BLOCK_N: tl.constexpr,
              EPI_D: tl.constexpr):
    """float64 1/|x| per row for cosine (1 for a zero row), 1 for euclidean."""
    inv_norm = tl.zeros([BLOCK_N], dtype=tl.float64) + 1.0
    if COSINE:
        offs_e = tl.arange(0, EPI_D)
        nsq = tl.zeros([BLOCK_N], dtype=tl.float64)
        for d0 in range(0, D, EPI_D):
            xv = _rows64(x_ptr, row_off, stride_xd, d0, offs_e, D, row_mask)
            nsq += tl.sum(xv * xv, 1)
        norm = tl.sqrt(nsq)
        inv_norm = 1.0 / tl.where(norm > 0.0, norm, 1.0)  # (reference divides each element: ~1 ulp apart)
    return inv_norm


@triton.jit
def _cosine_dist(score):
    """1 - cos from the score -cos, clamped to [0, 2] like reference.assign (NaN stays NaN)."""
    return tl.where(score == score, tl.minimum(tl.maximum(1.0 + score, 0.0), 2.0), score)


@triton.jit
def _exact_score(x_ptr, row_off, stride_xd, cd_ptr, c_off, stride_cdd, D, row_mask, inv_norm,
                 COSINE: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr):
    """float64 score of each row against the centroid row at c_off: |x - c|^2, or -cos (unit c) for cosine."""
    offs_e = tl.arange(0, EPI_D)
    total = tl.zeros([BLOCK_N], dtype=tl.float64)
    for d0 in range(0, D, EPI_D):
        xv = _rows64(x_ptr, row_off, stride_xd, d0, offs_e, D, row_mask)
        cv = _rows64(cd_ptr, c_off, stride_cdd, d0, offs_e, D, row_mask)
        if COSINE:
            total -= tl.sum((xv * inv_norm[:, None]) * cv, 1)
        else:
            diff = xv - cv
            total += tl.sum(diff * diff, 1)
    return total


@triton.jit
def _take(best, best_idx, score, idx, use):
    """Running float64 argmin with ties to the lowest index (candidates come in any order)."""
    take = use & ((score < best) | ((score == best) & (idx < best_idx)))
    return tl.where(take, score, best), tl.where(take, idx, best_idx)


@triton.jit
def _exact_score4(x_ptr, row_off, stride_xd, cd_ptr, c_off, stride_cdk, stride_cdd, D, row_mask, idx, K, inv_norm,
                  COSINE: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr):
    """`_exact_score` of centroids idx .. idx + 3 (rows at c_off + u stride_cdk; those >= K masked) in one pass."""
    offs_e = tl.arange(0, EPI_D)
    t0 = tl.zeros([BLOCK_N], dtype=tl.float64)
    t1 = tl.zeros([BLOCK_N], dtype=tl.float64)
    t2 = tl.zeros([BLOCK_N], dtype=tl.float64)
    t3 = tl.zeros([BLOCK_N], dtype=tl.float64)
    for d0 in range(0, D, EPI_D):
        dm = ((d0 + offs_e) < D)[None, :]
        m = row_mask[:, None] & dm
        col = (d0 + offs_e)[None, :].to(tl.int64) * stride_cdd
        xv = tl.load(x_ptr + row_off[:, None] + (d0 + offs_e)[None, :].to(tl.int64) * stride_xd,
                     mask=m, other=0.0).to(tl.float64)
        c0 = tl.load(cd_ptr + c_off[:, None] + col, mask=m & (idx < K)[:, None], other=0.0).to(tl.float64)
        c1 = tl.load(cd_ptr + c_off[:, None] + stride_cdk + col, mask=m & (idx + 1 < K)[:, None],
                     other=0.0).to(tl.float64)
        c2 = tl.load(cd_ptr + c_off[:, None] + 2 * stride_cdk + col, mask=m & (idx + 2 < K)[:, None],
                     other=0.0).to(tl.float64)
        c3 = tl.load(cd_ptr + c_off[:, None] + 3 * stride_cdk + col, mask=m & (idx + 3 < K)[:, None],
                     other=0.0).to(tl.float64)
        if COSINE:
            xu = xv * inv_norm[:, None]
            t0 -= tl.sum(xu * c0, 1)
            t1 -= tl.sum(xu * c1, 1)
            t2 -= tl.sum(xu * c2, 1)
            t3 -= tl.sum(xu * c3, 1)
        else:
            t0 += tl.sum((xv - c0) * (xv - c0), 1)
            t1 += tl.sum((xv - c1) * (xv - c1), 1)
            t2 += tl.sum((xv - c2) * (xv - c2), 1)
            t3 += tl.sum((xv - c3) * (xv - c3), 1)
    return t0, t1, t2, t3


@triton.jit(do_not_specialize=["stride_xb", "n_rows", "n_col"])
def _resolve_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, a_ptr, rowstat_ptr, thr_ptr,
    cf_ptr, cc_ptr, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
    labels_ptr, dist_ptr, list_ptr, count_ptr, rest_ptr,
    n_rows, n_pad, D, K, k_pad, d_pad, stride_list, n_col,
    COSINE: tl.constexpr, MAX_CAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr, XB16: tl.constexpr,
    EPI_D: tl.constexpr, PTX: tl.constexpr, TOP2_REDUCE: tl.constexpr, QUICK: tl.constexpr, CHAIN: tl.constexpr,
):
    """Makes the flagged rows exact, in place. Persistent: the programs of batch b walk the tiles of BLOCK_N rows
    of its list (`list_ptr[b, :count[b, n_col]]`, batch stride stride_list; count is (B, 4); n_col 0: all flagged
    rows, 3: those the neighbour tier left). For each row it
    streams every centroid tile again and keeps every centroid under the row's threshold (`hit`: a superset of
    the centroids that can still win): per tile, the two lowest keys among the hits go to the row's candidate
    slots; a tile with more than two hits is remembered instead (the row's first such tile). Then the float64
    argmin (ties -> lowest index) over the slots, plus every centroid of the remembered tile, is the label.
    Rows this cannot settle (no candidate, more than MAX_CAND in the slots, or two tiles with more than two hits)
    are appended to the batch's `rest` list (`rest_ptr[b, :count[b, 1]]`) for `_brute_kernel`; count[b, 2]
    counts the rows settled through a remembered tile."""
    U: tl.constexpr = 5.9604644775390625e-08  # 2**-24
    BIG: tl.constexpr = 3.0e38
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)
    n_flag = tl.load(count_ptr + pid_b * 4 + n_col)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, MAX_CAND)
    cf_ptr += pid_b.to(tl.int64) * k_pad * d_pad
    cc_ptr += pid_b.to(tl.int64) * k_pad
    list_ptr += pid_b.to(tl.int64) * stride_list
    for tile in range(pid, tl.cdiv(n_flag, BLOCK_N), nprog):
        slot = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = slot < n_flag
        rows = tl.load(list_ptr + slot, mask=valid, other=0)
        out_off = pid_b.to(tl.int64) * n_rows + rows
        a_off = pid_b.to(tl.int64) * n_pad + rows
        a_rows = a_ptr + a_off[:, None] * d_pad
        aa = tl.load(rowstat_ptr + a_off * 2)
        thr = tl.load(thr_ptr + out_off, mask=valid, other=float("nan"))
        # hit <=> acc <= lim, with lim >= aa + thr exactly (so every centroid with d - aa <= thr is a hit); a
        # NaN or huge limit hits nothing (padded centroid columns score about 1e38) and sends the row on
        s = aa + thr
        lim = s + 4.0 * U * tl.abs(s) + 1e-30
        lim = tl.where(lim < 1.0e37, lim, float("nan"))
        a_fast = _resident_rows(a_rows, offs_d, aa, RESIDENT)
        cand = tl.zeros([BLOCK_N, MAX_CAND], dtype=tl.int32)
        count = tl.zeros([BLOCK_N], dtype=tl.int32)
        n_wide = tl.zeros([BLOCK_N], dtype=tl.int32)  # tiles with more than two hits
        wide_k0 = tl.zeros([BLOCK_N], dtype=tl.int32)  # the first of them
        for k0 in range(0, k_pad, BLOCK_K):
            acc = _tile_scores(aa, a_fast, a_rows, cf_ptr, cc_ptr, k0 + offs_k, offs_d, d_pad, BLOCK_D, RESIDENT,
                               PTX, CHAIN)
            # QUICK: a tile where no row has a hit changes nothing (a row's few hits among many tiles); one min
            # per score tells, instead of the top-2 reduction (when lim is finite, so is every score of the row)
            go = True
            if QUICK:
                go = tl.max((tl.min(acc, 1) <= lim).to(tl.int32), 0) > 0
            if go:
                hit = acc <= lim[:, None]
                key = tl.where(hit, _tagged_keys(acc, offs_k, -BLOCK_K, PTX), BIG)  # (in-tile index: low bits)
                if TOP2_REDUCE:
                    t1, t2 = _row_top2(key, BLOCK_N, BLOCK_K)
                else:
                    t1 = tl.min(key, 1)
                    t2 = tl.min(tl.where(key == t1[:, None], BIG, key), 1)
                n_hit = tl.sum(hit.to(tl.int32), 1)
                i1 = (t1.to(tl.int32, bitcast=True) & (BLOCK_K - 1)) + k0
                i2 = (t2.to(tl.int32, bitcast=True) & (BLOCK_K - 1)) + k0
                # slots count, count + 1 take i1, i2 (what lands at or beyond the final count is never read)
                # (a (BLOCK_N, MAX_CAND) tile; eight per-row vectors measured slower on H200)
                cand = tl.where(offs_m[None, :] == count[:, None], i1[:, None],
                                tl.where(offs_m[None, :] == count[:, None] + 1, i2[:, None], cand))
                wide = n_hit > 2
                wide_k0 = tl.where(wide & (n_wide == 0), k0, wide_k0)
                n_wide += wide.to(tl.int32)
                count += tl.where(wide, 0, n_hit)
        settle = valid & (count <= MAX_CAND) & (((n_wide == 0) & (count >= 1)) | (n_wide == 1))
        widened = settle & (n_wide == 1)

        # float64 argmin among the candidates; ties go to the lowest index (slots are not in index order)
        row_off = _x_rows(pid_b, rows, stride_xb, stride_xn, XB16)
        inv_norm = _inv_norm(x_ptr, row_off, stride_xd, D, settle, COSINE, BLOCK_N, EPI_D)
        best = tl.full([BLOCK_N], float("inf"), tl.float64)
        best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        n_slots = tl.max(tl.where(settle, count, 0), 0)
        for j in range(0, n_slots):
            idx = tl.sum(tl.where(offs_m[None, :] == j, cand, 0), 1)
            use = settle & (j < count)
            c_off = pid_b.to(tl.int64) * stride_cdb + idx.to(tl.int64) * stride_cdk
            score = _exact_score(x_ptr, row_off, stride_xd, cd_ptr, c_off, stride_cdd, D, use, inv_norm,
                                 COSINE, BLOCK_N, EPI_D)
            best, best_idx = _take(best, best_idx, score, idx, use)
        # every centroid of the remembered tile (a superset of its hits: non-hits cannot win)
        # (four centroids per step, in one pass over D: their loads are in flight together)
        n_widened = tl.sum(widened.to(tl.int32), 0)
        for j in range(0, tl.where(n_widened > 0, BLOCK_K, 0), 4):
            idx = wide_k0 + j
            c_off = pid_b.to(tl.int64) * stride_cdb + idx.to(tl.int64) * stride_cdk
            e0, e1, e2, e3 = _exact_score4(x_ptr, row_off, stride_xd, cd_ptr, c_off, stride_cdk, stride_cdd, D,
                                           widened, idx, K, inv_norm, COSINE, BLOCK_N, EPI_D)
            best, best_idx = _take(best, best_idx, e0, idx, widened & (idx < K))
            best, best_idx = _take(best, best_idx, e1, idx + 1, widened & (idx + 1 < K))
            best, best_idx = _take(best, best_idx, e2, idx + 2, widened & (idx + 2 < K))
            best, best_idx = _take(best, best_idx, e3, idx + 3, widened & (idx + 3 < K))
        tl.atomic_add(count_ptr + pid_b * 4 + 2, n_widened, mask=n_widened > 0)
        if COSINE:
            best = _cosine_dist(best)
        tl.store(labels_ptr + out_off, best_idx.to(tl.int64), mask=settle)
        tl.store(dist_ptr + out_off, best.to(tl.float32), mask=settle)
        # the rest, appended to the batch's second list
        _append_rows(rest_ptr + pid_b.to(tl.int64) * stride_list, count_ptr + pid_b * 4 + 1, rows, valid & ~settle)


@triton.jit
def _brute_scores(x_ptr, row_off, stride_xd, cd_ptr, c_base, stride_cdk, stride_cdd, ks, k_mask, valid, inv_norm, D,
                  COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI_D: tl.constexpr):
    """float64 scores (BLOCK_N, BLOCK_K) of the rows against centroids ks, straight from the difference (no
    expansion, so exact ties stay ties); +inf for NaN scores and centroids outside k_mask (they never win).
    (EPI_D features per step, as `_exact_score` sums them: one element per feature at a time made a serial chain
    of K D / BLOCK_K dependent loads, 53 ms for one row at K=4096, D=1024 on an H100.)"""
    c_off = c_base + ks.to(tl.int64) * stride_cdk
    offs_e = tl.arange(0, EPI_D)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
    for d0 in range(0, D, EPI_D):
        xv = _rows64(x_ptr, row_off, stride_xd, d0, offs_e, D, valid)
        cv = _rows64(cd_ptr, c_off, stride_cdd, d0, offs_e, D, k_mask)
        if COSINE:
            acc -= tl.sum((xv * inv_norm[:, None])[:, None, :] * cv[None, :, :], 2)
        else:
            diff = xv[:, None, :] - cv[None, :, :]
            acc += tl.sum(diff * diff, 2)
    return tl.where(k_mask[None, :] & (acc == acc), acc, float("inf"))


@triton.jit
def _ordered(score):
    """float64 -> int64 of the same order (negative scores are cosine's -cos), for an integer atomic min."""
    bits = score.to(tl.int64, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


@triton.jit
def _unordered(key):
    return tl.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["stride_xb", "n_rows", "k_split"])
def _brute_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
    list_ptr, count_ptr, key_ptr, first_ptr, n_rows, n_pad, K, D, stride_list, k_split,
    PICK: tl.constexpr, SPLITS: tl.constexpr, COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPI_D: tl.constexpr, XB16: tl.constexpr,
):
    """Last tier (rows with more than MAX_CAND possible winners: duplicated centroids, or no usable bound): the
    float64 score of every centroid, the first minimum wins. Few rows come here, so what counts is latency: the
    centroids are split in SPLITS ranges of k_split, and programs walk the (row tile, range) pairs of batch b's
    list (`list_ptr[b, :count[b, 0]]`, persistent). PICK=False: the smallest score of each row's range goes into
    `key_ptr[b, row]` by an integer atomic min (`_ordered`); PICK=True (after it): every centroid whose score
    equals the row's minimum puts its index into `first_ptr[b, row]` by an atomic min (ties -> lowest index).
    `_brute_finish_kernel` then stores labels and distances."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)
    n_list = tl.load(count_ptr + pid_b * 4)
    list_ptr += pid_b.to(tl.int64) * stride_list
    offs_k = tl.arange(0, BLOCK_K)
    c_base = pid_b.to(tl.int64) * stride_cdb
    for item in range(pid, tl.cdiv(n_list, BLOCK_N) * SPLITS, nprog):
        slot = (item // SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_lo = (item % SPLITS) * k_split
        k_hi = tl.minimum(K, k_lo + k_split)
        valid = slot < n_list
        rows = tl.load(list_ptr + slot, mask=valid, other=0)
        row_off = _x_rows(pid_b, rows, stride_xb, stride_xn, XB16)
        s_off = pid_b.to(tl.int64) * n_pad + rows
        inv_norm = _inv_norm(x_ptr, row_off, stride_xd, D, valid, COSINE, BLOCK_N, EPI_D)
        if PICK:
            target = _unordered(tl.load(key_ptr + s_off, mask=valid, other=0))
            first = tl.full([BLOCK_N], 2147483647, tl.int64)
        else:
            best = tl.full([BLOCK_N], float("inf"), tl.float64)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k
            acc = _brute_scores(x_ptr, row_off, stride_xd, cd_ptr, c_base, stride_cdk, stride_cdd, ks, ks < k_hi,
                                valid, inv_norm, D, COSINE, BLOCK_N, BLOCK_K, EPI_D)
            if PICK:
                first = tl.minimum(first, tl.min(tl.where(acc == target[:, None], ks[None, :], 2147483647), 1))
            else:
                best = tl.minimum(best, tl.min(acc, 1))
        if PICK:
            tl.atomic_min(first_ptr + s_off, first, mask=valid & (target < float("inf")) & (first < 2147483647))
        else:
            tl.atomic_min(key_ptr + s_off, _ordered(best), mask=valid & (best < float("inf")))


@triton.jit(do_not_specialize=["stride_xb", "n_rows"])
def _brute_finish_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, cd_ptr, stride_cdb, stride_cdk, stride_cdd,
    labels_ptr, dist_ptr, list_ptr, count_ptr, key_ptr, first_ptr, n_rows, n_pad, D, stride_list,
    COSINE: tl.constexpr, BLOCK_N: tl.constexpr, EPI_D: tl.constexpr, XB16: tl.constexpr,
):
    """After `_brute_kernel`'s two passes: each listed row's label (the first minimum; a row without any finite
    score keeps centroid 0, with its NaN / inf distance) and distance."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)
    n_list = tl.load(count_ptr + pid_b * 4)
    list_ptr += pid_b.to(tl.int64) * stride_list
    for tile in range(pid, tl.cdiv(n_list, BLOCK_N), nprog):
        slot = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = slot < n_list
        rows = tl.load(list_ptr + slot, mask=valid, other=0)
        row_off = _x_rows(pid_b, rows, stride_xb, stride_xn, XB16)
        out_off = pid_b.to(tl.int64) * n_rows + rows
        s_off = pid_b.to(tl.int64) * n_pad + rows
        best = _unordered(tl.load(key_ptr + s_off, mask=valid, other=0))
        found = best < float("inf")
        label = tl.where(found, tl.load(first_ptr + s_off, mask=valid, other=0), 0)
        inv_norm = _inv_norm(x_ptr, row_off, stride_xd, D, valid, COSINE, BLOCK_N, EPI_D)
        first = _exact_score(x_ptr, row_off, stride_xd, cd_ptr, pid_b.to(tl.int64) * stride_cdb + 0 * row_off,
                             stride_cdd, D, valid & ~found, inv_norm, COSINE, BLOCK_N, EPI_D)
        best = tl.where(found, best, first)
        if COSINE:
            best = _cosine_dist(best)
        tl.store(labels_ptr + out_off, label.to(tl.int64), mask=valid)
        tl.store(dist_ptr + out_off, best.to(tl.float32), mask=valid)


@triton.jit
def _range_kernel(c_ptr, stride_cb, stride_ck, stride_cd, mu_ptr, spread_ptr, out_ptr, K, D,
                  SPREAD: tl.constexpr, MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """SPREAD: out[b, d] >= max_k |c[b, k, d] - mu[b, d]| (the centroids' spread around the mean); otherwise
    out[b] >= max_{k,d} |c[b, k, d] - s[b, d]|, s the kernel's shift (`_shift_of`). fp32 bits, rounded up,
    atomic max into zeros."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    m = (ks < K)[:, None] & d_mask[None, :]
    c = tl.load(c_ptr + pid_b.to(tl.int64) * stride_cb + ks[:, None].to(tl.int64) * stride_ck
                + ds[None, :].to(tl.int64) * stride_cd, mask=m, other=0.0).to(tl.float64)
    mu = tl.load(mu_ptr + pid_b * D + ds, mask=d_mask, other=0.0)
    if SPREAD:
        v = tl.max(tl.where(m, tl.abs(c - mu[None, :]), 0.0), 0)
        v32 = tl.abs((v * (1.0 + 2.0 ** -20)).to(tl.float32))  # (abs: a NaN must compare high as int bits)
        tl.atomic_max(out_ptr + pid_b * D + ds, v32.to(tl.int32, bitcast=True), mask=d_mask)
    else:
        spread = tl.load(spread_ptr + pid_b * D + ds, mask=d_mask, other=0).to(tl.float32, bitcast=True)
        s = _shift_of(mu, spread.to(tl.float64), MODE).to(tl.float64)
        v = tl.max(tl.max(tl.where(m, tl.abs(c - s[None, :]), 0.0), 1), 0)
        v32 = tl.abs((v * (1.0 + 2.0 ** -20)).to(tl.float32))
        tl.atomic_max(out_ptr + pid_b, v32.to(tl.int32, bitcast=True))


@triton.jit
def _shift_of(mu, spread, MODE: tl.constexpr):
    """The kernel's fp32 shift s per (b, d) from the float64 mean mu. Any s is exact; this one keeps fp16 input
    exact after centring. MODE 0 (fp32 x): fp32(mu). MODE 1 / 2 (fp16 / bf16 x): mu on x's own grid (x - s then
    exact by Sterbenz near mu; fp32(mu) if that overflows), or 0 where |mu| <= spread, the centroids' spread
    around mu (no cancellation to avoid, and x - 0 is exact)."""
    if MODE == 0:
        s = mu.to(tl.float32)
    else:
        if MODE == 1:
            snapped = mu.to(tl.float32).to(tl.float16).to(tl.float32)
        else:
            snapped = mu.to(tl.float32).to(tl.bfloat16).to(tl.float32)
        snapped = tl.where(tl.abs(snapped) < float("inf"), snapped, mu.to(tl.float32))
        s = tl.where(tl.abs(mu) <= spread, 0.0, snapped)
    return s


@triton.jit
def _centroid_kernel(c_ptr, stride_cb, stride_ck, stride_cd, mu_ptr, spread_ptr, range_ptr, sigma_ptr, stats_ptr,
                     cf_ptr, cc_ptr, K, D, k_pad, d_pad,
                     MODE: tl.constexpr, COSINE: tl.constexpr, FAR: tl.constexpr, TARGET_EXP: tl.constexpr,
                     COS_ALPHA: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The centroid side of `_prepare` for one tile of BLOCK_K centroids: b = alpha (c - s) in float64,
    c_fast = -2 fp16(b) and cc = fp32(|b|^2) (zero / FAR padding included), and the batch's bounds Bh, Eb, Bsq
    (fp32, rounded up) by atomic max into stats (int32 bits, zero-initialised); program 0 stores alpha and s.
    Every program derives s and alpha itself from mu, spread and range (same inputs, same values). Cosine: c is the
    float64 unit rows, s = 0, alpha = COS_ALPHA, cc = COS_ALPHA**2."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    if COSINE:
        alpha = tl.full([], COS_ALPHA, tl.float64)
    else:
        # alpha = 2**(TARGET_EXP - e), m = f 2**e, f in [0.5, 1), m >= max |c - s| (NaN: alpha 1)
        m = tl.load(range_ptr + pid_b).to(tl.float32, bitcast=True).to(tl.float64)
        e = ((m.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
        ex = tl.where(m > 0.0, TARGET_EXP - e, 0)
        ex = tl.minimum(tl.maximum(ex, -120), 120)
        alpha = ((ex + 1023) << 52).to(tl.float64, bitcast=True)
    if pid_k == 0:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            d_mask = ds < D
            if COSINE:
                s = tl.zeros([BLOCK_D], dtype=tl.float32)
            else:
                mu = tl.load(mu_ptr + pid_b * D + ds, mask=d_mask, other=0.0)
                spread = tl.load(spread_ptr + pid_b * D + ds, mask=d_mask, other=0).to(tl.float32, bitcast=True)
                s = _shift_of(mu, spread.to(tl.float64), MODE)
            tl.store(sigma_ptr + pid_b * D + ds, s, mask=d_mask)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    bb = tl.zeros([BLOCK_K], dtype=tl.float64)
    eb = tl.zeros([BLOCK_K], dtype=tl.float64)
    hh = tl.zeros([BLOCK_K], dtype=tl.float64)
    cf_rows = cf_ptr + (pid_b.to(tl.int64) * k_pad + ks)[:, None] * d_pad
    for d0 in range(0, d_pad, BLOCK_D):
        ds = d0 + offs_d
        d_mask = ds < D
        m2 = k_mask[:, None] & d_mask[None, :]
        c = tl.load(c_ptr + pid_b.to(tl.int64) * stride_cb + ks[:, None].to(tl.int64) * stride_ck
                    + ds[None, :].to(tl.int64) * stride_cd, mask=m2, other=0.0).to(tl.float64)
        if COSINE:
            b = c * alpha
        else:
            mu = tl.load(mu_ptr + pid_b * D + ds, mask=d_mask, other=0.0)
            spread = tl.load(spread_ptr + pid_b * D + ds, mask=d_mask, other=0).to(tl.float32, bitcast=True)
            s = _shift_of(mu, spread.to(tl.float64), MODE).to(tl.float64)
            b = tl.where(m2, (c - s[None, :]) * alpha, 0.0)
        bh = b.to(tl.float32).to(tl.float16)
        bh64 = bh.to(tl.float64)
        bb += tl.sum(b * b, 1)
        eb += tl.sum((b - bh64) * (b - bh64), 1)
        hh += tl.sum(bh64 * bh64, 1)
        tl.store(cf_rows + ds[None, :], bh * -2.0)
    cc = bb.to(tl.float32)
    if COSINE:
        cc = tl.zeros([BLOCK_K], dtype=tl.float32) + COS_ALPHA * COS_ALPHA
    tl.store(cc_ptr + pid_b.to(tl.int64) * k_pad + ks, tl.where(k_mask, cc, FAR))
    # per-centroid upper bounds, rounded up to fp32; abs: a NaN compares high as int bits
    e_b = tl.sqrt(eb) * (1.0 + 2.0 ** -40) + 2.0 ** -50 * tl.sqrt(bb)
    b_hat = (tl.sqrt(hh) * (1.0 + 2.0 ** -20)).to(tl.float32)
    e_b = (e_b * (1.0 + 2.0 ** -20)).to(tl.float32)
    b_hat = tl.max(tl.where(k_mask, tl.abs(b_hat), 0.0), 0)
    e_b = tl.max(tl.where(k_mask, tl.abs(e_b), 0.0), 0)
    b_sq = tl.max(tl.where(k_mask, tl.abs(cc), 0.0), 0)
    tl.atomic_max(stats_ptr + pid_b * 4 + 1, b_hat.to(tl.int32, bitcast=True))
    tl.atomic_max(stats_ptr + pid_b * 4 + 2, e_b.to(tl.int32, bitcast=True))
    tl.atomic_max(stats_ptr + pid_b * 4 + 3, b_sq.to(tl.int32, bitcast=True))
    if pid_k == 0:
        tl.store(stats_ptr + pid_b * 4, alpha.to(tl.float32).to(tl.int32, bitcast=True))


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
    """Stage-1 result: labels exact wherever `flag` is 0."""

    labels: torch.Tensor  # int64 (B, N)
    min_dist: torch.Tensor  # float32 (B, N), exact for the returned label
    flag: torch.Tensor  # int8 (B, N): 1 where the margin is under the error bound
    threshold: torch.Tensor  # float32 (B, N): resolve-pass threshold on d - aa
    lists: torch.Tensor  # int32 (3, B, N): [0, b, :counts[b, 0]] the flagged rows, [1, b, :counts[b, 1]] the
    #                      rows the resolve pass left to brute force, [2, b, :counts[b, 3]] the rows the
    #                      neighbour tier left to the resolve pass (each in no particular order)
    counts: torch.Tensor  # int32 (B, 4): rows flagged, rows left to brute force, rows settled through a wide
    #                       tile, rows left to the resolve pass (when the neighbour tier ran)
    lower: torch.Tensor | None = None  # float32 (B, N): `_lower_bound` (0 on flagged rows); None unless asked

    @property
    def flagged(self) -> torch.Tensor:
        return self.flag.bool()


def _prepare(x: torch.Tensor, centroids: torch.Tensor, metric: str, shift) -> _Prepared:
    """The centroid side: shift, scale, fp16 operands and their bounds (two or three small kernels, no host
    synchronisation)."""
    b, n, d = x.shape
    k = centroids.shape[1]
    dev = x.device
    cfg = assign_config(dev, k, d, x.dtype)
    cosine = metric == "cosine"
    k_pad, d_pad = cfg.padded_k(k), cfg.padded_d(d)
    words = torch.zeros(b * 5 + b * d, dtype=torch.int32, device=dev)
    stats_bits, rng, spread = words[:b * 4].view(b, 4), words[b * 4:b * 5], words[b * 5:].view(b, d)
    sigma = torch.empty((b, d), dtype=torch.float32, device=dev)
    c_fast = torch.empty((b, k_pad, d_pad), dtype=torch.float16, device=dev)
    cc = torch.empty((b, k_pad), dtype=torch.float32, device=dev)
    block_d = cfg.row_block_d
    block_k = min(cfg.block_k, 32)  # divides k_pad
    if cosine:
        shift64 = None
        c_dist = reference.unit_rows(centroids.to(torch.float64))
        mu, mode = sigma, 0  # (unused)
    else:
        if shift is None:
            shift64 = x.mean(dim=1, dtype=torch.float64) if n else torch.zeros((b, d), dtype=torch.float64,
                                                                                 device=dev)
        else:
            shift64 = torch.as_tensor(shift, dtype=torch.float64, device=dev)
            shift64 = shift64.expand(b, d) if shift64.dim() == 1 else shift64.reshape(b, d)
        mu = shift64.contiguous()
        mode = {torch.float16: 1, torch.bfloat16: 2}.get(x.dtype, 0)
        c_dist = centroids
        grid = (triton.cdiv(k, 64), triton.cdiv(d, block_d), b)
        c = centroids
        for spread_pass in ((True, False) if mode else (False,)):  # the spread decides the fp16 / bf16 shift
            launch(_range_kernel, grid, c, c.stride(0), c.stride(1), c.stride(2), mu, spread,
                   spread if spread_pass else rng, k, d, SPREAD=spread_pass, MODE=mode, BLOCK_K=64,
                   BLOCK_D=block_d, num_warps=4)
    c = c_dist
    launch(_centroid_kernel, (k_pad // block_k, b),
           c, c.stride(0), c.stride(1), c.stride(2), mu, spread, rng, sigma, stats_bits, c_fast, cc, k, d, k_pad,
           d_pad, MODE=mode, COSINE=cosine, FAR=_FAR, TARGET_EXP=_ALPHA_TARGET_EXP, COS_ALPHA=_COSINE_ALPHA,
           BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return _Prepared(cfg, cosine, x, centroids, shift64, c_fast, cc, sigma, stats_bits.view(torch.float32),
                     c_dist)


class PreparedRows:
    """The row pass's output for one x, kept across calls: a Lloyd fit scores the same rows against new centroids
    every iteration, and the prepared operands depend on the rows and on the kernel's shift and scale only (which
    the centroids move rarely: a power of two and a per-feature choice). Pass one to `flash_assign(rows=...)`
    for the same rows each time; it re-prepares them whenever they may differ: another tensor or view, a write
    into x since (its version counter), or another shift or scale (compared on the device, no host sync). Only
    the error bound E, which the centroids' bounds enter, is recomputed every call (a pass over 16 bytes per
    row). Holds about N (2 D + 16) bytes of device memory while it lives."""

    def __init__(self):
        self._ref = None  # weak reference to the tensor whose storage holds the rows
        self._geometry = None
        self.a_fast = self.rowstat = self.rownorm = self.stamp = None

    def _place(self, x: torch.Tensor, cosine: bool, n_pad: int, d_pad: int) -> tuple:
        return (x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version, cosine,
                n_pad, d_pad)

    @staticmethod
    def _root(x: torch.Tensor) -> torch.Tensor:
        """The tensor that owns x's storage (x itself unless x is a view)."""
        return x if x._base is None else x._base

    def _holds(self, x: torch.Tensor, place: tuple) -> bool:
        return self._ref is not None and self._ref() is self._root(x) and self._geometry == place

    def _bind(self, x: torch.Tensor, place: tuple, n_pad: int, d_pad: int, words: int) -> None:
        """Fresh buffers for x; the stamp matches no shift and scale, so the next row pass runs."""
        b, dev = x.shape[0], x.device
        self._ref, self._geometry = weakref.ref(self._root(x)), place
        self.a_fast = torch.empty((b, n_pad, d_pad), dtype=torch.float16, device=dev)
        self.rowstat = torch.empty((b, n_pad, 2), dtype=torch.float32, device=dev)
        self.rownorm = torch.empty((b, n_pad, 2), dtype=torch.float32, device=dev)
        self.stamp = torch.full((words,), -1, dtype=torch.int32, device=dev)  # (-1: a NaN pattern no s has)


def _prepare_rows(p: _Prepared, rows: PreparedRows | None = None) -> None:
    """The row pass: fp16 operands and (aa, E) of every row of x (with `rows`: kept from an earlier call where
    still valid, E recomputed)."""
    b, n, d = p.x.shape
    cfg = p.cfg
    n_pad = triton.cdiv(n, cfg.row_multiple) * cfg.row_multiple
    block_n = min(cfg.rows_block_n or cfg.block_n, cfg.block_n)  # divides n_pad (powers of two)
    d_pad = p.c_fast.shape[2]
    x = p.x
    if rows is None:
        p.a_fast = torch.empty((b, n_pad, d_pad), dtype=torch.float16, device=x.device)
        p.rowstat = torch.empty((b, n_pad, 2), dtype=torch.float32, device=x.device)
        norms = stale = p.rowstat  # (unused)
    else:
        # the shift and scale the rows were made with, as int32 bits
        stamp = torch.cat([p.sigma.view(torch.int32).reshape(-1), p.stats[:, 0].view(torch.int32)])
        place = rows._place(x, p.cosine, n_pad, d_pad)
        if not rows._holds(x, place):
            rows._bind(x, place, n_pad, d_pad, stamp.numel())
        stale = (rows.stamp != stamp).sum()
        p.a_fast, p.rowstat, norms = rows.a_fast, rows.rowstat, rows.rownorm
    launch(_rows_kernel, (n_pad // block_n, b),
           x, x.stride(0), x.stride(1), x.stride(2), p.sigma, p.stats, p.a_fast, p.rowstat, norms, stale,
           n, n_pad, d, d_pad, COSINE=p.cosine, KEPT=rows is not None, BLOCK_N=block_n, BLOCK_D=cfg.row_block_d,
           XB16=_xb16(x), FROM_ZERO=not cfg.resident, CHAIN_D=cfg.chain_d,
           num_warps=cfg.rows_warps or cfg.num_warps,
           num_stages=cfg.rows_stages)
    if rows is not None:
        launch(_bound_kernel, (n_pad // block_n, b), p.rowstat, norms, p.stats, n_pad, d_pad, BLOCK_N=block_n,
               FROM_ZERO=not cfg.resident, CHAIN_D=cfg.chain_d, num_warps=4)
        rows.stamp.copy_(stamp)


def _fast_pass(p: _Prepared, rows: PreparedRows | None = None, lower: bool = False) -> FastAssignment:
    """The row pass, the streaming pass, the class pass and the margin test: no host synchronisation.
    lower: also the rows' lower bounds on the distance to every other centroid (`FastAssignment.lower`)."""
    b, n, _ = p.x.shape
    dev = p.x.device
    _prepare_rows(p, rows)
    # the streaming pass is queued first: the device starts on it while the host allocates the rest
    top, tile_k, key_low = _stream(p)
    n_pad = p.a_fast.shape[1]
    fast = FastAssignment(torch.empty((b, n), dtype=torch.int64, device=dev),
                          torch.empty((b, n), dtype=torch.float32, device=dev),
                          torch.empty((b, n), dtype=torch.int8, device=dev),
                          torch.empty((b, n), dtype=torch.float32, device=dev),
                          # (rows padded to n_pad: strides and alignment independent of N, no recompiles)
                          torch.empty((3, b, n_pad), dtype=torch.int32, device=dev),
                          torch.zeros((b, 4), dtype=torch.int32, device=dev),
                          torch.empty((b, n), dtype=torch.float32, device=dev) if lower else None)
    _class_pass(p, top, tile_k, key_low)
    _finish_launch(p, top, key_low, fast)
    return fast


def _finish_launch(p: _Prepared, top: torch.Tensor, key_low: int, fast: FastAssignment, shape=None) -> None:
    """The margin test and the exact distances over the planes (`_finish_kernel`); shape (rows per program,
    float64 chunk, warps) defaults to the config's (benchmarks try others)."""
    b, n, _ = p.x.shape
    n_pad = p.a_fast.shape[1]
    block_n, epi_d, warps = shape or p.cfg.finish or (p.cfg.block_n, p.cfg.epilogue_d, p.cfg.num_warps)
    x, cd = p.x, p.c_dist
    launch(_finish_kernel, (n_pad // block_n, b),
           top, top.stride(0), x, x.stride(0), x.stride(1), x.stride(2), p.rowstat,
           cd, cd.stride(0), cd.stride(1), cd.stride(2),
           fast.labels, fast.min_dist, fast.flag, fast.threshold, fast.lists[0], fast.counts,
           n, n_pad, x.shape[2], key_low, fast.threshold if fast.lower is None else fast.lower, p.stats,
           COSINE=p.cosine, BLOCK_N=block_n, EPI_D=epi_d, XB16=_xb16(x), LOWER=fast.lower is not None,
           num_warps=warps)


def _stream(p: _Prepared) -> tuple[torch.Tensor, int, int]:
    """The streaming pass over the prepared rows (sm_90's or the portable one): its three (B n_pad) planes, the
    width of its centroid tiles and the place bits of its keys."""
    b, n_pad, d_pad = p.a_fast.shape
    cfg, k_pad = p.cfg, p.c_fast.shape[1]
    sm90 = cfg.stream is not None and SM90_STREAM
    tile_k = cfg.stream.block_k if sm90 else cfg.block_k
    key_low = key_bits(k_pad, tile_k)
    if sm90:
        from . import assign_sm90
        return assign_sm90.stream(p.a_fast, p.rowstat, p.c_fast, p.cc, cfg.stream, key_low), tile_k, key_low
    top = torch.empty((3, b * n_pad), dtype=torch.float32, device=p.a_fast.device)
    launch(_assign_kernel, (n_pad // cfg.block_n, b),
           p.a_fast, p.rowstat, p.c_fast, p.cc, top, top.stride(0), n_pad, k_pad, d_pad, key_low,
           BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, RESIDENT=cfg.resident,
           PTX=not cfg.interpreted, CHAIN=cfg.chain, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return top, tile_k, key_low


def _class_pass(p: _Prepared, top: torch.Tensor, tile_k: int, key_low: int) -> None:
    """The class pass over the streaming pass's planes: rows sorted by (batch, segment, class of their label) on
    the device (no host synchronisation), then `_class_kernel` folds each row's class minimum into its second.
    (Fusing it with the finishing kernel, so that x is read once and the rows' operand recomputed from it, was
    slower: H200, N=8M K=1024, 3.4 ms with the sort against 2.0 for the two kernels. The fused program holds the
    operand tile for the products, 212 registers and two programs per SM, and its float64 epilogue then waits on
    each gathered chunk in turn; apart, the class kernel is bound by L2 (83 %, ncu) and the finishing kernel, at
    full occupancy, by L2 too (93 %: x and each row's centroid).)"""
    b, n_pad, d_pad = p.a_fast.shape
    k_pad = p.c_fast.shape[1]
    classes = class_count(k_pad, tile_k, key_low)
    seg_rows = class_segment_rows(classes)
    segs = triton.cdiv(n_pad, seg_rows)
    groups = b * segs * classes
    group = torch.empty(b * n_pad, dtype=torch.int16 if groups < 2 ** 15 else torch.int32, device=top.device)
    launch(_group_kernel, (triton.cdiv(b * n_pad, 1024),), top, top.stride(0), group, b * n_pad, n_pad, classes,
           1 << (key_low - 2), seg_rows, segs, TILE_K=tile_k, BLOCK=1024)
    group, order = torch.sort(group)
    cp = p.cfg.class_pass
    launch(_class_kernel, (triton.cdiv(b * n_pad, cp.block_n),),
           order, group, top, top.stride(0), p.a_fast, p.rowstat, p.c_fast, p.cc, b * n_pad, k_pad, d_pad,
           1 << (key_low - 2), segs, TILE_K=tile_k, BLOCK_N=cp.block_n, BLOCK_C=cp.block_c, BLOCK_D=p.cfg.block_d,
           RESIDENT=p.cfg.resident, PTX=not p.cfg.interpreted, CHAIN=p.cfg.chain, num_warps=cp.num_warps,
           num_stages=cp.num_stages)


def _resolve_launch(p: _Prepared, fast: FastAssignment, after_neighbours: bool = False) -> None:
    """The resolve pass over fast.lists[0], or over what the neighbour tier left (lists[2]); sizes come from the
    device (persistent programs): no host sync."""
    b, n, _ = p.x.shape
    cfg = p.cfg
    r = cfg.resolve
    n_pad, d_pad = p.a_fast.shape[1], p.a_fast.shape[2]
    programs = max(1, min(triton.cdiv(n, r.block_n), r.programs))
    x, cd, lists = p.x, p.c_dist, fast.lists
    launch(_resolve_kernel, (programs, b),
           x, x.stride(0), x.stride(1), x.stride(2), p.a_fast, p.rowstat, fast.threshold,
           p.c_fast, p.cc, cd, cd.stride(0), cd.stride(1), cd.stride(2),
           fast.labels, fast.min_dist, lists[2 if after_neighbours else 0], fast.counts, lists[1],
           n, n_pad, x.shape[2], cd.shape[1], p.c_fast.shape[1], d_pad, lists.stride(1), 3 if after_neighbours else 0,
           COSINE=p.cosine, MAX_CAND=MAX_CANDIDATES,
           # (centroid tiles no wider than the streaming pass's: the padding of K stays a multiple)
           BLOCK_N=r.block_n, BLOCK_K=min(r.block_k, cfg.block_k), BLOCK_D=cfg.block_d,
           RESIDENT=cfg.resident, EPI_D=cfg.epilogue_d, PTX=not cfg.interpreted,
           TOP2_REDUCE=not cfg.interpreted or _FORCE_TOP2_REDUCE, QUICK=r.quick, XB16=_xb16(x), CHAIN=cfg.chain,
           num_warps=r.num_warps, num_stages=r.num_stages)


BRUTE_SPLITS = 16  # centroid ranges the brute-force tier scores in parallel (its time is the latency of one range)


def _brute_launch(p: _Prepared, fast: FastAssignment) -> None:
    """Last tier: float64 brute force over fast.lists[1] (usually a few rows, or none: the launches find nothing
    to do). Its time is the latency of one program's walk over its share of K, so the rows go two at a time, the
    centroids in BRUTE_SPLITS ranges of 256-wide tiles, each (rows, range) pair to its own program: H200, 2M-row
    chunks at K=8192 with a few such rows: about 0.6 ms per chunk when one program walked all of K (19 ms of a
    0.31 s Lloyd step over 32 chunks, benchmarks/engine_fit.py --profile; 118 ms of 1.3 s on an H100 at N=180M),
    12 ms for the step's 64 launches of the two passes now (32 ms on the H100)."""
    b, n, d = p.x.shape
    cfg = p.cfg
    block_n, block_k = 2, (16 if cfg.interpreted else 256)
    n_pad = fast.lists.shape[2]
    k = p.c_dist.shape[1]
    k_split = triton.cdiv(triton.cdiv(k, BRUTE_SPLITS), block_k) * block_k
    programs = max(1, min(triton.cdiv(n, block_n) * BRUTE_SPLITS, cfg.resolve.programs))
    # per row: the smallest score (`_ordered`: +inf to start with) and the first index with it (as large)
    key, first = torch.full((2, b, n_pad), 0x7FF0000000000000, dtype=torch.int64, device=p.x.device)
    x, cd, rows, count = p.x, p.c_dist, fast.lists[1], fast.counts[:, 1:]
    common = (x, x.stride(0), x.stride(1), x.stride(2), cd, cd.stride(0), cd.stride(1), cd.stride(2))
    warps = 1 if cfg.interpreted else 8
    for pick in (False, True):
        launch(_brute_kernel, (programs, b), *common, rows, count, key, first, n, n_pad, k, d, rows.stride(0),
               k_split, PICK=pick, SPLITS=BRUTE_SPLITS, COSINE=p.cosine, BLOCK_N=block_n, BLOCK_K=block_k,
               EPI_D=16, XB16=_xb16(x), num_warps=warps)
    launch(_brute_finish_kernel, (max(1, min(triton.cdiv(n, 64), cfg.resolve.programs)), b), *common,
           fast.labels, fast.min_dist, rows, count, key, first, n, n_pad, d, rows.stride(0),
           COSINE=p.cosine, BLOCK_N=64, EPI_D=16, XB16=_xb16(x), num_warps=1 if cfg.interpreted else 4)


def _xb16(x: torch.Tensor) -> bool:
    """`_x_rows`'s XB16 for x (B, N, D): its batch stride is a multiple of 16 elements, or there is one
    batch. (Only where the row stride is one too: elsewhere x is read element by element anyway, and a flag that
    followed N's divisibility would compile a kernel per kind of N.)"""
    return x.shape[0] == 1 or (x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0)


def slot_of(labels: torch.Tensor, tile_k: int) -> torch.Tensor:
    """The slot of centroid `labels` in its tile_k-wide tile: columns {2g, 2g + 1, tile_k/2 + 2g,
    tile_k/2 + 2g + 1} share slot g (the four accumulator registers one thread holds on sm_90)."""
    return (labels % tile_k) % (tile_k // 2) // 2


def class_of(labels: torch.Tensor, tile_k: int, key_low: int) -> torch.Tensor:
    """The class of centroid `labels`: its slot in every tile of its chunk (chunks of 2**(key_low - 2) tiles),
    numbered chunk * (tile_k / 4) + slot. The streaming pass's second key covers every other centroid: those
    in other slots of the label's chunk, and those of other chunks (each chunk's best key bounds all of it)."""
    return labels // (tile_k << (key_low - 2)) * (tile_k // 4) + slot_of(labels, tile_k)


def class_count(k_pad: int, tile_k: int, key_low: int) -> int:
    """Classes per batch: (chunks of K) x (slots per tile)."""
    return triton.cdiv(k_pad, tile_k << (key_low - 2)) * (tile_k // 4)


CLASS_SEGMENT_ROWS = 8192  # rows per class (on average) in a segment of the class pass's sort
CLASS_SEGMENT_MIN_ROWS = 1 << 18  # ... and at least this many rows (fewer rows' planes stay in L2 anyway)


def class_segment_rows(classes: int) -> int:
    """Rows per segment of the class pass: rows are sorted by class within segments of this many rows, not over
    the whole batch, so the pass gathers each row's planes (label, |a|^2, second: 4-byte reads and writes at
    scattered rows) from a window that stays in L2. (H200, benchmarks/class_sweep.py, class pass with its sort,
    variants in turns: N=8M K=1024 1.18 ms in segments of 8192 rows per class against 1.50 unsegmented, 1.22 at
    32768 and 1.29 at 2048 rows per class, where a tile of rows meets more classes; N=4M K=8192 0.99 against
    1.08; N=1M within 0.01 ms either way.)"""
    return max(next_pow2(classes) * CLASS_SEGMENT_ROWS, CLASS_SEGMENT_MIN_ROWS)


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


def _resolve(p: _Prepared, fast: FastAssignment) -> None:
    """Make the flagged rows exact, in place, with no host synchronisation: the neighbour tier where the call has
    a neighbour table (`_neighbour_table`), the resolve pass for the rows it leaves (candidates under the
    threshold, float64 argmin among them), then float64 brute force for the rows that leaves (more than
    MAX_CANDIDATES candidates, or wide hits in two centroid tiles: duplicated centroids). The resolve and
    brute-force launches are made every time; with nothing listed they return at once."""
    table = _neighbour_table(p)
    if table is not None:
        from . import neighbours
        cfg = p.cfg
        neighbours.settle_launch(p.x, p.c_dist, table, fast.labels, fast.min_dist, fast.lists[0], fast.counts,
                                 fast.lists[2], cfg.resolve.programs, cfg.epilogue_d, cfg.interpreted, _xb16(p.x))
    _resolve_launch(p, fast, after_neighbours=table is not None)
    _brute_launch(p, fast)


def _neighbour_table(p: _Prepared):
    """The call's `neighbours.NeighbourTable` (euclidean; kept or built per `neighbours.table_for`), or None. In a
    compile-ahead dry run, a placeholder wherever a table could be used, so the tier's kernel is built with the
    others."""
    if not NEIGHBOUR_TIER or p.cosine:
        return None
    from . import neighbours
    b, k, _ = p.centroids.shape
    if compile_ahead.active():
        if k < neighbours.MIN_CENTROIDS:
            return None
        m, dev = neighbours.NEIGHBOURS, p.x.device
        return neighbours.NeighbourTable(torch.zeros((b, k, m), dtype=torch.int32, device=dev),
                                         torch.zeros((b, k, m), dtype=torch.float64, device=dev),
                                         torch.zeros((b, k), dtype=torch.float64, device=dev))
    return neighbours.table_for(p.centroids, p.x.shape[1])


def flash_assign(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", shift=None,
                 rows: PreparedRows | None = None, lower_bound: bool = False):
    """Nearest centroid of every row: (labels int64, min_dist), the semantics of `reference.assign`.

    x (N, D) with centroids (K, D), or batched x (B, N, D) with centroids (B, K, D) in one launch. fp16, bf16 and
    fp32 run on the kernel (float64 goes to the reference). Labels are exact (see the module docstring);
    min_dist is the float64 distance to the chosen centroid, returned as float32. `rows`: a `PreparedRows` that
    keeps the prepared rows of x across calls (the same results, less work). lower_bound (euclidean): a third
    result, float32 lower bounds on |x - c| for every centroid c but the label (0 where the fast pass's margin was
    too small to give one), as `reference.assign_lower`; bounded Lloyd steps keep them.
    """
    reference.check_metric(metric)
    if lower_bound and metric != "euclidean":
        raise ValueError(f"lower bounds are for metric='euclidean', got {metric!r}")
    xb, cb, batched = _as_batched(x, centroids)
    if xb.dtype not in (torch.float16, torch.bfloat16, torch.float32) or cb.shape[1] == 0:
        if lower_bound:
            return reference.assign_lower(x, centroids, shift=shift)
        return reference.assign(x, centroids, metric=metric, shift=shift)
    if xb.shape[1] == 0:
        shape = xb.shape[:2] if batched else xb.shape[1:2]
        empty = (torch.empty(shape, dtype=torch.int64, device=x.device),
                 torch.empty(shape, dtype=torch.float32, device=x.device))
        return empty + (torch.empty(shape, dtype=torch.float32, device=x.device),) if lower_bound else empty
    _compile_once(xb, cb, metric, shift, rows is not None, lower_bound)
    fast = _assign(xb, cb, metric, shift, rows, lower_bound)
    out = (fast.labels, fast.min_dist) + ((fast.lower,) if lower_bound else ())
    return out if batched else tuple(t[0] for t in out)


def _assign(xb: torch.Tensor, cb: torch.Tensor, metric: str, shift, rows: PreparedRows | None = None,
            lower: bool = False) -> FastAssignment:
    p = _prepare(xb, cb, metric, shift)
    fast = _fast_pass(p, rows, lower)
    _resolve(p, fast)
    return fast


COMPILE_AHEAD = True  # (benchmarks switch it off to measure what it saves)
_COMPILED: set = set()


def _compile_once(xb: torch.Tensor, cb: torch.Tensor, metric: str, shift, kept: bool = False,
                  lower: bool = False) -> None:
    """The first call of a kind of problem compiles all its kernels concurrently (a dry run of the passes inside
    `compile_ahead.ahead`), instead of one by one as each is first launched. The kind: what the kernels'
    specialisations can depend on (N never does: it is a run-time argument the kernels do not specialise on)."""
    if xb.device.type != "cuda" or not COMPILE_AHEAD:
        return
    key = (xb.device, xb.dtype, cb.dtype, metric, shift is None, cb.shape[1], xb.shape[2], xb.shape[0] > 1, kept,
           lower)
    if key in _COMPILED:
        return
    with compile_ahead.ahead():  # (kept rows: a throwaway PreparedRows; nothing runs here, so none may be bound)
        _assign(xb, cb, metric, shift, PreparedRows() if kept else None, lower)
    _COMPILED.add(key)
