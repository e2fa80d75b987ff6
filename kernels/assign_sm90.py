"""FlashAssign's streaming pass for Hopper (sm_90), in Gluon: warp-specialised, TMA-fed, no CTA-wide barriers.

Why a second version of the loop: in the portable `assign._assign_kernel` all warps of a program load each
centroid tile through registers, meet at a CTA barrier, multiply, wait for the product, then reduce the scores
(index bits, top-2) on the ALU pipe; warps mostly wait (profile at N=1M, K=8192, D=128: ALU pipe 54 % busy, issue
slots 43 %, 46 % of the fp16 matmul rate).

Here a program owns 2 x BLOCK_N rows and runs three partitions (`gl.warp_specialize`):
  - a loader (the default partition; it gives its registers up): TMA of the scorers' row tiles once, then every
    centroid tile into a ring of NBUF shared-memory slots, each refilled as soon as both scorers freed it;
  - two scorers (one warpgroup each, BLOCK_N rows each): wait for a slot, tensor-core product of their rows with
    it, free the slot, reduce the scores. Only the slots' mbarriers couple them, so one scorer's product runs on
    the tensor cores while another reduces its scores on the ALUs. The next tile's centroid norms are loaded
    under the product (the ring leaves L1 too small to keep them; loaded at use, their L2 latency stalled
    every tile).
All row tiles of a program share each centroid tile: 2 x 128 rows (config.STREAM_SHAPE) read the centroids from
L2 half as often as the portable kernel's 128-row programs. Measured on an H200 (benchmarks/stream_check.py, same
process): the streaming pass at N=1M, K=8192, D=128 takes 4.47 ms (about 480 TFLOP/s) against about 5.3 for the portable
kernel; tensor pipe ~55 % and ALU pipe ~60 % busy, so the two still overlap only partly (ncu: stalls on the
warpgroup barrier Triton puts before each mbarrier wait, on the ALU pipe, on dependencies). Making the two scorers
take strict turns on the tensor cores (FA3-style ping-pong, tried with mbarriers) was slower or no faster.

Same operands, same accumulation (`aa + cc` as the accumulator's start, one m64n128k16 fp32 wgmma chain over D),
same keys and top-2 as the portable kernel, whose register layout this is: each scorer writes its rows' (best key,
second key, label) and `assign._finish_kernel` runs the margin test and everything after the loop with the
portable kernel's own code, so both paths give the same bits (benchmarks/stream_check.py checks labels, distances,
flags and thresholds to the bit on the GPU). Used on sm_90 for resident rows with padded D <= 128
(`config.assign_config` decides); the interpreter and every other GPU run the portable kernel.
An option (`StreamConfig.overlap`) keeps two products in flight per scorer (64 rows each); it gives the same bits
but is faster at only some shapes (see config.StreamConfig), so it is off.
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .config import launch

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # (renamed after Triton 3.6)


@gluon.jit
def _top2_combine(a1, a2, b1, b2):
    """(smallest, second smallest) of two pairs: as `assign._top2_combine`."""
    return gl.minimum(a1, b1), gl.minimum(gl.maximum(a1, b1), gl.minimum(a2, b2))


@gluon.jit
def _tile_top2(acc, offs_k, BLOCK_K: gl.constexpr):
    """Keys (score bits with the in-tile index in the low log2(BLOCK_K) bits, one lop3) and their per-row
    (smallest, second smallest): the same keys and the same pairing as `assign._row_top2`."""
    layout: gl.constexpr = acc.type.layout
    bits = acc.to(gl.int32, bitcast=True)
    idx = gl.zeros(acc.shape, gl.int32, layout) + offs_k[None, :]
    mask = gl.full(acc.shape, -BLOCK_K, gl.int32, layout)
    key = gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [bits, mask, idx],
                                    dtype=gl.int32, is_pure=True, pack=1).to(gl.float32, bitcast=True)
    a, b = gl.split(gl.reshape(key, (acc.shape[0], BLOCK_K // 2, 2)))
    t1, t2 = gl.reduce((gl.minimum(a, b), gl.maximum(a, b)), 1, _top2_combine)
    rows_l: gl.constexpr = gl.SliceLayout(1, layout)  # (the same rows per thread: no data moves)
    return gl.convert_layout(t1, rows_l), gl.convert_layout(t2, rows_l)


@gluon.jit
def _load_partition(a_desc, c_desc, n_desc, a_smem, c_smem, n_smem, a_bar, ready, empty, n_pad, k_pad,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, NBUF: gl.constexpr, NORMS: gl.constexpr):
    """The two scorers' row tiles once, then centroid tile t (with NORMS, its norms too) into slot t % NBUF once
    both scorers freed that slot."""
    pid_n = gl.program_id(0)
    pid_b = gl.program_id(1)
    a_row = pid_b * n_pad + pid_n * (2 * BLOCK_N)
    c_row = pid_b * k_pad
    mbarrier.expect(a_bar, 2 * a_desc.block_type.nbytes)
    _tma_load(a_desc, [a_row, 0], a_bar, a_smem.index(0))
    _tma_load(a_desc, [a_row + BLOCK_N, 0], a_bar, a_smem.index(1))
    for t in range(k_pad // BLOCK_K):
        slot = t % NBUF
        mbarrier.wait(empty.index(slot), ((t // NBUF) & 1) ^ 1)  # (a fresh barrier passes phase 1 at once)
        if NORMS:
            mbarrier.expect(ready.index(slot), c_desc.block_type.nbytes + n_desc.block_type.nbytes)
            _tma_load(n_desc, [c_row + t * BLOCK_K], ready.index(slot), n_smem.index(slot))
        else:
            mbarrier.expect(ready.index(slot), c_desc.block_type.nbytes)
        _tma_load(c_desc, [c_row + t * BLOCK_K, 0], ready.index(slot), c_smem.index(slot))


@gluon.jit
def _tile_merge(acc, t, offs_k, best, second, best_idx, BLOCK_K: gl.constexpr):
    """Fold tile t's scores into the running (best key, second key, label) per row; an earlier tile keeps a tie."""
    t1, t2 = _tile_top2(acc, offs_k, BLOCK_K)
    i1 = (t1.to(gl.int32, bitcast=True) & (BLOCK_K - 1)) + t * BLOCK_K
    better = t1 < best  # strict: an earlier tile keeps a tie
    second = gl.where(better, gl.minimum(best, t2), gl.minimum(second, t1))
    best_idx = gl.where(better, i1, best_idx)
    best = gl.where(better, t1, best)
    return best, second, best_idx


@gluon.jit
def _issue(a_tile, c_smem, n_smem, ready, t, aa, cols_l: gl.constexpr, NBUF: gl.constexpr):
    """OVERLAP: start tile t's product once its slot is filled, seeded with aa + the tile's norms (read from the
    slot, where the loader put them: two accumulators leave no registers to hold the next tile's norms)."""
    slot = t % NBUF
    mbarrier.wait(ready.index(slot), (t // NBUF) & 1)
    cc = n_smem.index(slot).load(cols_l)
    return warpgroup_mma(a_tile, c_smem.index(slot).permute((1, 0)), aa[:, None] + cc[None, :], is_async=True)


@gluon.jit
def _retire(acc, empty, t, offs_k, best, second, best_idx, PENDING: gl.constexpr, BLOCK_K: gl.constexpr,
            NBUF: gl.constexpr):
    """Wait for tile t's product (PENDING later ones may stay in flight), free its slot, fold its scores in."""
    acc = warpgroup_mma_wait(num_outstanding=PENDING, deps=(acc,))
    mbarrier.arrive(empty.index(t % NBUF), count=1)  # (the product is done: the slot may be refilled)
    return _tile_merge(acc, t, offs_k, best, second, best_idx, BLOCK_K)


@gluon.jit
def _score_partition(a_smem, c_smem, n_smem, a_bar, ready, empty, rowstat_ptr, cc_ptr, top_ptr, n_pad, k_pad,
                     top_stride, H: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, NBUF: gl.constexpr,
                     OVERLAP: gl.constexpr):
    """Scorer H: its BLOCK_N rows against every centroid tile, running best / second key and label per row as in
    the portable kernel (an earlier tile keeps a tie), written to top_ptr's three planes.

    OVERLAP (config.StreamConfig.overlap): two products in flight, tile t+1's issued before tile t's scores are
    reduced, so this scorer's own tensor-core work runs under its ALU work; it needs two accumulators, so 64 rows
    per scorer. The loop is unrolled by two so that each accumulator keeps its registers: an in-flight
    accumulator copied at the loop's back edge makes ptxas serialise every wgmma (C7514), and so did the other
    shapes of this loop tried (the tail below without its branch; two half-tile accumulators of 128 rows);
    benchmarks/sm90_build.py --overlap 1 --block-n 64 prints ptxas's notes. Same keys and merge order, so the
    same output to the bit."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_K, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    pid_n = gl.program_id(0)
    pid_b = gl.program_id(1)
    local = pid_n * (2 * BLOCK_N) + H * BLOCK_N + gl.arange(0, BLOCK_N, layout=rows_l)
    rows = (pid_b * n_pad + local).to(gl.int64)
    offs_k = gl.arange(0, BLOCK_K, layout=cols_l)
    aa = gl.load(rowstat_ptr + rows * 2)
    best = gl.full([BLOCK_N], 3.0e38, gl.float32, rows_l)
    second = gl.full([BLOCK_N], 3.0e38, gl.float32, rows_l)
    best_idx = gl.zeros([BLOCK_N], gl.int32, rows_l)
    a_tile = a_smem.index(H)
    last = k_pad // BLOCK_K - 1
    if OVERLAP:
        mbarrier.wait(a_bar, 0)
        acc_a = _issue(a_tile, c_smem, n_smem, ready, 0, aa, cols_l, NBUF)
        for p in range(last // 2):  # tiles t (in flight in acc_a) and t + 1
            t = 2 * p
            acc_b = _issue(a_tile, c_smem, n_smem, ready, t + 1, aa, cols_l, NBUF)
            best, second, best_idx = _retire(acc_a, empty, t, offs_k, best, second, best_idx, 1, BLOCK_K, NBUF)
            acc_a = _issue(a_tile, c_smem, n_smem, ready, t + 2, aa, cols_l, NBUF)
            best, second, best_idx = _retire(acc_b, empty, t + 1, offs_k, best, second, best_idx, 1, BLOCK_K,
                                             NBUF)
        t = last - last % 2  # acc_a holds tile t; an even tile count leaves one more
        if t < last:
            acc_b = _issue(a_tile, c_smem, n_smem, ready, last, aa, cols_l, NBUF)
            best, second, best_idx = _retire(acc_a, empty, t, offs_k, best, second, best_idx, 1, BLOCK_K, NBUF)
            best, second, best_idx = _retire(acc_b, empty, last, offs_k, best, second, best_idx, 0, BLOCK_K,
                                             NBUF)
        else:
            best, second, best_idx = _retire(acc_a, empty, t, offs_k, best, second, best_idx, 0, BLOCK_K, NBUF)
    else:
        cc_row = cc_ptr + pid_b * k_pad
        cc = gl.load(cc_row + offs_k)
        mbarrier.wait(a_bar, 0)
        for t in range(last + 1):
            slot = t % NBUF
            mbarrier.wait(ready.index(slot), (t // NBUF) & 1)
            acc = warpgroup_mma(a_tile, c_smem.index(slot).permute((1, 0)), aa[:, None] + cc[None, :],
                                is_async=True)
            # the next tile's norms, loaded under the product (the centroid ring leaves L1 too small to keep
            # them: loaded just before use, their L2 latency stalled every tile)
            cc = gl.load(cc_row + gl.minimum(t + 1, last) * BLOCK_K + offs_k)
            best, second, best_idx = _retire(acc, empty, t, offs_k, best, second, best_idx, 0, BLOCK_K, NBUF)
    gl.store(top_ptr + rows, best)
    gl.store(top_ptr + top_stride + rows, second)
    gl.store(top_ptr + 2 * top_stride + rows, best_idx.to(gl.float32, bitcast=True))


@gluon.jit
def _stream_kernel(a_desc, c_desc, n_desc, rowstat_ptr, cc_ptr, top_ptr, n_pad, k_pad, top_stride,
                   BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, D_PAD: gl.constexpr, NBUF: gl.constexpr,
                   REGS: gl.constexpr, OVERLAP: gl.constexpr):
    """Rows [2 BLOCK_N pid_n, +2 BLOCK_N) of batch pid_b against all k_pad centroids, by two scorers of REGS
    registers per thread (see the module docstring)."""
    a_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, D_PAD], a_desc.layout)
    c_smem = gl.allocate_shared_memory(gl.float16, [NBUF, BLOCK_K, D_PAD], c_desc.layout)
    n_smem = gl.allocate_shared_memory(gl.float32, [NBUF if OVERLAP else 1, BLOCK_K], n_desc.layout)
    a_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout()).index(0)
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(a_bar, count=1)
    for i in gl.static_range(NBUF):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both scorers
    fence_async_shared()
    gl.warp_specialize([
        (_load_partition, (a_desc, c_desc, n_desc, a_smem, c_smem, n_smem, a_bar, ready, empty, n_pad, k_pad,
                           BLOCK_N, BLOCK_K, NBUF, OVERLAP)),
        (_score_partition, (a_smem, c_smem, n_smem, a_bar, ready, empty, rowstat_ptr, cc_ptr, top_ptr, n_pad,
                            k_pad, top_stride, 0, BLOCK_N, BLOCK_K, NBUF, OVERLAP)),
        (_score_partition, (a_smem, c_smem, n_smem, a_bar, ready, empty, rowstat_ptr, cc_ptr, top_ptr, n_pad,
                            k_pad, top_stride, 1, BLOCK_N, BLOCK_K, NBUF, OVERLAP)),
    ], [4, 4], [REGS, REGS])


@functools.lru_cache(maxsize=None)
def _layouts(block_n: int, block_k: int, d_pad: int):
    return (gl.NVMMASharedLayout.get_default_for([block_n, d_pad], gl.float16),
            gl.NVMMASharedLayout.get_default_for([block_k, d_pad], gl.float16),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1))


def descriptors(a_fast: torch.Tensor, c_fast: torch.Tensor, cc: torch.Tensor, block_n: int, block_k: int):
    """TMA descriptors of the prepared rows (B n_pad, d_pad), centroid operands (B k_pad, d_pad) and centroid
    norms (B k_pad)."""
    d_pad = a_fast.shape[-1]
    a_layout, c_layout, n_layout = _layouts(block_n, block_k, d_pad)
    a2, c2, n1 = a_fast.reshape(-1, d_pad), c_fast.reshape(-1, d_pad), cc.reshape(-1)
    return (TensorDescriptor(a2, list(a2.shape), list(a2.stride()), [block_n, d_pad], a_layout),
            TensorDescriptor(c2, list(c2.shape), list(c2.stride()), [block_k, d_pad], c_layout),
            TensorDescriptor(n1, list(n1.shape), list(n1.stride()), [block_k], n_layout))


def stream(a_fast: torch.Tensor, rowstat: torch.Tensor, c_fast: torch.Tensor, cc: torch.Tensor, sc) -> torch.Tensor:
    """(3, B n_pad) fp32 planes: best key, second key, label bits (int32) of every prepared row.
    `sc` is the `config.StreamConfig`; n_pad must be a multiple of sc.rows, k_pad of sc.block_k."""
    b, n_pad, d_pad = a_fast.shape
    k_pad = c_fast.shape[1]
    a_desc, c_desc, n_desc = descriptors(a_fast, c_fast, cc, sc.block_n, sc.block_k)
    top = torch.empty((3, b * n_pad), dtype=torch.float32, device=a_fast.device)
    launch(_stream_kernel, (n_pad // sc.rows, b), a_desc, c_desc, n_desc, rowstat, cc, top, n_pad, k_pad, b * n_pad,
           BLOCK_N=sc.block_n, BLOCK_K=sc.block_k, D_PAD=d_pad, NBUF=sc.stages, REGS=sc.regs, OVERLAP=sc.overlap,
           num_warps=4, num_stages=None)
    return top
