"""The per-device engine over partitions: chunked host->device streaming, the GPU as a cache, OOM back-off.

One `Engine` serves one device. A Lloyd step over its blocks (NumPy / CPU or pinned torch on the host; torch on
the device) returns exact partials, inertia and the number of labels changed; labels stay with the engine (host
blocks: a pinned host tensor per block, written chunk by chunk on the compute stream; device blocks: a device
tensor). Host rows are copied in chunks through two pinned staging buffers on a copy stream, so the copy of chunk
i+1 overlaps the kernels of chunk i. Rows that fit in the cache budget are kept on the device after their first copy and never streamed again.
Because the sums are exact, the chunk size, the cache size and the split into blocks never change a bit of the
result, and an out-of-memory error can simply halve the chunk and run the step again.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch

from flashkm_dist.engine import (Backend, FitNumerics, backend_for, exact_inertia, prepared_row_bytes,
                                 unit_rows_like)
from flashkm_dist.kernels import bounds as kbounds
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import host_rows, neighbours, reference
from flashkm_dist.kernels.checks import DeferredChecks

# One staging buffer: 1 GiB, or 1/64 of a smaller device's memory. Fewer, larger chunks cost less host work per row
# (H100, N=180M, 59 GiB cached, K=8192, same run: 1 GiB against 256 MiB, plain steps 1.08 s against 1.11 after
# the first iteration, bounded ones skipping settled rows 0.651 against 0.712).
CHUNK_BYTES = 1 << 30
CACHE_FRACTION = 0.8  # of the free device memory, for 'auto'
CACHED_CHUNK_FACTOR = 4  # rows served from the cache go through the kernels this many staging chunks at a time
# Bounded steps score streamed chunks whole below this K: their copy takes longer than scoring all their rows (per
# row 2 K D flops at ~700 TFLOP/s against 4 D bytes at ~55 GB/s: equal near K = 25000 on an H100), so the bounds
# would save nothing, while the wait for the device they need per chunk stalls the copies (H100, N=180M, 59 GiB
# cached: bounded steps 1.36 s, plain 1.24, benchmarks/engine_fit.py; again with table settling and 1 GiB chunks:
# skipping fits 0.732 s after the first iteration with streamed chunks bounded, 0.651 without; with one pass over
# the host blocks, 0.644 against 0.631, results/engine_fit_h100x1_n180m_one_pass_variants.json).
STREAMED_BOUNDS_MIN_K = 16384
# Steps skip settled host rows (`Engine.skip_settled`) unless more than this share of the rows the last step
# tested was stale (missed by the bound alone): then reading most rows in place costs more than copying them beside
# the kernels (H100, N=180M, before the reads ran on a side stream: a step with every row stale took 3.19 s
# skipping, 2.53 s copying). With side-stream reads and table settling (same run, 4 GiB skipping chunks): 0.676 s
# per iteration after the first at 0.7, 0.703 at 0.5 (results/engine_fit_h100x1_n180m_settle.json); at 1.0 the
# third iteration skipped, so the re-seeding after it had no kept candidates and read every row (2.17 s,
# results/engine_fit_h100x1_n180m_eager.json). With one pass over the host blocks, 0.631 s at 0.7, 0.628 at 0.5
# (results/engine_fit_h100x1_n180m_one_pass_variants.json).
SKIP_MAX_STALE = 0.7
# A skipping pass copies nothing, so its chunks (cached rows too) can be larger: this many bytes of rows, for less
# host work per row (H100, N=180M, profiled: 88 chunks of 1 GiB took 0.69 s for 0.47 s of kernels; 24 chunks of
# 4 GiB, 0.55 s). Not more: a chunk's stale rows are gathered on the device whole. With 16 GiB chunks a step with
# 61 % of the rows stale ran without bounds and every later step read twice the rows: the signs of an
# out-of-memory back-off, which drops the cache (results/engine_fit_h100x1_n180m_variants.json, bounded_skip_mid).
SKIP_CHUNK_BYTES = 4 << 30
# Streamed chunks' labels (and lower bounds, where their bounds are tested) go to the device on the copy stream,
# right after their rows, not on the compute stream: there the kernels waited for that copy, which apparently
# queued behind the copy stream's chunks (H100, N=60M, 19 GiB cached, profiled: gaps ended by it, 100 ms per
# plain step; steps 0.360 s against 0.388 plain, 0.313 against 0.355 bounded and skipping, in
# results/engine_fit_h100x1_n60m_timeline.json). Two fresh streams do not show it: a 16 MB copy beside a 1 GiB
# one took 0.31 ms, as alone (`side_copy` there).
READ_STATE_ON_COPY_STREAM = True
# A pass spreads the cached and skipped chunks of all host blocks between the streamed chunks of all of them
# (`pass_order`); False: block by block, as before (a fully cached block left the copy stream idle, a block with
# no cache the kernels waiting for its copies; H100, N=180M in 4 blocks, same run: per iteration after the first,
# plain fits 0.869 s against 1.061, skipping ones 0.624 against 0.660, results/engine_fit_h100x1_n180m_one_pass.json).
ONE_HOST_PASS = True
# The first steps of a run keep this many candidates for empty clusters anyway: a fit from random rows empties
# clusters early, and the re-seeding after a step that kept none re-assigns every row (H100, N=180M: iteration 2
# took 2.2-2.6 s, against 1.2-1.3 s for iteration 3, whose re-seeding read the candidates its step kept)
FIRST_STEPS, FIRST_STEPS_KEPT = 3, 1024
BOUND_BATCH_ROWS = 1 << 23  # a batch of bound tests is also full at this many rows (their pending outputs: 136 MB)
BOUND_BATCH = 4  # bounded steps read the numbers of rows to score of this many resident chunks in one wait (two
#                 batches' tests, 17 bytes a row, wait at a time: 270 MB for 2M-row cached chunks)


class _Test(NamedTuple):
    """A chunk's bound test in a bounded step, queued (nothing waits for it)."""

    labels: torch.Tensor  # after the test: kept, or settled from the neighbour table (a skipped chunk's: as kept)
    dist: torch.Tensor | None  # exact distances to `labels` (a skipped chunk: None, its rows are not on the device)
    lower: torch.Tensor  # new lower bounds (0: stale)
    stale: torch.Tensor  # bool: rows to assign (a skipped chunk's: to read in place first)
    missed: torch.Tensor  # bool: rows the bound alone did not keep (what SKIP_MAX_STALE counts)
    upper: torch.Tensor | None = None  # a skipped chunk's new upper bounds
    before: torch.Tensor | None = None  # a skipped chunk's lower bounds before the test (its read rows' settling)


@dataclass
class Block:
    """One partition. `key` names it across steps (cache entries, previous labels); default: its position."""

    data: object
    weights: torch.Tensor | None = None
    key: object = None

    def __post_init__(self):
        # As a tensor once: every step looks at every block several times, and a CuPy array's DLPack hand-over
        # costs about 10 us each time (H200), outside the kernels, on every iteration.
        self.data = _as_tensor(self.data)


@dataclass
class EngineStep:
    """What one device contributes to an iteration: all exact, so steps of several devices simply add up.
    A step taken with `wait=False` has not read anything back yet: `n_changed` is None until `settle`."""

    partials: reference.Partials
    inertia: torch.Tensor  # limbs (2,)
    n_changed: int | None
    seconds: float = 0.0  # wall time of the step on this device (it ends synchronised unless wait=False)
    changed: torch.Tensor | None = None  # 0-d int64 on the device (a step not yet settled)
    checks: DeferredChecks = field(default_factory=DeferredChecks)
    rescored: int | None = None  # bounded steps: rows that went through the assignment over all K (the others
    #                              kept their labels or were settled from the neighbour table)
    gathered: int = 0  # rows of skipped host chunks the device read in place (`Engine.skip_settled`)
    inertia_complete: bool = True  # False when settled host rows were skipped: `inertia` covers only rows scored

    def pending(self) -> torch.Tensor:
        """The int64 values a settle reads back (labels changed, then the kernels' checks), on the device."""
        return torch.cat([self.changed.reshape(1), self.checks.values(self.changed.device)])

    def settle(self, host: list | None = None) -> "EngineStep":
        """Raise what the kernels' checks found, and set n_changed: from `host`, `pending()` as read back by the
        caller with its own scalars, or by reading it now."""
        if self.n_changed is None:
            host = self.pending().tolist() if host is None else list(host)
            self.checks.verify(host[1:])
            self.n_changed = int(host[0])
        return self


@dataclass
class Farthest:
    """Candidates for empty clusters: distance to their centre, global position, weighted rows (float64),
    weights and labels. Merging keeps the n farthest, ties to the lower position, so any split of the rows over
    chunks, blocks or workers picks the same rows."""

    dist: torch.Tensor
    position: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def none(cls, n_features: int) -> "Farthest":
        f64 = torch.float64
        return cls(torch.empty(0, dtype=f64), torch.empty(0, dtype=torch.int64), torch.empty((0, n_features), dtype=f64),
                   torch.empty(0, dtype=f64), torch.empty(0, dtype=torch.int64))

    def parts(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def to(self, device) -> "Farthest":
        return Farthest(*(t.to(device) for t in self.parts()))

    def positive(self) -> "Farthest":
        """Without the placeholders of rows of weight 0 (distance -1, kept while merging to avoid a wait)."""
        keep = self.dist >= 0
        return Farthest(*(t[keep] for t in self.parts()))

    @classmethod
    def of_chunk(cls, x: torch.Tensor, weights, labels: torch.Tensor, dist: torch.Tensor, first: int,
                 n: int) -> "Farthest":
        """The n candidates of one chunk of rows (positions from `first`), on its device, without a wait: rows of
        weight 0 stay in as placeholders at distance -1 (`positive` drops them)."""
        dist = dist.to(torch.float64)
        if weights is not None:
            dist = torch.where(weights > 0, dist, torch.full_like(dist, -1.0))
        order = torch.sort(dist, descending=True, stable=True).indices[:n]
        w = None if weights is None else weights[order]
        return cls(dist[order], order + first, reference.weighted_rows(x[order], w),
                   torch.ones(order.numel(), dtype=torch.float64, device=x.device) if w is None else w, labels[order])

    @classmethod
    def merge(cls, parts: list, n: int) -> "Farthest":
        columns = [torch.cat(same) for same in zip(*(p.parts() for p in parts))]
        by_position = torch.sort(columns[1], stable=True).indices
        columns = [f[by_position] for f in columns]
        keep = torch.sort(columns[0], descending=True, stable=True).indices[:n]
        return cls(*(f[keep] for f in columns))


@dataclass
class _Chunk:
    index: int  # block position in the step's list
    start: int
    x: torch.Tensor  # rows on the engine's device, compute dtype
    weights: torch.Tensor | None
    cached: bool = False  # host rows served from the device cache (their labels stay on the device too)
    streamed: bool = False  # host rows that came through the staging buffers in this pass
    tail: bool = False  # host rows past the cache, streamed in every later pass (`Engine.skip_settled`)
    host: torch.Tensor | None = None  # a skipped tail chunk: its rows on the host, not copied (x is None)
    prior: tuple = (None, None)  # streamed rows: their (labels, lower bounds) read on the copy stream, or None

    @property
    def n(self) -> int:
        return (self.x if self.x is not None else self.host).shape[0]


@dataclass
class _HostPlan:
    """How a pass takes one host block's rows (`Engine._host_plan`)."""
    index: int  # block position in the step's list
    data: torch.Tensor
    weights: torch.Tensor | None
    rows: int  # per streamed chunk
    cached: torch.Tensor | None  # the block's cache entry
    fill: bool  # this pass fills the entry from the streamed rows
    tail: int  # rows from here on are streamed in every later pass
    spans: list = field(default_factory=list)  # (start, stop) served from the cache entry
    skipped: list = field(default_factory=list)  # (start, stop) left on the host (x None)
    starts: list = field(default_factory=list)  # of the chunks streamed through staging
    pinned: bool = False  # the rows are page-locked (copied by DMA, not through host staging)
    stores: tuple = (None, None)  # `Engine._carried_stores`


def cached_prefix(n: int, rows: int, n_cached: int, filling: bool) -> int:
    """Rows [0, end) of a host block that a pass serves from the device cache: the whole staging chunks inside
    the cache, or all of it when all of it is cached; none in the pass that fills the cache."""
    if filling:
        return 0
    return n if n_cached >= n else n_cached // rows * rows


def cached_chunks(end: int, rows: int, factor: int | None = None) -> list:
    """(start, stop) of the chunks the cached rows [0, end) go through the kernels in: CACHED_CHUNK_FACTOR staging
    chunks at a time (nothing is copied for them, and every chunk costs some fixed kernel work), at the
    multiples of that size, so each chunk is the same view of the cache at every step (its prepared rows can be
    kept)."""
    size = rows * (factor or CACHED_CHUNK_FACTOR)
    return [(s, min(s + size, end)) for s in range(0, end, size)]


def interleaved(cached: int, streamed: int) -> list:
    """How many `cached` chunks to serve before each of the `streamed` ones (the rest after the last): spread
    evenly, so the kernels on cached rows can run while the next streamed chunk is on its way (they used to run
    first, while only the first streamed chunk was being copied), and at least one first, if any, so the kernels
    do not wait for the first copy (H100, N=180M: they did, 20 ms per step). Measured on an H100 at N=180M, 59 GiB
    cached: plain steps about the same (1.40-1.47 s, before 1.41-1.42), bounded ones from the fifth iteration
    1.39-1.75 s (before 1.51-1.90)."""
    marks = [-(-(i + 1) * cached // (streamed + 1)) for i in range(streamed)]
    return [b - a for a, b in zip([0, *marks], marks)]


def spread(base: list, items: list) -> list:
    """items placed evenly between the elements of base (`interleaved`), in their own order."""
    out, rest = [], iter(base)
    for item, share in zip(items, interleaved(len(base), len(items))):
        out.extend(next(rest) for _ in range(share))
        out.append(item)
    return out + list(rest)


def pass_order(counts: list) -> list:
    """The order of a pass over host blocks, as (kind, block, i) for the i-th chunk of that kind of block b,
    given each block's numbers of (cached, skipped, streamed) chunks: the skipped chunks spread between the
    cached ones (each is read on a side stream while the next ones are scored), and the streamed chunks spread
    between both (each is copied while the chunks before it are scored), over all blocks."""
    def of(kind, position, blocks):
        return [(kind, b, i) for b in blocks for i in range(counts[b][position])]

    def one_pass(blocks):
        return spread(spread(of("cached", 0, blocks), of("skipped", 1, blocks)), of("streamed", 2, blocks))
    if not ONE_HOST_PASS:
        return [item for b in range(len(counts)) for item in one_pass([b])]
    return one_pass(range(len(counts)))


def _as_tensor(data) -> torch.Tensor:
    if torch.is_tensor(data):
        return data
    if type(data).__module__.split(".")[0] == "cupy":
        return torch.from_dlpack(data)
    arr = np.asarray(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays are never written to
        return torch.from_numpy(arr if all(s >= 0 for s in arr.strides) else np.ascontiguousarray(arr))


def _sizes(blocks) -> tuple:
    return tuple(_as_tensor(b.data).shape[0] for b in blocks)


def _offsets(sizes) -> list:
    """The first position of every block (of these numbers of rows), laid end to end."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _queued_count(*masks: torch.Tensor) -> tuple:
    """(the numbers of True in the masks, an event or None): on a GPU the numbers are copied into page-locked
    memory right after the kernels queued so far, and the event tells when they have landed, so reading them waits
    for those kernels only, not for work queued later on the stream (a read of a device tensor would)."""
    n = torch.stack([mask.sum() for mask in masks])
    if not n.is_cuda:
        return n, None
    host = torch.empty(len(masks), dtype=torch.int64, pin_memory=True)
    host.copy_(n, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _added(total: tuple | None, part: tuple) -> tuple:
    """The running (sums, counts, inertia) limbs of a step's chunks plus one chunk's: the first chunk's as they
    are (one chunk is the common case on a GPU: no K x D zero-fill, additions and carries), then exact integer
    sums (at most two K x D arrays alive: a step over many chunks holds no chunk's partials)."""
    return part if total is None else tuple(a + b for a, b in zip(total, part))


def _normalised(total: tuple | None, chunks: int, k: int, d: int, device) -> tuple:
    """Carry the limbs of a sum of several chunks (one chunk's are normalised already); zeros for none."""
    if total is None:
        return (torch.zeros((2, k, d), dtype=torch.int64, device=device),
                torch.zeros((2, k), dtype=torch.int64, device=device), torch.zeros(2, dtype=torch.int64, device=device))
    if chunks == 1:
        return total
    sums, counts, inertia = total
    return fp.normalize(sums), fp.normalize(counts), fp.normalize(inertia[:, None])[:, 0]


@dataclass
class Engine:
    """Lloyd steps of one device over the blocks it holds.

    chunk_rows: rows per streamed chunk (default: a staging buffer of CHUNK_BYTES, at most 1/64 of the device's
    memory). cache_bytes: device memory kept for resident copies of host rows ('auto': 80 % of what is free when
    the first step starts, less four staging buffers; 0: stream everything).
    Torch blocks already on the device also keep their rows prepared for the assignment across steps
    (`Backend.kept_rows`: while each takes at most a quarter of the memory then free; dropped on an OOM back-off).
    bounds: bounded steps (Hamerly's algorithm, `kernels.bounds`; euclidean): every row keeps a lower bound on
    its distance to the other centroids (4 bytes, beside its label), and a step scores again only the rows the
    bounds cannot settle: where the new centroids have a neighbour table, those their centroid's nearest ones
    settle cost a few float64 distances (`kernels.bounds.settle_rows`), the rest go through FlashAssign. The same
    labels and sums as plain steps, bit for bit, whatever the chunks; min_dist (inertia) is the same float64
    distance, rounded to float32 by one kernel for every row (equal to plain steps' to the bit in the GPU runs of
    benchmarks/engine_fit.py). Each step waits for the device once per
    BOUND_BATCH resident chunks it bounds (`_settle`), once per other chunk it bounds; chunks streamed from the
    host are scored whole below STREAMED_BOUNDS_MIN_K (their copy hides that).
    skip_settled (bounded steps): host rows past the cache are not copied at all once their bounds hold. Each
    such row also keeps an upper bound on its distance to its centroid (4 bytes, on the host), and each block the
    exact partials of those rows (a K x D pair of limbs on the device). A step tests the bounds on the device
    (`kernels.bounds.upper_test`), reads only the rows it cannot settle, in place over PCIe
    (`kernels.host_rows`), and updates the block's partials by the exact difference of the rows that moved: the
    same sums, counts and labels as a plain step, to the bit. Such a step does not know the distances of the rows
    it skipped, so its inertia is incomplete (`EngineStep.inertia_complete`); `step(complete=True)` reads
    everything.
    """

    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    backend: Backend | None = None
    chunk_rows: int | None = None
    cache_bytes: int | str = "auto"
    unit_rows: bool = False  # scale rows to unit length on the device (cosine over raw rows)
    _labels: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _cache_used: int = 0
    _last_rows: int = 0  # rows of the largest chunk of the current pass (what an OOM back-off halves)
    _streams: tuple | None = field(default=None, repr=False)
    _registered: dict = field(default_factory=dict, repr=False)  # data_ptr -> host tensor page-locked in place
    _kept: dict = field(default_factory=dict, repr=False)  # (block key, chunk start[, 'cached']) -> kept rows
    _device_labels: dict = field(default_factory=dict, repr=False)  # block key -> labels of its cached rows
    _cached_end: dict = field(default_factory=dict, repr=False)  # block key -> end of the rows cached chunks serve
    _prepare_cached: bool | None = None  # cached rows keep their prepared rows too (decided with the first entry)
    _changed: torch.Tensor | None = field(default=None, repr=False)  # labels changed so far in the step under way
    bounds: bool = False
    _lower: dict = field(default_factory=dict, repr=False)  # block key -> lower bounds (beside its labels)
    _device_lower: dict = field(default_factory=dict, repr=False)  # block key -> bounds of its cached rows
    _lower_at: dict = field(default_factory=dict, repr=False)  # block key -> the bound step its bounds are for
    _bound_step: int = 0  # bounded steps taken; the bounds of this one are for `_bound_centroids`
    _bound_centroids: torch.Tensor | None = field(default=None, repr=False)  # float64, of the last bounded step
    _rescored: int = 0  # rows assigned (over all K) so far in the bounded step under way
    _bound_keys: set = field(default_factory=set, repr=False)  # blocks the bounded step under way has bounded
    skip_settled: bool = False
    _upper: dict = field(default_factory=dict, repr=False)  # block key -> upper bounds of its tail rows (host)
    _tail_sums: dict = field(default_factory=dict, repr=False)  # block key -> (first tail row, sums, weights)
    _tail_at: dict = field(default_factory=dict, repr=False)  # block key -> the bound step its tail sums are for
    _new_tails: dict = field(default_factory=dict, repr=False)  # the same, being built by the step under way
    _skip: tuple | None = field(default=None, repr=False)  # `_decrements` while a step may skip settled rows
    _gathered: int = 0  # rows of skipped chunks read in the step under way
    _skipped_keys: set = field(default_factory=set, repr=False)  # blocks whose tail the step under way skipped
    _read_stream: object = field(default=None, repr=False)  # where stale host rows are read in place
    _read_ready: bool = False  # the in-place read is compiled
    _tested: list = field(default_factory=lambda: [0, 0], repr=False)  # rows bound-tested, stale, in the step
    _stale_share: float | None = None  # of the rows the last bounded step tested (None: it tested none)
    _far_kept: int = 0  # candidates for empty clusters each step keeps (FIRST_STEPS_KEPT in a run's first steps,
    #                     2n after `farthest` was asked for n, none after a step after which none was asked for)
    _far_asked: bool = False  # `farthest` was called since the last step
    _run_steps: int = 0  # steps since the run started (`forget_labels`)
    _far: tuple | None = field(default=None, repr=False)  # (centroids, block sizes, m, Farthest) of the last step
    _began: object = field(default=None, repr=False)  # CUDA event: the step under way began (None: no step)
    _carry_lower: bool = False  # the step under way tests streamed rows' bounds (they read their lower bounds)

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:  # 'cuda' must compare equal to 'cuda:0'
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = self.backend or backend_for(self.device)
        if self.cache_bytes == "auto" and os.environ.get("FLASHKM_CACHE_BYTES"):  # e.g. 0 on Dask workers
            self.cache_bytes = int(os.environ["FLASHKM_CACHE_BYTES"])

    # ------------------------------------------------------------------------------------------- public steps
    def step(self, blocks, centroids: torch.Tensor, numerics: FitNumerics, *, wait: bool = True,
             complete: bool = False) -> EngineStep:
        """Assign every row, sum rows per centroid exactly, remember the labels; restarts on CUDA OOM.
        wait=False: nothing is read back (the caller settles the step with its own scalars, in one transfer).
        complete=True: no host row is skipped (`skip_settled`), so the inertia covers every row."""
        start = time.perf_counter()
        try:  # (`_changed` is None between steps)
            result = self._retrying(lambda: self._step(blocks, centroids.to(self.device), self.local(numerics),
                                                       complete))
        except BaseException:
            self._forget_bounds()  # (some blocks may hold bounds for these centroids already)
            raise
        finally:
            self._changed, self._skip = None, None
            self._run_steps += 1
        if self._bounded(numerics):  # (the blocks of this step now hold bounds for these centroids)
            result.rescored, result.gathered = self._rescored, self._gathered
            result.inertia_complete = not self._skipped_keys
            self._bound_step += 1
            self._lower_at.update(dict.fromkeys(self._bound_keys, self._bound_step))
            self._tail_sums = {key: (first, fp.normalize(sums), fp.normalize(weights))
                               for key, (first, sums, weights) in self._new_tails.items()}
            self._tail_at = dict.fromkeys(self._tail_sums, self._bound_step)
            self._new_tails.clear()
            self._stale_share = self._tested[1] / self._tested[0] if self._tested[0] else None
            self._bound_centroids = centroids.to(self.device, torch.float64, copy=True)
        if wait:
            result.settle()
        result.seconds = time.perf_counter() - start
        return result

    def local(self, numerics: FitNumerics) -> FitNumerics:
        """The fit's numerics with the shift on this device (the client may hold it elsewhere)."""
        if numerics.shift is None or numerics.shift.device == self.device:
            return numerics
        return replace(numerics, shift=numerics.shift.to(self.device))

    def map_chunks(self, blocks, fn) -> list:
        """[fn(x, weights) for every chunk, in block and row order]: one pass over the data (seeding, statistics)."""
        return self._retrying(lambda: [fn(c.x, c.weights) for c in self._chunks(blocks)])

    def gather(self, blocks, index: torch.Tensor) -> torch.Tensor:
        """Rows at global positions (blocks in order, rows within them) on this device in the compute dtype."""
        index = torch.as_tensor(index, dtype=torch.int64).cpu()
        sizes = torch.tensor([_as_tensor(b.data).shape[0] for b in blocks], dtype=torch.int64)
        starts = torch.cumsum(sizes, 0) - sizes
        which = torch.searchsorted(starts, index, right=True) - 1
        parts = []
        for i in range(len(blocks)):
            mask = which == i
            if bool(mask.any()):
                data = _as_tensor(blocks[i].data)
                local = (index[mask] - starts[i]).to(data.device)
                parts.append((torch.nonzero(mask).flatten(), data[local].to(self.device, self.dtype)))
        d = _as_tensor(blocks[0].data).shape[1]
        rows = torch.empty((index.numel(), d), dtype=self.dtype, device=self.device)
        for pos, vals in parts:
            rows[pos.to(self.device)] = vals
        return unit_rows_like(rows) if self.unit_rows else rows

    def _retrying(self, fn):
        while True:
            self._last_rows = 0
            try:
                return fn()
            except torch.OutOfMemoryError:
                self._back_off()

    def farthest(self, blocks, centroids: torch.Tensor, numerics: FitNumerics, n: int, offsets=None) -> Farthest:
        """The n rows of positive weight farthest from their centres (ties: the lower position, i.e. earlier
        block, then row), for the deterministic re-seeding of empty clusters. `offsets`: the first position of
        every block (default: the blocks laid end to end; then the steps after this call keep 2n candidates from
        their own distances, and a call right after such a step for its centroids needs no pass over the rows)."""
        if offsets is None:
            self._far_asked, self._far_kept = True, max(self._far_kept, 2 * n)  # (the next steps keep candidates)
            kept = self._kept_farthest(blocks, centroids, n)
            if kept is not None:
                return kept
            offsets = _offsets(_sizes(blocks))
        best = Farthest.none(_as_tensor(blocks[0].data).shape[1] if blocks else 0)
        numerics = self.local(numerics)
        for chunk in self._chunks(blocks):
            labels, dist = self.backend.assign(chunk.x, centroids.to(self.device), metric=numerics.metric,
                                               shift=numerics.shift)
            found = Farthest.of_chunk(chunk.x, chunk.weights, labels, dist, offsets[chunk.index] + chunk.start, n)
            best = Farthest.merge([best, found.to("cpu")], n)
        return best.positive()

    def _kept_farthest(self, blocks, centroids: torch.Tensor, n: int) -> Farthest | None:
        """The n farthest rows from the candidates the last step kept (`_far_kept`), if it kept at least n over
        these blocks for these centroids (its own distances: no second pass over the rows), else None."""
        if self._far is None:
            return None
        c, sizes, m, far = self._far
        if m < n or sizes != _sizes(blocks):
            return None
        if c.shape != centroids.shape or not torch.equal(c, centroids.to(c.device, c.dtype)):
            return None
        return Farthest.merge([far.to("cpu")], n).positive()

    def forget_labels(self) -> None:
        """Start a new run: the next step counts every label as changed (as scikit-learn's first iteration)."""
        self._run_steps = 0
        self._labels.clear()
        self._device_labels.clear()
        self._forget_bounds()

    def _forget_bounds(self) -> None:
        """The next bounded step scores every row (bounds lost, or their centroids unknown)."""
        self._lower.clear()
        self._device_lower.clear()
        self._lower_at.clear()
        self._bound_centroids = None
        self._upper.clear()
        self._tail_sums.clear()
        self._tail_at.clear()
        self._new_tails.clear()
        self._stale_share = None

    def has_labels(self, blocks) -> bool:
        """Whether every block has labels from an earlier step (a label-change count against them is meaningful)."""
        return all(self._key(b, i) in self._labels or _as_tensor(b.data).shape[0] == 0 for i, b in enumerate(blocks))

    def label_buffers(self) -> dict:
        """The tensors the labels of each block are kept in (a CUDA graph of a step writes to these addresses)."""
        return dict(self._labels)

    def labels(self, blocks) -> list:
        """Labels (int64 tensors) of the last step of every block: on the host for blocks streamed from the host,
        on the device for blocks computed in place (empty blocks: empty)."""
        self._gather_device_labels()
        return [self._labels.get(self._key(b, i), torch.empty(0, dtype=torch.int64)) for i, b in enumerate(blocks)]

    def _gather_device_labels(self) -> None:
        """Copy the labels of cached host rows, which stay on the device between steps, into their blocks' host
        label tensors (waits for the device)."""
        for key, dev in self._device_labels.items():
            self._labels[key][:dev.shape[0]].copy_(dev)

    # ------------------------------------------------------------------------------------------- internals
    def _key(self, block: Block, position: int):
        return position if block.key is None else block.key

    def _step(self, blocks, centroids, numerics, complete: bool = False) -> EngineStep:
        k, d = centroids.shape
        sizes = _sizes(blocks)
        n_rows, offsets = sum(sizes), _offsets(sizes)
        total, chunks = None, 0  # (sums, counts, inertia) limbs of the chunks so far
        # labels changed, counted on the device (no host sync per chunk). Kept across an OOM back-off: the chunks
        # the failed attempt finished have stored their new labels already, so the retry counts 0 for their rows
        # (a row's exact label does not depend on its chunk) and their changes must come from that attempt.
        if self._changed is None:
            self._changed = torch.zeros((), dtype=torch.int64, device=self.device)
        changed = self._changed
        checks = DeferredChecks()
        bounded = self._bounded(numerics)
        if self.backend.prepare_centroids is not None and numerics.metric == "euclidean":
            self.backend.prepare_centroids(centroids, n_rows)
        moves, self._rescored = (self._decrements(centroids, n_rows) if bounded else None), 0
        dec = (None, None, None) if moves is None else moves[1:]  # (dec, near, table) for `_bound_test`
        self._carry_lower = moves is not None and k >= STREAMED_BOUNDS_MIN_K
        if self.device.type == "cuda":  # (what the last step wrote to host row state, the copy stream reads after)
            self._began = torch.cuda.Event()
            self._began.record(torch.cuda.current_stream(self.device))
        self._skip = moves if self.skip_settled and not complete else None
        self._gathered, self._tested[:] = 0, [0, 0]
        self._skipped_keys.clear()
        self._bound_keys.clear()
        self._new_tails.clear()
        skipped_inertia = None
        if not self._far_asked:
            self._far_kept = 0
        if self._run_steps < FIRST_STEPS:
            self._far_kept = max(self._far_kept, FIRST_STEPS_KEPT)
        self._far_asked, self._far = False, None
        # candidates for empty clusters from this step's own distances (not inside a CUDA graph's capture)
        keep_far = self._far_kept > 0 and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        far = Farthest.none(d).to(self.device) if keep_far else None

        def finish(chunk, labels, dist):
            nonlocal total, chunks, far
            part = self.backend.partial_sums(chunk.x, labels, k, chunk.weights, scale=numerics.scale,
                                             deferred=checks)
            total = _added(total, (part.sums, part.weights, exact_inertia(dist, chunk.weights, numerics, checks)))
            chunks += 1
            changed.add_(self._remember(blocks, chunk, labels))
            if far is not None:
                far = Farthest.merge([far, Farthest.of_chunk(chunk.x, chunk.weights, labels, dist,
                                                             offsets[chunk.index] + chunk.start, self._far_kept)],
                                     self._far_kept)
            if bounded and chunk.tail:
                self._add_tail(blocks, chunk, part.sums, part.weights)

        def skipped(chunk, test, stale):
            nonlocal far
            far = None  # (the distances of the rows it skips are not known)
            read = self._read_stale(chunk, stale, centroids, test)  # (on a side stream; its rows scored later)

            def rest():
                nonlocal skipped_inertia
                moved, inertia = self._skipped_assign(blocks, chunk, centroids, numerics, test, stale, read, checks)
                changed.add_(moved)
                if inertia is not None:
                    skipped_inertia = inertia if skipped_inertia is None else skipped_inertia + inertia
            later.append(rest)

        # bounded chunks whose bound tests are queued: a full batch waits until the next one is full (`_settle`);
        # skipped chunks whose stale rows are being read, scored once the next batch's assignments are queued
        filling, waiting, later = [], [], []
        for chunk in self._chunks(blocks):
            kept = None if chunk.x is None else self._kept_rows(blocks, chunk)
            if bounded:
                test = (self._upper_test(blocks, chunk, *moves[:3]) if chunk.x is None
                        else self._bound_test(blocks, chunk, centroids, *dec))
                if test is not None and self._resident_rows(blocks, chunk):
                    filling.append((chunk, kept, test, _queued_count(test.stale, test.missed)))
                    if len(filling) == BOUND_BATCH or sum(c[0].n for c in filling) >= BOUND_BATCH_ROWS:
                        self._settle(waiting, blocks, centroids, numerics, finish, skipped, later)
                        waiting, filling = filling, []
                    continue
                stale = None if test is None else torch.nonzero(test.stale).flatten()  # (waits for the device)
                if stale is not None:
                    self._tested[0] += chunk.n
                    self._tested[1] += int(test.missed.sum())
                finish(chunk, *self._bounded_assign(blocks, chunk, centroids, numerics, kept, test, stale))
            else:
                finish(chunk, *self.backend.assign(chunk.x, centroids, metric=numerics.metric, shift=numerics.shift,
                                                   **({} if kept is None else {"rows": kept})))
        for batch in (waiting, filling, []):
            self._settle(batch, blocks, centroids, numerics, finish, skipped, later)
        self._began = None
        for key in self._skipped_keys:  # (their partials: the last step's plus what moved)
            total = _added(total, (*self._new_tails[key][1:], torch.zeros(2, dtype=torch.int64, device=self.device)
                                   if skipped_inertia is None else fp.normalize(skipped_inertia[:, None])[:, 0]))
            skipped_inertia, chunks = None, chunks + 1
        sums, counts, inertia = _normalised(total, chunks, k, d, self.device)
        if far is not None:
            self._far = (centroids.clone(), sizes, self._far_kept, far)
        # (settling reads `changed` back, which waits for the stream: host labels have landed too)
        return EngineStep(reference.Partials(sums, counts, numerics.scale), inertia, None, changed=changed,
                          checks=checks)

    def _kept_rows(self, blocks, chunk: _Chunk):
        """The rows a chunk of a torch block on this device keeps prepared across steps (made at its first step,
        if the backend keeps rows and memory allows), else None. Other blocks (host rows, CuPy blocks, whose
        tensor is new at every step) are prepared afresh each time."""
        data = blocks[chunk.index].data
        if chunk.cached:  # (a fixed view of the cache: `cached_chunks`; memory reserved with the entry)
            if not self._prepare_cached:
                return None
            key = (self._key(blocks[chunk.index], chunk.index), chunk.start, "cached")
            if key not in self._kept:
                self._kept[key] = self.backend.prepared_rows()
            return self._kept[key]
        if not (torch.is_tensor(data) and data.device == self.device):
            return None
        if chunk.x._base is not (data if data._base is None else data._base):  # (converted: new every step)
            return None
        key = (self._key(blocks[chunk.index], chunk.index), chunk.start)
        if key not in self._kept:
            self._kept[key] = self.backend.kept_rows(chunk.x)
        return self._kept[key]

    def _remember(self, blocks, chunk: _Chunk, labels: torch.Tensor) -> torch.Tensor:
        """Keep this chunk's labels and count (on the device, no host sync) how many changed. Device blocks keep
        a device tensor; host blocks a pinned host tensor, read back to the device for the comparison (streamed
        rows: with their rows, on the copy stream) and then overwritten, queued on the compute stream."""
        seg = self._row_state(blocks, chunk, self._labels, self._device_labels, torch.int64, -1)
        old = chunk.prior[0] if chunk.prior[0] is not None else seg.to(self.device, non_blocking=True)
        changed = (old != labels).sum()
        seg.copy_(labels, non_blocking=True)
        return changed

    def _row_state(self, blocks, chunk: _Chunk, stores: dict, device_stores: dict | None, dtype,
                   fill) -> torch.Tensor:
        """This chunk's segment of a per-row store of its block (labels, lower bounds), made on first use with
        `fill`: a device tensor for device blocks, a pinned host tensor for host blocks, whose cached rows keep a
        device copy (`device_stores`) that is theirs from then on: no PCIe traffic for them per step.
        device_stores None: a store only rows past the cache use (upper bounds)."""
        block = blocks[chunk.index]
        key = self._key(block, chunk.index)
        data = _as_tensor(block.data)
        in_place = data.device == self.device
        store = stores.get(key)
        if store is None or store.shape[0] != data.shape[0]:
            store = torch.full((data.shape[0],), fill, dtype=dtype, device=self.device if in_place else "cpu",
                               pin_memory=not in_place and self.device.type == "cuda")
            stores[key] = store
            if device_stores is not None:
                device_stores.pop(key, None)
        if chunk.cached:  # (the rows the cached chunks cover: those past them are streamed, with host state)
            if key not in device_stores:
                end = self._cached_end.get(key, self._cache[(key, self.dtype)].shape[0])
                device_stores[key] = store[:end].to(self.device, copy=True)
            store = device_stores[key]
        return store[chunk.start:chunk.start + chunk.n]

    # ------------------------------------------------------------------------------------------- bounded steps
    def _bounded(self, numerics: FitNumerics) -> bool:
        return self.bounds and numerics.metric == "euclidean" and self.backend.bounded_rows is not None

    def _decrements(self, centroids: torch.Tensor, n_rows: int) -> tuple | None:
        """(drift, dec, near, table): `kernels.bounds.centroid_moves` since the last bounded step; near:
        `kernels.bounds.neighbour_moves` where a neighbour table of the centroids is at hand (the step's
        FlashAssign table, or a small K's), else None; the table (or None), which also settles rows the bound
        leaves (`kernels.bounds.settle_rows`). None when no bound can be used."""
        prev = self._bound_centroids
        if prev is None or prev.shape != centroids.shape:
            return None
        drift, dec = kbounds.centroid_moves(prev, centroids)
        if drift.numel() == 1:
            return drift, dec, None, None
        table = neighbours.table_for(centroids[None], n_rows)
        if table is None and centroids.shape[0] < neighbours.MIN_CENTROIDS:
            table = neighbours.neighbour_table(centroids)
        near = None if table is None else kbounds.neighbour_moves(table.index[0], table.beyond[0], drift)
        return drift, dec, near, table

    def _bound_test(self, blocks, chunk: _Chunk, centroids, dec, near, table) -> _Test | None:
        """A bounded step's test of a chunk's rows, queued (no wait), with the rows it leaves settled from the
        neighbour table where there is one; None where the bounds cannot be used (not for the last step's
        centroids; streamed chunks below STREAMED_BOUNDS_MIN_K)."""
        key = self._key(blocks[chunk.index], chunk.index)
        usable = not chunk.streamed or centroids.shape[0] >= STREAMED_BOUNDS_MIN_K
        if not (usable and dec is not None and self._lower_at.get(key) == self._bound_step and key in self._labels):
            return None
        old, lower = (prior if prior is not None else self._row_state(blocks, chunk, *store).to(
            self.device, non_blocking=True) for prior, store in zip(chunk.prior, self._row_stores()))
        return self._settled(chunk.x, centroids, old, lower, dec, near, table)

    def _settled(self, x, centroids, labels, lower, dec, near, table) -> _Test:
        """`_bound_test`'s kernels on rows x with their labels and lower bounds (on the device)."""
        if table is None or self.backend.settle_rows is None:
            dist, new_lower, stale = self.backend.bounded_rows(x, centroids, labels, lower, dec, near)
            return _Test(labels.clone(), dist, new_lower, stale, stale)
        labels, dist, new_lower, code = self.backend.settle_rows(x, centroids, labels, lower, dec, near, table)
        return _Test(labels, dist, new_lower, code == 2, code != 0)

    def _resident_rows(self, blocks, chunk: _Chunk) -> bool:
        """Whether a chunk's rows stay where they are on the device until the step ends (cached host rows, or a view
        of a device block), so its bound test may wait in a batch."""
        if chunk.cached or chunk.x is None:
            return True
        data = blocks[chunk.index].data
        root = data if data._base is None else data._base
        return data.device == self.device and chunk.x._base is root

    def _settle(self, batch: list, blocks, centroids, numerics, finish, skipped, later: list) -> None:
        """Finish a batch of chunks whose bound tests were queued: one wait for all their numbers of rows to score
        (instead of one per chunk), then each chunk's assignment of those rows (`nonzero_static`: no more waits).
        `_step` settles a batch only once the next one's tests are queued too, so the device has work meanwhile;
        the wait is for the tests only (`_queued_count`), not for the assignments queued after them, so the host
        queues the next assignments while the device still runs the last ones. Skipped chunks of the last batch
        (`later`) are scored after this batch's assignments are queued: their rows are read meanwhile."""
        ready, later[:] = list(later), []
        if not batch:
            for rest in ready:
                rest()
            return
        if batch[-1][3][1] is not None:
            batch[-1][3][1].synchronize()
        counts = [queued[0].tolist() for *_, queued in batch]
        for (chunk, kept, test, _), (count, missed) in zip(batch, counts):
            stale = torch.nonzero_static(test.stale, size=count).flatten()
            self._tested[0] += chunk.n
            self._tested[1] += missed
            if chunk.x is None:
                skipped(chunk, test, stale)
            else:
                finish(chunk, *self._bounded_assign(blocks, chunk, centroids, numerics, kept, test, stale))
        for rest in ready:
            rest()

    def _bounded_assign(self, blocks, chunk: _Chunk, centroids, numerics, kept, test, stale):
        """(labels, min_dist) of a chunk in a bounded step, from its bound test (`_bound_test`) and the positions of
        its stale rows: rows whose bound settles them keep their label, the others (all of them without a test) go
        through the assignment. min_dist always comes from `bounded_rows`, so it has the same bits whichever way a
        row went."""
        key = self._key(blocks[chunk.index], chunk.index)
        lower = self._row_state(blocks, chunk, self._lower, self._device_lower, torch.float32, 0.0)
        n = chunk.n
        if test is not None:
            labels, dist, new_lower = test[:3]
        if stale is None or stale.numel() == n:
            labels, dist, new_lower = self._assigned(chunk.x, centroids, numerics, kept)
        elif stale.numel():
            labels[stale], dist[stale], new_lower[stale] = self._assigned(chunk.x[stale], centroids, numerics)
        self._rescored += n if stale is None else stale.numel()
        lower.copy_(new_lower, non_blocking=True)
        if chunk.tail:
            self._row_state(blocks, chunk, self._upper, None, torch.float32, 0.0).copy_(kbounds.upper_of(dist),
                                                                                       non_blocking=True)
        self._bound_keys.add(key)
        return labels, dist

    def _assigned(self, x, centroids, numerics, kept=None) -> tuple:
        """(labels, min_dist, lower bounds) of rows x over all K (FlashAssign; `kept`: their prepared rows), with
        min_dist from `bounded_rows`, so a row has the same bits whether its bound kept it or not."""
        labels, _, lower = self.backend.assign_lower(x, centroids, shift=numerics.shift,
                                                     **({} if kept is None else {"rows": kept}))
        no_dec = torch.zeros(centroids.shape[0], dtype=torch.float64, device=self.device)
        return labels, self.backend.bounded_rows(x, centroids, labels, torch.zeros_like(lower), no_dec)[0], lower

    def _add_tail(self, blocks, chunk: _Chunk, sums: torch.Tensor, weights: torch.Tensor) -> None:
        """Add a tail chunk's partials to its block's tail partials of this step."""
        key = self._key(blocks[chunk.index], chunk.index)
        if key in self._new_tails:
            first, old_sums, old_weights = self._new_tails[key]
            self._new_tails[key] = (min(first, chunk.start), old_sums + sums, old_weights + weights)
        else:
            self._new_tails[key] = (chunk.start, sums, weights)

    def _skippable(self, key, data: torch.Tensor, first: int) -> bool:
        """Whether a step may skip this block's tail rows [first, n): it may skip (`_skip`); at most
        SKIP_MAX_STALE of the rows the last step tested were stale (none tested: not the first step with bounds);
        the rows' labels, lower and upper bounds are for the last bounded step's centroids, and so are the tail's
        partials."""
        share = self._stale_share  # (unknown: only after the first step with bounds, whose centroids moved most)
        return (self._skip is not None and (share <= SKIP_MAX_STALE if share is not None else self._bound_step > 1)
                and self._lower_at.get(key) == self._bound_step
                and self._tail_at.get(key) == self._bound_step and self._tail_sums[key][0] == first
                and key in self._upper and self._labels.get(key) is not None
                and self._labels[key].shape[0] == data.shape[0] == self._upper[key].shape[0])

    def _row_stores(self) -> tuple:
        """The per-row stores of a block, as `_row_state` takes them: labels, lower and upper bounds (upper: rows
        past the cache only). Skipped chunks read and write all three; streamed ones read the first two."""
        return ((self._labels, self._device_labels, torch.int64, -1), (self._lower, self._device_lower,
                                                                         torch.float32, 0.0),
                (self._upper, None, torch.float32, 0.0))

    def _upper_test(self, blocks, chunk: _Chunk, drift, dec, near) -> _Test:
        """A skipped tail chunk's bound test, queued (no wait), from the bounds its rows keep on the host."""
        state = [self._row_state(blocks, chunk, *store).to(self.device, non_blocking=True)
                 for store in self._row_stores()]
        stale, new_lower, new_upper = kbounds.upper_test(*state, drift, dec, near)
        return _Test(state[0], None, new_lower, stale, stale, new_upper, state[1])

    def _read_stale(self, chunk: _Chunk, stale: torch.Tensor, centroids, test: _Test):
        """The stale rows of a skipped chunk, read in place (`host_rows.gather`) on a side stream, so the read
        runs beside the kernels queued next, and settled there as far as their exact distances and the neighbour
        table allow (`_settled`): (rows, their `_Test`, (the numbers of rows left stale and missed, an event or
        None once all of it is there: `_queued_count`)), or None for no stale row."""
        if not stale.numel():
            return None
        old, before = test.labels[stale], test.before[stale]
        dec, near, table = self._skip[1:]

        def read():
            rows = host_rows.gather(chunk.host, stale, self.dtype)
            settled = self._settled(rows, centroids, old, before, dec, near, table)
            return rows, settled, _queued_count(settled.stale, settled.missed)
        if self.device.type != "cuda":
            return read()
        compute = torch.cuda.current_stream(self.device)
        if self._read_stream is None:
            self._read_stream = torch.cuda.Stream(self.device)
        self._read_stream.wait_stream(compute)  # (the positions and old bounds are computed there)
        with torch.cuda.stream(self._read_stream):
            out = read()
        for t in (stale, old, before):
            t.record_stream(self._read_stream)
        for t in (out[0], *out[1][:4]):
            t.record_stream(compute)
        return out

    def _skipped_assign(self, blocks, chunk: _Chunk, centroids, numerics, test: _Test, stale, read, checks):
        """A skipped tail chunk's step, from its bound test, the positions of its stale rows and those rows
        settled where they could be (`_read_stale`): the rest are assigned; the block's tail partials change by
        what moved (the stale rows' partials under their new labels minus under their old ones: exact integers).
        Returns (labels changed, the stale rows' inertia limbs or None)."""
        key = self._key(blocks[chunk.index], chunk.index)
        old, new_lower, new_upper = test.labels, test.lower, test.upper
        labels = old.clone()
        moved, inertia = torch.zeros((), dtype=torch.int64, device=self.device), None
        if read is not None:
            k = centroids.shape[0]
            rows, settled, (counts, event) = read
            if event is not None:  # (the side stream's read and kernels are done)
                torch.cuda.current_stream(self.device).wait_event(event)
                event.synchronize()
            left = torch.nonzero_static(settled.stale, size=int(counts[0])).flatten()
            lab, dist, low = settled[:3]
            if left.numel():
                lab[left], dist[left], low[left] = self._assigned(rows[left], centroids, numerics)
            labels[stale], new_lower[stale], new_upper[stale] = lab, low, kbounds.upper_of(dist)
            w = None if chunk.weights is None else chunk.weights[stale]
            now, before = (self.backend.partial_sums(rows, la, k, w, scale=numerics.scale, deferred=checks)
                           for la in (lab, old[stale]))
            first, sums, weights = self._new_tails.get(key) or self._tail_sums[key]
            self._new_tails[key] = (first, sums + now.sums - before.sums, weights + now.weights - before.weights)
            moved = (lab != old[stale]).sum()
            inertia = exact_inertia(dist, w, numerics, checks)
            self._rescored += left.numel()
        self._new_tails.setdefault(key, self._tail_sums[key])
        for store, value in zip(self._row_stores(), (labels, new_lower, new_upper)):
            self._row_state(blocks, chunk, *store).copy_(value, non_blocking=True)
        self._gathered += stale.numel()
        self._skipped_keys.add(key)
        self._bound_keys.add(key)
        return moved, inertia

    def _staging_bytes(self) -> int:
        if self.device.type != "cuda":
            return CHUNK_BYTES
        return min(CHUNK_BYTES, torch.cuda.get_device_properties(self.device).total_memory // 64)

    def _rows_per_chunk(self, row_bytes: int) -> int:
        if self.chunk_rows is None:
            self.chunk_rows = max(1, self._staging_bytes() // max(1, row_bytes))
        return self.chunk_rows

    def _back_off(self) -> None:
        """Out of device memory: give the cache back first, then halve the chunk. (Bounds are dropped: chunks
        the failed attempt finished hold bounds for this step's centroids already.)"""
        self._kept.clear()
        self._forget_bounds()
        if self._cache:
            self._gather_device_labels()
            self._device_labels.clear()
            self._cache.clear()
            self._cached_end.clear()
            self._cache_used = 0
            self._prepare_cached = None
            self.cache_bytes = 0 if self.cache_bytes == "auto" else int(self.cache_bytes) // 2
        elif self._last_rows > 1:
            self.chunk_rows = max(1, self._last_rows // 2)
        else:
            raise torch.OutOfMemoryError("out of device memory even with one-row chunks and no cache")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _cache_budget(self) -> int:
        if self.cache_bytes == "auto":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.cache_bytes = int(free * CACHE_FRACTION) - 4 * self._staging_bytes()
        return max(0, int(self.cache_bytes))

    def _cache_row_bytes(self, d: int, prepared: bool | None = None) -> int:
        """Device memory one cached host row takes: the row in the compute dtype, its label (and lower bound in
        bounded steps), and its prepared rows where the engine keeps those (`prepared`: as if it did or did not;
        default: as decided)."""
        prepared = self._prepare_cached if prepared is None else prepared
        return d * self.dtype.itemsize + 8 + 4 * self.bounds + (prepared_row_bytes(d) if prepared else 0)

    def _decide_prepared_cache(self, blocks) -> None:
        """Before the first cache entry: whether cached rows also keep their prepared rows (`PreparedRows`, about
        half the size of fp32 rows). Only if every host row of the step fits in the cache with them: a row the
        cache holds saves its PCIe copy, worth far more than the row pass a prepared row saves."""
        if self._prepare_cached is not None or self._cache:
            return
        host = [_as_tensor(b.data) for b in blocks]
        host = [t for t in host if t.dim() == 2 and t.device != self.device]
        if not host:
            return
        if self.backend.prepared_rows is None or self.unit_rows:  # (unit rows: new tensors at every step)
            self._prepare_cached = False
            return
        need = sum(t.shape[0] * self._cache_row_bytes(t.shape[1], prepared=True) for t in host)
        self._prepare_cached = need <= self._cache_budget()

    def _cache_room(self, d: int) -> int:
        """Host rows of D features the cache can still take."""
        return max(0, self._cache_budget() - self._cache_used) // self._cache_row_bytes(d)

    def _new_cache_entry(self, key, n: int, d: int) -> torch.Tensor:
        cached = torch.empty((n, d), dtype=self.dtype, device=self.device)
        self._cache[(key, self.dtype)] = cached
        self._cache_used += n * self._cache_row_bytes(d)
        return cached

    def _chunks(self, blocks):
        """Every block's rows in chunks, on this device in the compute dtype (unit rows for cosine): blocks in place
        (or on the CPU) first, block by block; then the host blocks' rows in one pass (`_host_pass`)."""
        if self.device.type == "cuda":
            self._decide_prepared_cache(blocks)
        plans = []
        for index, block in enumerate(blocks):
            data = _as_tensor(block.data)
            if data.dim() != 2 or data.shape[0] == 0:
                if data.dim() != 2:
                    raise ValueError(f"block {index} must be 2-D, got shape {tuple(data.shape)}")
                continue
            weights = None if block.weights is None else torch.as_tensor(block.weights, dtype=torch.float64)
            if data.device == self.device or self.device.type == "cpu":
                rows = self.chunk_rows or data.shape[0]  # in place: whole blocks unless told (or backed off)
                self._last_rows = max(self._last_rows, min(rows, data.shape[0]))
                for start in range(0, data.shape[0], rows):
                    x = data[start:start + rows].to(self.device, self.dtype)
                    w = None if weights is None else weights[start:start + rows].to(self.device)
                    yield _Chunk(index, start, unit_rows_like(x) if self.unit_rows else x, w)
            else:
                rows = self._rows_per_chunk(data.shape[1] * data.element_size())
                self._last_rows = max(self._last_rows, min(rows, data.shape[0]))
                plans.append(self._host_plan(index, self._key(block, index), data, weights, rows))
        if plans:
            yield from self._host_pass(plans)

    def _pin_in_place(self, data: torch.Tensor) -> bool:
        """Page-lock host rows where they lie (cudaHostRegister; no copy) so chunks go to the device by DMA at
        full PCIe speed instead of through a CPU memcpy into staging. False when the pages cannot be locked."""
        if data.data_ptr() in self._registered:
            return True
        if not data.is_contiguous() or data.numel() == 0:
            return False
        try:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(
                data.data_ptr(), data.numel() * data.element_size(), 0))
        except (RuntimeError, AttributeError):
            return False
        self._registered[data.data_ptr()] = data  # keeps the rows alive while registered
        return True

    def release(self) -> None:
        """Unlock what `_pin_in_place` locked (the engine is done with these rows)."""
        for ptr in list(self._registered):
            torch.cuda.cudart().cudaHostUnregister(ptr)
            del self._registered[ptr]

    def __del__(self):
        if self._registered:
            try:
                self.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown: the CUDA runtime may be gone already
                pass

    def _host_plan(self, index, key, data: torch.Tensor, weights, rows: int) -> _HostPlan:
        """How this pass takes a host block's rows: the whole staging chunks inside its cache entry served from
        it (made in the first pass, which streams everything to fill it), the rest streamed through staging, or,
        when the step may skip them (`_skippable`), left on the host, in larger chunks (SKIP_CHUNK_BYTES)."""
        cached = self._cache.get((key, self.dtype))
        room = 0 if cached is not None else min(self._cache_room(data.shape[1]), data.shape[0])
        fill = room > 0
        if fill:
            cached = self._new_cache_entry(key, room, data.shape[1])
        end = cached_prefix(data.shape[0], rows, 0 if cached is None else cached.shape[0], fill)
        if not fill and cached is not None:
            self._cached_end[key] = end  # (rows past it are streamed, and keep their labels on the host)
        tail = cached_prefix(data.shape[0], rows, 0 if cached is None else cached.shape[0], False)
        plan = _HostPlan(index, data, weights, rows, cached, fill, tail)
        if self._skippable(key, data, tail):  # (nothing to copy: the device reads the stale rows itself)
            size = rows * max(1, SKIP_CHUNK_BYTES // (rows * data.shape[1] * self.dtype.itemsize))
            plan.spans = cached_chunks(end, rows, size // rows)
            plan.skipped = [(start, min(start + size, data.shape[0])) for start in range(end, data.shape[0], size)]
            return plan
        plan.spans, plan.starts = cached_chunks(end, rows), list(range(end, data.shape[0], rows))
        plan.pinned = data.is_pinned() or self._pin_in_place(data)
        if plan.pinned and fill and self.skip_settled and self.bounds and tail < data.shape[0] and not self._read_ready:
            # compile the in-place read now, with the first step's other kernels, not in the first skipping step
            host_rows.gather(data[:1], torch.zeros(1, dtype=torch.int64, device=self.device), self.dtype)
            self._read_ready = True
        plan.stores = self._carried_stores(key, data.shape[0])
        return plan

    def _host_pass(self, plans: list):
        """The chunks of the host blocks' rows in one pass (`pass_order`): the rows served from the cache and the
        skipped chunks of every block spread between the chunks streamed from any block, so the copies of one
        block's rows run while another's cached rows are scored (block by block, a fully cached block left the
        copy stream idle and a block with no cache left the kernels waiting for its copies).
        Streamed rows go through two device buffers, reused, on a copy stream: the copy into one waits (on the
        device) until the kernels of the chunk that used it were queued and ran, so nothing on the host waits
        and memory stays two chunks whatever the host runs ahead. The copy of streamed chunk i+1 is queued before
        chunk i and the chunks served before it are handed out, so it runs while they are scored, even when the
        consumer waits for the device per chunk, as bounded steps do."""
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device))
        copy_stream, compute = self._streams
        order = pass_order([(len(p.spans), len(p.skipped), len(p.starts)) for p in plans])
        streamed = [(plans[b], plans[b].starts[i]) for kind, b, i in order if kind == "streamed"]
        if any(store is not None for p in plans if p.starts for store in p.stores):
            copy_stream.wait_event(self._began)  # (the last step's writes of the row state it reads)
        staging, device_staging = [None, None], [None, None]
        landed, used, consumed = [None, None], [None, None], [None, None]

        def queue_copy(i):
            slot = i % 2
            plan, start = streamed[i]
            src = plan.data[start:start + plan.rows]
            if not plan.pinned:
                if staging[slot] is None or staging[slot].shape != src.shape or staging[slot].dtype != src.dtype:
                    staging[slot] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                if used[slot] is not None:
                    used[slot].synchronize()  # the previous copy out of this host buffer is done
                staging[slot].copy_(src)
                src = staging[slot]
            with torch.cuda.stream(copy_stream):
                buffer = device_staging[slot]
                if buffer is None or buffer.shape != (plan.rows, src.shape[1]) or buffer.dtype != src.dtype:
                    buffer = torch.empty((plan.rows, src.shape[1]), dtype=src.dtype, device=self.device)
                    buffer.record_stream(compute)
                    device_staging[slot] = buffer
                if consumed[slot] is not None:
                    copy_stream.wait_event(consumed[slot])
                dev = buffer[:src.shape[0]]
                dev.copy_(src, non_blocking=True)
                prior = tuple(None if store is None else store[start:start + src.shape[0]].to(
                    self.device, non_blocking=True) for store in plan.stores)
                for t in prior:
                    if t is not None:
                        t.record_stream(compute)
                event = torch.cuda.Event()
                event.record(copy_stream)
            used[slot] = event
            landed[slot] = (dev, event, prior)

        queued, seen = 0, 0  # copies queued; streamed chunks handed out
        for kind, b, i in order:
            while queued < min(seen + 2, len(streamed)):  # (chunk seen + 1's copy, before what comes first)
                queue_copy(queued)
                queued += 1
            plan = plans[b]
            if kind == "cached":
                yield self._cached_chunk(plan.index, plan.cached, plan.weights, *plan.spans[i])
                continue
            weights = plan.weights
            if kind == "skipped":
                start, stop = plan.skipped[i]
                w = None if weights is None else weights[start:stop].to(self.device, non_blocking=True)
                yield _Chunk(plan.index, start, None, w, streamed=True, tail=True, host=plan.data[start:stop])
                continue
            start, slot = plan.starts[i], seen % 2
            dev, event, prior = landed[slot]
            compute.wait_event(event)
            x = dev.to(self.dtype)
            if plan.fill and start < plan.cached.shape[0]:
                plan.cached[start:start + plan.rows] = x[:plan.cached.shape[0] - start]
            w = None if weights is None else weights[start:start + plan.rows].to(self.device, non_blocking=True)
            yield _Chunk(plan.index, start, unit_rows_like(x) if self.unit_rows else x, w, streamed=True,
                         tail=start >= plan.tail, prior=prior)
            consumed[slot] = torch.cuda.Event()  # the consumer has queued its kernels on this chunk
            consumed[slot].record(compute)
            seen += 1

    def _carried_stores(self, key, n: int) -> tuple:
        """The host stores (labels, lower bounds) whose rows `_host_pass` copies with each chunk's rows
        (READ_STATE_ON_COPY_STREAM): labels once the block has them, lower bounds where this step tests streamed
        rows' bounds with them (`_bound_test`); None for the others."""
        if not READ_STATE_ON_COPY_STREAM or self._began is None:  # (only steps read them)
            return None, None
        labels, lower = self._labels.get(key), self._lower.get(key)
        return (labels if labels is not None and labels.shape[0] == n else None,
                lower if self._carry_lower and lower is not None and lower.shape[0] == n
                and self._lower_at.get(key) == self._bound_step else None)

    def _cached_chunk(self, index: int, cached: torch.Tensor, weights, start: int, stop: int) -> _Chunk:
        """Rows [start, stop) of a block's cache entry as a chunk."""
        self._last_rows = max(self._last_rows, stop - start)
        w = None if weights is None else weights[start:stop].to(self.device, non_blocking=True)
        x = cached[start:stop]
        return _Chunk(index, start, unit_rows_like(x) if self.unit_rows else x, w, cached=True)
