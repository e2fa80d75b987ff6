"""Launch parameters for the Triton kernels, derived from what the device reports, and the kernel launcher.

Why derived, not tabulated: a table keyed on GPU names is wrong for the next GPU; the tile shapes only depend on a
few numbers the driver reports (shared memory per block, L2 size, SM count, compute capability). No run-time
autotuning either: autotuning makes the first call slow and the choice depends on timing noise.

Only K-independent and N-independent quantities are compile-time (`tl.constexpr`): tile sizes, and D bucketed to a
power of two. N, K, D themselves are runtime arguments, so a new N or K never recompiles and only a handful of
variants (one per D bucket, dtype and mode) are ever built.

`launch` runs a kernel on CUDA tensors through the normal JIT, and on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported: the tests' conftest does it).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import compile_ahead

_CPU_SMEM = 48 * 1024  # nominal figures for the interpreter; they only shape tiny tiles
_SMEM_RESERVE = 8 * 1024  # what Triton keeps for reductions / barriers / layout conversions
_GLUON_RESERVE = 1024  # the sm_90 Gluon pass: mbarriers and a few 128-row layout conversions (built: 264 bytes)
MAX_RESIDENT_D = 256  # above this the row tile of x is streamed in D-chunks instead of held on chip


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class DeviceTraits:
    """The few device numbers the tile choice depends on."""

    sm_count: int
    smem_per_block: int  # bytes one program may use (opt-in maximum where the driver reports it)
    smem_per_sm: int
    l2_bytes: int
    capability: tuple[int, int]
    interpreted: bool  # CPU tensors: Triton's interpreter, tiny tiles


@functools.lru_cache(maxsize=None)
def _cuda_traits(index: int) -> DeviceTraits:
    p = torch.cuda.get_device_properties(index)
    cap = (int(getattr(p, "major", 8)), int(getattr(p, "minor", 0)))
    smem = (getattr(p, "shared_memory_per_block_optin", 0) or getattr(p, "max_shared_memory_per_block_optin", 0)
            or getattr(p, "shared_memory_per_block", 0) or 48 * 1024)
    per_sm = getattr(p, "shared_memory_per_multiprocessor", 0) or getattr(p, "max_shared_memory_per_multiprocessor",
                                                                       0) or smem
    l2 = getattr(p, "L2_cache_size", 0) or getattr(p, "l2_cache_size", 0) or 4 * 1024 * 1024
    sms = getattr(p, "multi_processor_count", 0) or 1
    return DeviceTraits(int(sms), int(smem), int(per_sm), int(l2), cap, False)


def device_traits(device) -> DeviceTraits:
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceTraits(os.cpu_count() or 1, _CPU_SMEM, _CPU_SMEM, 1 << 20, (0, 0), True)
    return _cuda_traits(device.index if device.index is not None else torch.cuda.current_device())


# D streamed, padded D >= STREAM_CHAIN_MIN_D: chunks of block_d features per accumulation chain of the scores. The
# error bound's accumulation term follows the chain's length, not D (`assign._row_bound`), so fewer rows go to the
# resolve pass, but each chain's end waits for its products, which slows the passes that score. (H200, blobs at
# N=1M K=4096, benchmarks/assign_ab.py, variants in turns: with chains of 2 chunks D=2048 flags 2.0 % of rows
# instead of 23 % and the assign takes 59.3 ms instead of 76.6; D=1024 1.5 % instead of 9.5 %, 24.1 ms instead
# of 25.4; an earlier run: chains of 1 chunk at D=1024 25.2 ms against 24.6, at D=512 chains of 2 12.9 against
# 11.6, at D=320 9.8 against 7.7; chains of 4 did not fit in shared memory. Chained, the 128 x 128 tiles in three
# stages leave one program per SM; 64-wide tiles in two stages, two per SM, took twice as long: 47.4 ms against
# 23.1 at D=1024, assign_ab_chain_tiles_h200.json.)
STREAM_CHAIN = 2
STREAM_CHAIN_MIN_D = 1024


@dataclass(frozen=True)
class ResolveConfig:
    """The resolve pass of FlashAssign (only the flagged rows, a few per cent): persistent programs walk tiles of
    `block_n` flagged rows; at most `programs` programs per batch."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    programs: int
    quick: bool = True  # skip the candidate work of a centroid tile where no row of the program has a hit


@dataclass(frozen=True)
class ClassConfig:
    """The class pass of FlashAssign (every row against the other centroids of its label's slot, K / 32 of them
    for 128-wide tiles): `block_n` rows sorted by class per program, `block_c` gathered centroids per product."""

    block_n: int
    block_c: int
    num_warps: int
    num_stages: int


MAX_CHUNK_TILES = 32  # tiles whose slot minima the streaming passes keep before folding them into the row's top two


def key_bits(k_pad: int, tile_k: int) -> int:
    """Low bits of a score key that carry its place (tile within the chunk, then column within the slot): as few
    as K needs, at most 7, the width of the old in-tile index (the keys' truncation enters the error margin)."""
    tiles = min(k_pad // tile_k, MAX_CHUNK_TILES)
    return 2 + max(0, tiles - 1).bit_length()


@dataclass(frozen=True)
class StreamConfig:
    """The warp-specialised streaming pass of FlashAssign on sm_90 (kernels/assign_sm90.py): a program's two
    scorer warpgroups (`regs` registers per thread each) score `block_n` rows each against `block_k`-wide centroid
    tiles arriving by TMA into a ring of `stages` shared-memory slots."""

    block_n: int
    block_k: int
    stages: int
    regs: int = 232
    programs: int = 0  # persistent programs, each walking row pairs (0: one program per pair)

    @property
    def rows(self) -> int:
        return 2 * self.block_n


@dataclass(frozen=True)
class AssignConfig:
    block_n: int  # rows of x per program
    block_k: int  # centroids per streamed tile (its index lives in the low log2(block_k) bits of a score key)
    block_d: int  # reduction chunk; == padded D when the x tile is resident
    resident: bool  # x tile loaded once and kept on chip for the whole centroid stream
    epilogue_d: int  # float64 chunk for the exact distance of the chosen centroid
    num_warps: int
    num_stages: int
    interpreted: bool = False  # CPU: Triton interpreter (no inline PTX, slow custom reductions)
    resolve: ResolveConfig = ResolveConfig(32, 16, 1, 1, 4)
    rows_block_n: int = 0  # row pass: rows per program (divides block_n; 0: block_n)
    rows_block_d: int = 64  # row pass: D-chunk cap (fp32 work tile rows x chunk)
    rows_warps: int = 0  # row pass: warps (0: num_warps)
    rows_stages: int = 2
    stream: StreamConfig | None = None  # sm_90: the Gluon streaming pass replaces the portable one
    class_pass: ClassConfig = ClassConfig(32, 16, 1, 1)
    finish: tuple[int, int, int] | None = None  # finishing kernel: rows per program, float64 chunk, warps
    #                                             (None: block_n, epilogue_d, num_warps)
    chain: int = 0  # D streamed: block_d chunks per accumulation chain of the scores (0: one chain over D)

    @property
    def row_multiple(self) -> int:
        """Prepared rows are padded to a multiple of this (the streaming pass's rows per program)."""
        return self.stream.rows if self.stream else self.block_n

    @property
    def chain_d(self) -> int:
        """Products per accumulation chain of the scores where they are chained (0: one chain over D)."""
        return self.chain * self.block_d

    @property
    def row_block_d(self) -> int:
        """D-chunk of the row pass (divides the padded D)."""
        return min(self.block_d, self.rows_block_d)

    def padded_d(self, d: int) -> int:
        return -(-d // self.block_d) * self.block_d

    def padded_k(self, k: int) -> int:
        return -(-k // self.block_k) * self.block_k


def assign_config(device, k: int, d: int, dtype: torch.dtype) -> AssignConfig:
    """Tiles for FlashAssign (`_assign_config`) on this device's traits. Kept per (traits, k, d, dtype): deriving
    them anew took about 50 us of host time per call, which a single call's kernels wait for."""
    return _assign_config(device_traits(device), k, d, dtype)


@functools.lru_cache(maxsize=4096)
def _assign_config(t: DeviceTraits, k: int, d: int, dtype: torch.dtype) -> AssignConfig:
    """Tiles for FlashAssign: fp16 tensor-core products of (BLOCK_N x BLOCK_D) x (BLOCK_D x BLOCK_K) tiles.

    Shared memory holds the x tile plus `num_stages` centroid tiles in flight (prefetch depth hides L2/HBM
    latency). The budget is first half an SM's shared memory, so that two programs share each SM: the min/argmin
    work on one program's score tile then overlaps the other's tensor-core products (within one program they are
    serialised, and at D=128 they cost about as much as the MMA); one program per SM if that does not fit.
    When the centroids do not fit in L2 every row block re-reads them from HBM, so taller row blocks (fewer
    re-reads) are preferred.
    """
    d_bucket = max(16, next_pow2(d))
    if t.interpreted:
        block_d = min(d_bucket, 64)
        return AssignConfig(32, 16, block_d, d_bucket <= 64, min(block_d, 32), 1, 1, True,
                            # (D streamed in chained scores, whatever D, so that the tests cover them)
                            ResolveConfig(32, 16, 1, 1, 4), chain=0 if d_bucket <= 64 else 2)

    # (dtype does not enter: the streamed operands are fp16 for every input dtype, see kernels/assign.py)
    resident = d_bucket <= MAX_RESIDENT_D
    block_d = d_bucket if resident else 64
    block_n = 128
    if k * -(-d // block_d) * block_d * 2 > t.l2_bytes // 2:
        block_n = 256  # halves the HBM re-reads of a centroid set that cannot stay in L2
    if t.capability[0] < 8:
        block_n = 64

    def smem(block_k: int, stages: int) -> int:
        if resident:  # one fp16 x tile + `stages` centroid tiles in flight
            return block_n * block_d * 2 + stages * block_k * block_d * 2
        return stages * (block_n + block_k) * block_d * 2  # x and centroid chunks both in flight

    # 128-wide centroid tiles amortise the per-tile work best (sm_90 SASS: ~8.5 instructions per score against
    # ~10.4 at 64 wide), so they come first, with at least two stages
    if block_n == 256 or t.capability[0] < 8:
        good = [(64, 4), (64, 3), (64, 2)]
    else:
        good = [(128, 3), (128, 2), (64, 4), (64, 3), (64, 2)]
    pick = None
    for programs_per_sm in (2, 1):
        avail = min(t.smem_per_block, t.smem_per_sm // programs_per_sm - 1024) - _SMEM_RESERVE
        pick = next((c for c in good if smem(*c) <= avail), None)
        if pick:
            break
    if pick is None:
        avail = t.smem_per_block - _SMEM_RESERVE
        pick = next((c for c in ((32, 2), (16, 2), (16, 1)) if smem(*c) <= avail), (16, 1))
    block_k, stages = pick
    num_warps = 8 if block_n >= 128 else 4
    # D streamed: a chain's chunks are unrolled, each with its own `stages` buffers
    chain = STREAM_CHAIN if (not resident and -(-d // block_d) * block_d >= STREAM_CHAIN_MIN_D
                             and STREAM_CHAIN * smem(block_k, stages) <= t.smem_per_block - _SMEM_RESERVE) else 0
    # row pass: 64-row programs of 4 warps (H200 sweep, N=8M D=128: 1.18 ms against 1.45 at 128 rows, 8 warps)
    return AssignConfig(block_n, block_k, block_d, resident, 32, num_warps, stages, False,
                        _resolve_config(t, block_d, resident, block_k, k), rows_block_n=64, rows_block_d=64,
                        rows_warps=4, rows_stages=2, stream=_stream_config(t, block_d, resident, block_k),
                        # (H200, benchmarks/class_sweep.py: 128 x 32, 4 warps best of five shapes at N=8M K=1024,
                        # N=1M K=8192 and N=1M K=4096 D=64; 1.38 ms against 2.50 for 128 x 64, 8 warps at 8M. D
                        # streamed, --streamed: 64 x 64, 3 stages best of eight at N=1M K=4096, with its sort
                        # 1.29 ms against 2.51 for 128 x 32 at D=1024, 0.85 against 1.31 at D=512)
                        class_pass=ClassConfig(128, 32, 4, 2) if resident else ClassConfig(64, 64, 4, 3),
                        # (H200, benchmarks/finish_sweep.py, shapes in turns: 32 rows, float64 chunks of 32, 4 warps;
                        # 0.83 ms against 0.88 for 64 rows and 0.92 for 64 rows in chunks of 64 at N=8M K=1024,
                        # 0.154 against 0.163 and 0.165 at N=1M K=8192)
                        finish=(32, 32, 4), chain=chain)


# sm_90 pass: rows per scorer, registers per scorer thread. (H200, N=1M K=8192 D=128, streaming pass alone: 4.47 ms
# for 2 scorers x 128 rows against 4.72 for 4 x 64 rows at 112 registers, which spills two; 4 scorers were dropped)
STREAM_SHAPE = (128, 232)
# where two 128-row tiles leave no room for two ring slots (D = 256: 128 KB of rows, 64 KB a slot), 64 rows each
# (at D = 256 a tile's product takes twice as long per score as at D = 128 and its fold no longer, so the two
# scorers still keep the tensor cores busy; H200, N=1M K=4096: 684-734 TFLOP/s for the pass alone)
STREAM_SHAPE_WIDE_D = (64, 232)


def _stream_config(t: DeviceTraits, block_d: int, resident: bool, block_k: int) -> StreamConfig | None:
    """sm_90 (wgmma + TMA; other GPUs keep the portable kernel), rows resident (D <= 256) and 128-wide centroid
    tiles (the portable kernel's key width, so both give the same keys): STREAM_SHAPE, or STREAM_SHAPE_WIDE_D if
    that leaves fewer than two ring slots, with as many ring slots as shared memory holds, at most 6 (the loader
    only has to stay a few tiles ahead). Persistent, one program per SM: a program's ring keeps streaming from one
    row pair to the next instead of draining, starting and filling again (H200, benchmarks/stream_variants.py, the
    pass alone against one program per pair: N=8M K=1024 4.48 -> 3.69 ms, where a pair is only 8 tiles; B=32
    N=75600 K=1000 1.26 -> 1.09; D=256 3.42 -> 3.22; K=8192 3.59 -> 3.49. A second row buffer per scorer, so the
    next rows load during a pair instead of after its last product, gained nothing: it costs ring slots)."""
    if t.capability != (9, 0) or not resident or block_k != 128 or not _has_gluon():
        return None
    for block_n, regs in (STREAM_SHAPE, STREAM_SHAPE_WIDE_D):
        stages = stream_ring_slots(t, block_n, block_d, block_k)
        if stages >= 2:
            return StreamConfig(block_n, block_k, stages, regs, t.sm_count)
    return None


def stream_ring_slots(t: DeviceTraits, block_n: int, block_d: int, block_k: int) -> int:
    """Ring slots of the sm_90 pass: as many centroid tiles (each with its norms) as shared memory holds next to
    the two scorers' row tiles, at most 6. (The Gluon kernel's own scratch, mbarriers and layout conversions of
    128-row vectors, is under 300 bytes: _GLUON_RESERVE, not Triton's _SMEM_RESERVE.)"""
    rows, tile = 2 * block_n * block_d * 2, block_k * block_d * 2 + block_k * 4
    return max(0, min(6, (t.smem_per_block - _GLUON_RESERVE - rows) // tile))


@functools.lru_cache(maxsize=None)
def _has_gluon() -> bool:
    try:
        from . import assign_sm90  # noqa: F401  (Triton without Gluon's Hopper API: the portable kernel only)
    except ImportError:
        return False
    return True


def _resolve_config(t: DeviceTraits, block_d: int, resident: bool, block_k: int, k: int) -> ResolveConfig:
    """Resolve pass: 64-row tiles (the flagged rows are few: more programs), centroid tiles as wide as the
    streaming pass's, two stages; persistent, two programs per SM. (H200 sweeps, D=128, 2% and 10.4% of 1M rows
    flagged: within noise of the best of 64/128 rows, 64/128 centroids, 4/8 warps, 2/3 stages, 1-4 per SM.)
    Tiles without a hit are skipped from 128 tiles on: a flagged row has a few hits in all, so with many tiles
    most have none in a 64-row program (H200, benchmarks/profile_kernels.py: 6.70 -> 5.0-5.4 ms at K=65536,
    7% of 1M rows flagged; 9.36 -> 7.9-8.5 at K=32768, 16M normal rows; at K=8192 it cost 0.29 -> 0.34).
    D streamed: 64-wide centroid tiles, three stages, four programs per SM (H200, benchmarks/profile_kernels.py,
    N=1M K=4096: 0.85 ms against 1.20 at D=512, 3.7-4.1 against 4.1-4.2 at D=1024, 4-10 % of rows flagged)."""
    if not resident:
        return ResolveConfig(64, 64, 4, 3, 4 * t.sm_count, quick=-(-k // 64) >= 128)
    block_n = 64
    stages = 2
    if block_n * block_d * 2 + stages * block_k * block_d * 2 > t.smem_per_block - _SMEM_RESERVE:
        block_k = max(16, block_k // 2)
    return ResolveConfig(block_n, block_k, 4, stages, 2 * t.sm_count, quick=-(-k // block_k) >= 128)


@dataclass(frozen=True)
class UpdateConfig:
    block_n: int  # positions of the sorted order per tile (a program walks many tiles)
    block_d: int  # feature chunk per program (a second grid axis)
    num_warps: int
    tiles_per_chunk: int  # a program reduces at most this many tiles of one cluster's run, then flushes once
    # (a chunk is cut at 2**10 rows whatever this says: its int64 totals must stay exact)
    interpreted: bool = False  # CPU: Triton interpreter (no inline PTX)


def update_config(device, d: int, dtype: torch.dtype) -> UpdateConfig:
    """Tiles for the sort-inverse update. It gathers rows, so it is latency-bound: many small programs in flight
    beat long loops; per-element register accumulators keep cross-thread reductions to one per program. 512-element
    tiles (8 rows of 64 features), 4 warps, chunks of 64 tiles (512 rows). (H200 sweep, benchmarks/profile_kernels.py
    --update-sweep, range checks deferred as a Lloyd step defers them: the whole update at N=8M K=1024 1.13 ms,
    N=1M K=8192 0.57, N=1M K=4096 D=256 0.60, 32000 runs of 75 rows 0.87, against 1.73, 0.63, 0.75 and 1.49 for the
    4096-element tiles of 64 x 64 chosen before, when the sweep also timed a wait for the device in every call.)"""
    t = device_traits(device)
    if t.interpreted:
        return UpdateConfig(16, 16, 1, 2, True)
    block_d = min(max(16, next_pow2(d)), 64)
    return UpdateConfig(512 // block_d, block_d, 4, 64)


# ----------------------------------------------------------------------------------------------------------------
# launching (CPU tensors -> Triton interpreter)


def _is_cpu(args) -> bool:
    """Whether the launch's tensors are on the CPU (the first tensor tells: a kernel's tensors share a device)."""
    return next((a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor)), False)


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int | None = 2, **constexprs) -> None:
    """kernel[grid](*args, **constexprs): compiled on CUDA tensors; on CPU tensors only under Triton's
    interpreter, which must be chosen (TRITON_INTERPRET=1) before triton is imported, as tests/conftest.py does.
    Inside `compile_ahead.ahead()` a CUDA launch is only compiled (concurrently with the block's others).
    num_stages=None: the kernel takes none (Gluon)."""
    if _is_cpu(args):
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(kernel, InterpretedFunction):
            raise RuntimeError("Triton kernels run on CPU tensors only under the interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported")
        kernel[grid](*args, **constexprs)
        return
    if compile_ahead.active():
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        compile_ahead.submit(kernel, grid, args, {**options, **constexprs})
    elif num_stages is None:  # (no dicts built on the way: a single call's launches are host time it waits for)
        kernel[grid](*args, num_warps=num_warps, **constexprs)
    else:
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
