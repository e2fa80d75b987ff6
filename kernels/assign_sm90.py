"""FlashAssign's streaming pass for Hopper (sm_90), in Gluon: warp-specialised, TMA-fed, no CTA-wide barriers.

Why a second version of the loop: in the portable `assign._assign_kernel` all warps of a program load each
centroid tile through registers, meet at a CTA barrier, multiply, wait for the product, then reduce the scores on
the ALU pipe; warps mostly wait.

Here persistent programs (one per SM, `config.StreamConfig.programs`) each walk row pairs of 2 x BLOCK_N rows
and run three partitions (`gl.warp_specialize`):
  - a loader (the default partition; it gives its registers up): TMA of a pair's two row tiles, then every
    centroid tile and its norms into a ring of NBUF shared-memory slots, each refilled as soon as both scorers
    freed it (the norms ride in the ring: from global memory their L2 latency stalled every tile, prefetched into
    registers they cost 32 registers a thread). The ring runs on from one pair to the next: the next pair's first
    tiles arrive while this pair's last ones are scored, its rows as soon as each scorer's last product is done;
  - two scorers (one warpgroup each, BLOCK_N rows each): wait for a slot, tensor-core product of their rows with
    it, free the slot, fold the scores into the chunk's slot minima (one lop3 and one min per score, see
    `assign`'s module docstring). Only the slots' mbarriers couple them, so one scorer's product runs on the
    tensor cores while the other folds its scores on the ALUs.
All row tiles of a program share each centroid tile: 2 x 128 rows (config.STREAM_SHAPE) read the centroids from
L2 half as often as the portable kernel's 128-row programs. At D = 256 two 128-row tiles would leave room for one
ring slot, so the scorers take 64 rows each there (config.STREAM_SHAPE_WIDE_D; H200, N=1M K=4096: the pass alone
2.99-3.14 ms, 684-734 TFLOP/s). A thread's four registers of a slot are the columns 8i + 2q + {0, 1} and those 64
further, so folding a tile moves no data between threads; the row reduction runs once per chunk of up to 32 tiles.
Measured on an H200 (benchmarks/stream_check.py, same process as flash-kmeans): the pass alone at N=1M, K=8192,
D=128 takes 3.25 ms (676 TFLOP/s), against 4.49 ms for the earlier per-tile top-2 reduction (three min/max per
score plus shuffles), which left the tensor and ALU pipes 55 % and 60 % busy.

Same operands, same accumulation (`aa + cc` as the accumulator's start, one m64n128k16 fp32 wgmma chain over D),
same keys, slots and chunk order as the portable kernel: each scorer writes its rows' (best key, smallest key of
the other slots, label) and the class pass and `assign._finish_kernel` run after it with the portable kernel's
own code, so both paths give the same bits (benchmarks/stream_check.py checks labels, distances, flags and
thresholds to the bit on the GPU; `reference.stream_slots` is the torch twin). Used on sm_90 for resident rows
with padded D <= 256 (`config.assign_config` decides); the interpreter and every other GPU run the portable kernel.
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
def _fold_slots(key, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """As `assign._fold_slots`: the smallest of each slot's four columns, which are four accumulator registers of
    one thread here (columns 8i + 2q + {0, 1} and 64 more), so no data moves between threads."""
    a, b = gl.split(gl.reshape(key, (BLOCK_N, BLOCK_K // 2, 2)))
    pair = gl.minimum(a, b)
    lo, hi = gl.split(gl.permute(gl.reshape(pair, (BLOCK_N, 2, BLOCK_K // 4)), (0, 2, 1)))
    return gl.minimum(lo, hi)


@gluon.jit
def _chunk_top(run, c0, key_low, BLOCK_K: gl.constexpr):
    """As `assign._chunk_top`: a chunk's best key, the smallest key of its other slots, the label of the best."""
    S: gl.constexpr = BLOCK_K // 4
    g = gl.arange(0, S, layout=gl.SliceLayout(0, run.type.layout))
    t1 = gl.min(run, 1)
    g1 = gl.minimum(gl.min(gl.where(run == t1[:, None], g[None, :], S), 1), S - 1)
    t2 = gl.min(gl.where(g[None, :] == g1[:, None], 3.0e38, run), 1)
    low = t1.to(gl.int32, bitcast=True) & ((1 << key_low) - 1)
    label = c0 + (low >> 2) * BLOCK_K + 2 * (g1 + S * ((low >> 1) & 1)) + (low & 1)
    return t1, t2, label


@gluon.jit
def _pair_row(pair, pairs_per_batch, n_pad, BLOCK_N: gl.constexpr):
    """First prepared row (over B n_pad) of row pair `pair`: pairs run batch by batch."""
    return (pair // pairs_per_batch) * n_pad + (pair % pairs_per_batch) * (2 * BLOCK_N)


@gluon.jit
def _load_partition(a_desc, c_desc, n_desc, a_smem, c_smem, n_smem, a_ready, a_empty, ready, empty, n_pad, k_pad,
                    pairs_per_batch, n_pairs, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, NBUF: gl.constexpr):
    """For each of the program's row pairs: the two scorers' row tiles, and centroid tile t and its norms into
    ring slot (running tile count) % NBUF once both scorers freed that slot. The ring never drains between pairs:
    the next pair's first NBUF - 1 tiles are fetched while the scorers finish this one, then its rows, as soon as
    each scorer's last product of this pair is done."""
    n_tiles = k_pad // BLOCK_K
    lead = gl.minimum(NBUF - 1, n_tiles - 1)
    it = 0
    j = 0
    for pair in range(gl.program_id(0), n_pairs, gl.num_programs(0)):
        a_row = _pair_row(pair, pairs_per_batch, n_pad, BLOCK_N)
        c_row = (pair // pairs_per_batch) * k_pad
        for t in range(n_tiles):
            if t == lead:
                for h in gl.static_range(2):
                    mbarrier.wait(a_empty.index(h), (j & 1) ^ 1)  # (a fresh barrier passes phase 1 at once)
                    mbarrier.expect(a_ready.index(h), a_desc.block_type.nbytes)
                    _tma_load(a_desc, [a_row + h * BLOCK_N, 0], a_ready.index(h), a_smem.index(h))
            slot = it % NBUF
            mbarrier.wait(empty.index(slot), ((it // NBUF) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), c_desc.block_type.nbytes + n_desc.block_type.nbytes)
            _tma_load(n_desc, [c_row + t * BLOCK_K], ready.index(slot), n_smem.index(slot))
            _tma_load(c_desc, [c_row + t * BLOCK_K, 0], ready.index(slot), c_smem.index(slot))
            it += 1
        j += 1


@gluon.jit
def _score_partition(a_smem, c_smem, n_smem, a_ready, a_empty, ready, empty, rowstat_ptr, top_ptr, n_pad, k_pad,
                     top_stride, pairs_per_batch, n_pairs, key_low, H: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_K: gl.constexpr, NBUF: gl.constexpr):
    """Scorer H: rows H of each of the program's pairs against every centroid tile. Per score one lop3 (the key:
    score bits with the tile within the chunk and the column within the slot in the low key_low bits) and one min
    into the chunk's running slot minima (`_fold_slots`); the row reduction runs once per chunk of
    2**(key_low - 2) tiles, not per tile. Writes the rows' (best key, smallest key outside the best's slot,
    label) to top_ptr's planes, as the portable kernel does. The next pair's row norms are loaded while this
    pair is scored (their global-memory latency would otherwise stall every pair's first product)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_K, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    offs_n = gl.arange(0, BLOCK_N, layout=rows_l)
    offs_k = gl.arange(0, BLOCK_K, layout=cols_l)
    place = (offs_k & 1) + 2 * (offs_k >= BLOCK_K // 2).to(gl.int32)
    low_mask = gl.full([BLOCK_N, BLOCK_K], -1, gl.int32, mma) << key_low
    n_tiles = k_pad // BLOCK_K
    chunk = 1 << (key_low - 2)
    step = gl.num_programs(0)
    row0 = _pair_row(gl.program_id(0), pairs_per_batch, n_pad, BLOCK_N) + H * BLOCK_N
    aa = gl.load(rowstat_ptr + (row0 + offs_n).to(gl.int64) * 2)
    it = 0
    j = 0
    for pair in range(gl.program_id(0), n_pairs, step):
        row0 = _pair_row(pair, pairs_per_batch, n_pad, BLOCK_N) + H * BLOCK_N  # (int64 only at the ends)
        nxt = _pair_row(pair + step, pairs_per_batch, n_pad, BLOCK_N) + H * BLOCK_N
        aa_next = gl.load(rowstat_ptr + (nxt + offs_n).to(gl.int64) * 2, mask=(offs_n >= 0) & (pair + step < n_pairs),
                          other=0.0)
        a_tile = a_smem.index(H)
        best = gl.full([BLOCK_N], 3.0e38, gl.float32, rows_l)
        second = gl.full([BLOCK_N], 3.0e38, gl.float32, rows_l)
        best_idx = gl.zeros([BLOCK_N], gl.int32, rows_l)
        mbarrier.wait(a_ready.index(H), j & 1)
        for c in range(0, n_tiles, chunk):
            run = _fold_slots(gl.full([BLOCK_N, BLOCK_K], 3.0e38, gl.float32, mma), BLOCK_N, BLOCK_K)
            for t in range(c, gl.minimum(c + chunk, n_tiles)):
                slot = it % NBUF
                mbarrier.wait(ready.index(slot), (it // NBUF) & 1)
                # the tile's norms come with it through the ring (from global memory their L2 latency stalled
                # every tile; prefetched into registers they cost 32 registers per thread)
                cc = n_smem.index(slot).load(cols_l)
                acc = warpgroup_mma(a_tile, c_smem.index(slot).permute((1, 0)), aa[:, None] + cc[None, :],
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index(slot), count=1)  # (the product is done: the slot may be refilled)
                mbarrier.arrive(a_empty.index(H), count=1, pred=t == n_tiles - 1)  # (after the last: the rows too)
                tag = gl.zeros([BLOCK_N, BLOCK_K], gl.int32, mma) + (((t - c) << 2) + place)[None, :]
                key = gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                                [acc.to(gl.int32, bitcast=True), low_mask, tag],
                                                dtype=gl.int32, is_pure=True, pack=1).to(gl.float32, bitcast=True)
                run = gl.minimum(run, _fold_slots(key, BLOCK_N, BLOCK_K))
                it += 1
            t1, t2, i1 = _chunk_top(run, c * BLOCK_K, key_low, BLOCK_K)
            t1 = gl.convert_layout(t1, rows_l)
            t2 = gl.convert_layout(t2, rows_l)
            i1 = gl.convert_layout(i1, rows_l)
            better = t1 < best  # strict: an earlier chunk keeps a tie
            second = gl.where(better, gl.minimum(best, t2), gl.minimum(second, t1))
            best_idx = gl.where(better, i1, best_idx)
            best = gl.where(better, t1, best)
        rows = (row0 + offs_n).to(gl.int64)
        gl.store(top_ptr + rows, best)
        gl.store(top_ptr + top_stride + rows, second)
        gl.store(top_ptr + 2 * top_stride + rows, best_idx.to(gl.float32, bitcast=True))
        aa = aa_next
        j += 1


@gluon.jit(do_not_specialize=["pairs_per_batch", "n_pairs"])  # (they follow N: a new N is no new kernel)
def _stream_kernel(a_desc, c_desc, n_desc, rowstat_ptr, top_ptr, n_pad, k_pad, top_stride, pairs_per_batch, n_pairs,
                   key_low, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, D_PAD: gl.constexpr, NBUF: gl.constexpr,
                   REGS: gl.constexpr):
    """Row pairs pid, pid + programs, ... (2 BLOCK_N rows each, over all batches) against all k_pad centroids of
    their batch, by two scorers of REGS registers per thread (see the module docstring)."""
    a_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, D_PAD], a_desc.layout)
    c_smem = gl.allocate_shared_memory(gl.float16, [NBUF, BLOCK_K, D_PAD], c_desc.layout)
    n_smem = gl.allocate_shared_memory(gl.float32, [NBUF, BLOCK_K], n_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(a_empty.index(i), count=1)  # its one scorer
    for i in gl.static_range(NBUF):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both scorers
    fence_async_shared()
    gl.warp_specialize([
        (_load_partition, (a_desc, c_desc, n_desc, a_smem, c_smem, n_smem, a_ready, a_empty, ready, empty, n_pad,
                           k_pad, pairs_per_batch, n_pairs, BLOCK_N, BLOCK_K, NBUF)),
        (_score_partition, (a_smem, c_smem, n_smem, a_ready, a_empty, ready, empty, rowstat_ptr, top_ptr, n_pad,
                            k_pad, top_stride, pairs_per_batch, n_pairs, key_low, 0, BLOCK_N, BLOCK_K, NBUF)),
        (_score_partition, (a_smem, c_smem, n_smem, a_ready, a_empty, ready, empty, rowstat_ptr, top_ptr, n_pad,
                            k_pad, top_stride, pairs_per_batch, n_pairs, key_low, 1, BLOCK_N, BLOCK_K, NBUF)),
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


def stream(a_fast: torch.Tensor, rowstat: torch.Tensor, c_fast: torch.Tensor, cc: torch.Tensor, sc,
           key_low: int) -> torch.Tensor:
    """(3, B n_pad) fp32 planes: best key, smallest key outside the best's slot, label bits (int32) of every
    prepared row (twin: `reference.stream_slots`). `sc` is the `config.StreamConfig`; n_pad must be a multiple
    of sc.rows, k_pad of sc.block_k; key_low is `config.key_bits(k_pad, sc.block_k)`."""
    b, n_pad, d_pad = a_fast.shape
    k_pad = c_fast.shape[1]
    a_desc, c_desc, n_desc = descriptors(a_fast, c_fast, cc, sc.block_n, sc.block_k)
    top = torch.empty((3, b * n_pad), dtype=torch.float32, device=a_fast.device)
    pairs_per_batch = n_pad // sc.rows
    n_pairs = b * pairs_per_batch
    programs = min(n_pairs, sc.programs) if sc.programs else n_pairs
    launch(_stream_kernel, (programs,), a_desc, c_desc, n_desc, rowstat, top, n_pad, k_pad, b * n_pad,
           pairs_per_batch, n_pairs, key_low, BLOCK_N=sc.block_n, BLOCK_K=sc.block_k, D_PAD=d_pad, NBUF=sc.stages,
           REGS=sc.regs, num_warps=4, num_stages=None)
    return top
