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
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from flashkm_dist.engine import (Backend, FitNumerics, backend_for, exact_inertia, prepared_row_bytes,
                                 unit_rows_like)
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.kernels.checks import DeferredChecks

CHUNK_BYTES = 256 << 20  # one staging buffer
CACHE_FRACTION = 0.8  # of the free device memory, for 'auto'
CACHED_CHUNK_FACTOR = 4  # rows served from the cache go through the kernels this many staging chunks at a time


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

    @classmethod
    def merge(cls, parts: list, n: int) -> "Farthest":
        fields = [torch.cat([getattr(p, name) for p in parts]) for name in ("dist", "position", "rows", "weights",
                                                                            "labels")]
        by_position = torch.sort(fields[1], stable=True).indices
        fields = [f[by_position] for f in fields]
        keep = torch.sort(fields[0], descending=True, stable=True).indices[:n]
        return cls(*(f[keep] for f in fields))


@dataclass
class _Chunk:
    index: int  # block position in the step's list
    start: int
    x: torch.Tensor  # rows on the engine's device, compute dtype
    weights: torch.Tensor | None
    cached: bool = False  # host rows served from the device cache (their labels stay on the device too)


def cached_prefix(n: int, rows: int, n_cached: int, filling: bool) -> int:
    """Rows [0, end) of a host block that a pass serves from the device cache: the whole staging chunks inside
    the cache, or all of it when all of it is cached; none in the pass that fills the cache."""
    if filling:
        return 0
    return n if n_cached >= n else n_cached // rows * rows


def cached_chunks(end: int, rows: int) -> list:
    """(start, stop) of the chunks the cached rows [0, end) go through the kernels in: CACHED_CHUNK_FACTOR staging
    chunks at a time (nothing is copied for them, and every chunk costs some fixed kernel work), at the
    multiples of that size, so each chunk is the same view of the cache at every step (its prepared rows can be
    kept)."""
    size = rows * CACHED_CHUNK_FACTOR
    return [(s, min(s + size, end)) for s in range(0, end, size)]


def _as_tensor(data) -> torch.Tensor:
    if torch.is_tensor(data):
        return data
    if type(data).__module__.split(".")[0] == "cupy":
        return torch.from_dlpack(data)
    arr = np.asarray(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays are never written to
        return torch.from_numpy(arr if all(s >= 0 for s in arr.strides) else np.ascontiguousarray(arr))


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

    chunk_rows: rows per streamed chunk (default: a 256 MiB staging buffer). cache_bytes: device memory kept for
    resident copies of host rows ('auto': 80 % of what is free when the first step starts; 0: stream everything).
    Torch blocks already on the device also keep their rows prepared for the assignment across steps
    (`Backend.kept_rows`: while each takes at most a quarter of the memory then free; dropped on an OOM back-off).
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
    _prepare_cached: bool | None = None  # cached rows keep their prepared rows too (decided with the first entry)
    _changed: torch.Tensor | None = field(default=None, repr=False)  # labels changed so far in the step under way

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:  # 'cuda' must compare equal to 'cuda:0'
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = self.backend or backend_for(self.device)
        if self.cache_bytes == "auto" and os.environ.get("FLASHKM_CACHE_BYTES"):  # e.g. 0 on Dask workers
            self.cache_bytes = int(os.environ["FLASHKM_CACHE_BYTES"])

    # ------------------------------------------------------------------------------------------- public steps
    def step(self, blocks, centroids: torch.Tensor, numerics: FitNumerics, *, wait: bool = True) -> EngineStep:
        """Assign every row, sum rows per centroid exactly, remember the labels; restarts on CUDA OOM.
        wait=False: nothing is read back (the caller settles the step with its own scalars, in one transfer)."""
        start = time.perf_counter()
        try:  # (`_changed` is None between steps)
            result = self._retrying(lambda: self._step(blocks, centroids.to(self.device), self.local(numerics)))
        finally:
            self._changed = None
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
        every block (default: the blocks laid end to end)."""
        if offsets is None:
            sizes = [_as_tensor(b.data).shape[0] for b in blocks]
            offsets = [sum(sizes[:i]) for i in range(len(blocks))]
        best = Farthest.none(_as_tensor(blocks[0].data).shape[1] if blocks else 0)
        numerics = self.local(numerics)
        for chunk in self._chunks(blocks):
            labels, dist = self.backend.assign(chunk.x, centroids.to(self.device), metric=numerics.metric,
                                               shift=numerics.shift)
            dist = dist.to(torch.float64)
            if chunk.weights is not None:
                dist = torch.where(chunk.weights > 0, dist, torch.full_like(dist, -1.0))
            order = torch.sort(dist, descending=True, stable=True).indices[:n]
            order = order[dist[order] >= 0]
            w = None if chunk.weights is None else chunk.weights[order]
            found = Farthest(dist[order].cpu(), (order + offsets[chunk.index] + chunk.start).cpu(),
                             reference.weighted_rows(chunk.x[order], w).cpu(),
                             torch.ones(order.numel(), dtype=torch.float64) if w is None else w.cpu(),
                             labels[order].cpu())
            best = Farthest.merge([best, found], n)
        return best

    def forget_labels(self) -> None:
        """Start a new run: the next step counts every label as changed (as scikit-learn's first iteration)."""
        self._labels.clear()
        self._device_labels.clear()

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

    def _step(self, blocks, centroids, numerics) -> EngineStep:
        k, d = centroids.shape
        total, chunks = None, 0  # (sums, counts, inertia) limbs of the chunks so far
        # labels changed, counted on the device (no host sync per chunk). Kept across an OOM back-off: the chunks
        # the failed attempt finished have stored their new labels already, so the retry counts 0 for their rows
        # (a row's exact label does not depend on its chunk) and their changes must come from that attempt.
        if self._changed is None:
            self._changed = torch.zeros((), dtype=torch.int64, device=self.device)
        changed = self._changed
        checks = DeferredChecks()
        for chunk in self._chunks(blocks):
            kept = self._kept_rows(blocks, chunk)
            labels, dist = self.backend.assign(chunk.x, centroids, metric=numerics.metric, shift=numerics.shift,
                                               **({} if kept is None else {"rows": kept}))
            part = self.backend.partial_sums(chunk.x, labels, k, chunk.weights, scale=numerics.scale,
                                             deferred=checks)
            total = _added(total, (part.sums, part.weights, exact_inertia(dist, chunk.weights, numerics, checks)))
            chunks += 1
            changed += self._remember(blocks, chunk, labels)
        sums, counts, inertia = _normalised(total, chunks, k, d, self.device)
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
        a device tensor; host blocks a pinned host tensor, read back to the device for the comparison and then
        overwritten, both copies queued in order on the compute stream."""
        block = blocks[chunk.index]
        key = self._key(block, chunk.index)
        data = _as_tensor(block.data)
        in_place = data.device == self.device
        store = self._labels.get(key)
        if store is None or store.shape[0] != data.shape[0]:
            store = torch.full((data.shape[0],), -1, dtype=torch.int64, device=self.device if in_place else "cpu",
                               pin_memory=not in_place and self.device.type == "cuda")
            self._labels[key] = store
            self._device_labels.pop(key, None)
        if chunk.cached:  # rows kept on the device keep their labels there: no PCIe traffic for them per step
            if key not in self._device_labels:
                self._device_labels[key] = store[:self._cache[(key, self.dtype)].shape[0]].to(self.device, copy=True)
            store = self._device_labels[key]
        seg = store[chunk.start:chunk.start + len(labels)]
        changed = (seg.to(self.device, non_blocking=True) != labels).sum()
        seg.copy_(labels, non_blocking=True)
        return changed

    def _rows_per_chunk(self, row_bytes: int) -> int:
        if self.chunk_rows is None:
            self.chunk_rows = max(1, CHUNK_BYTES // max(1, row_bytes))
        return self.chunk_rows

    def _back_off(self) -> None:
        """Out of device memory: give the cache back first, then halve the chunk."""
        self._kept.clear()
        if self._cache:
            self._gather_device_labels()
            self._device_labels.clear()
            self._cache.clear()
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
            self.cache_bytes = int(free * CACHE_FRACTION) - 4 * CHUNK_BYTES
        return max(0, int(self.cache_bytes))

    def _cache_row_bytes(self, d: int, prepared: bool | None = None) -> int:
        """Device memory one cached host row takes: the row in the compute dtype, its label, and its prepared
        rows where the engine keeps those (`prepared`: as if it did or did not; default: as decided)."""
        prepared = self._prepare_cached if prepared is None else prepared
        return d * self.dtype.itemsize + 8 + (prepared_row_bytes(d) if prepared else 0)

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
        """Every block's rows in chunks, on this device in the compute dtype (unit rows for cosine)."""
        if self.device.type == "cuda":
            self._decide_prepared_cache(blocks)
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
                yield from self._streamed(index, self._key(block, index), data, weights, rows)

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

    def _streamed(self, index, key, data: torch.Tensor, weights, rows: int):
        """Host rows to the device: cached rows first-hand (CACHED_CHUNK_FACTOR staging chunks at a time), the
        rest through double-buffered pinned staging on a copy stream (the copy of chunk i+1 is queued before
        chunk i is handed out for compute; the first streamed chunk's before the cached rows are)."""
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device))
        copy_stream, compute = self._streams
        cached = self._cache.get((key, self.dtype))
        room = 0 if cached is not None else min(self._cache_room(data.shape[1]), data.shape[0])
        fill = room > 0
        if fill:
            cached = self._new_cache_entry(key, room, data.shape[1])
        end = cached_prefix(data.shape[0], rows, 0 if cached is None else cached.shape[0], fill)
        starts = list(range(end, data.shape[0], rows))
        pinned = data.is_pinned() or self._pin_in_place(data)
        # two device buffers, reused: the copy into one waits (on the device) until the kernels of the chunk that
        # used it were queued and ran, so nothing on the host waits and memory stays two chunks whatever the host
        # runs ahead
        staging, device_staging = [None, None], [None, None]
        landed, used, consumed = [None, None], [None, None], [None, None]

        def queue_copy(i):
            slot = i % 2
            src = data[starts[i]:starts[i] + rows]
            if not pinned:
                if staging[slot] is None or staging[slot].shape != src.shape:
                    staging[slot] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                if used[slot] is not None:
                    used[slot].synchronize()  # the previous copy out of this host buffer is done
                staging[slot].copy_(src)
                src = staging[slot]
            with torch.cuda.stream(copy_stream):
                if device_staging[slot] is None:
                    device_staging[slot] = torch.empty((rows, data.shape[1]), dtype=data.dtype, device=self.device)
                    device_staging[slot].record_stream(compute)
                if consumed[slot] is not None:
                    copy_stream.wait_event(consumed[slot])
                dev = device_staging[slot][:src.shape[0]]
                dev.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(copy_stream)
            used[slot] = event
            landed[slot] = (dev, event)

        if starts:
            queue_copy(0)
        for start, stop in cached_chunks(end, rows):
            self._last_rows = max(self._last_rows, stop - start)
            w = None if weights is None else weights[start:stop].to(self.device, non_blocking=True)
            x = cached[start:stop]
            yield _Chunk(index, start, unit_rows_like(x) if self.unit_rows else x, w, cached=True)
        for i, start in enumerate(starts):
            if i + 1 < len(starts):
                queue_copy(i + 1)
            slot = i % 2
            dev, event = landed[slot]
            compute.wait_event(event)
            x = dev.to(self.dtype)
            if fill and start < cached.shape[0]:
                cached[start:start + rows] = x[:cached.shape[0] - start]
            w = None if weights is None else weights[start:start + rows].to(self.device, non_blocking=True)
            yield _Chunk(index, start, unit_rows_like(x) if self.unit_rows else x, w)
            consumed[slot] = torch.cuda.Event()  # the consumer has queued its kernels on this chunk
            consumed[slot].record(compute)
