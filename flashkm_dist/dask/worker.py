"""What runs inside Dask workers: a per-worker shard registry and the task functions of a distributed fit.

Each worker keeps one `Shard` per fit (its engine, device cache, remembered labels, seeding state), keyed by
(worker address, fit token). That state only saves time: a task that finds none (new worker, moved block, restarted
process) rebuilds it, so losing it can never change a result. Results leave a task on the host, as plain tensors,
but for step partials bound for a reducer (see `StepResult`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
import torch

from flashkm_dist.dask import handoff, push, summed
from flashkm_dist.engine import FitNumerics, backend_for, unit_rows_like
from flashkm_dist.kernels import clock
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import center_shift, empty_clusters, move_to_empty
from flashkm_dist.shard import Shard
from flashkm_dist.streaming import Block, Engine, EngineStep, Farthest

_SHARDS: dict = {}
_UPDATES: dict = {}  # (worker address, fit token, scale) -> a `summed.GraphedUpdate` (reducers, chained steps)
_REGISTRY_LOCK = threading.Lock()


@dataclass(frozen=True)
class ShardSpec:
    """How every worker builds its shard for one fit."""

    token: str
    device: str  # 'auto' (the worker's GPU if it has one), 'cpu', 'cuda'
    dtype: str  # compute dtype name
    unit_rows: bool  # cosine: rows are scaled to unit length on the worker
    handoff: str = "socket"  # how partials reach a reducer on another worker: 'socket' or 'ipc' (see `handoff`)
    chunk_rows: int | None = None
    cache_bytes: int | str = "auto"
    bounds: bool = False  # bounded steps (`Engine.bounds`: algorithm 'hamerly')


def wire(t: torch.Tensor) -> tuple:
    """A host tensor as a NumPy array (Dask ships those without copies; pickled tensors are slow), plus its dtype."""
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), str(t.dtype).removeprefix("torch.")


def _unwire(wired: tuple) -> torch.Tensor:
    arr, dtype = wired
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


@dataclass
class Update:
    """A reduction's result: the next centres and the scalars the client waits for. A reducer of a fit with the
    device hand-off leaves the centres in an exported buffer (`handoff`) that the next steps copy from, and the
    client gets them through `on_host`; otherwise they are a host tensor (Dask ships it as NumPy)."""

    centers: torch.Tensor
    scalars: dict | None = None
    lease: handoff.Lease | None = None

    @classmethod
    def placed(cls, centers: torch.Tensor, scalars: dict, token: str | None) -> "Update":
        """Exported for fit `token` when given and the centres are on a GPU; on the host otherwise."""
        if token and centers.is_cuda:
            lease, (view,) = handoff.export(token, [centers])
            return cls(view, scalars, lease)
        return cls(centers.cpu(), scalars)

    def __getstate__(self):
        if self.lease is not None:
            return {"device": handoff.describe(self.lease, [self.centers]), "scalars": self.scalars}
        return {"centers": wire(self.centers), "scalars": self.scalars}

    def __setstate__(self, state):
        if "device" in state:
            (self.centers,), self.lease = handoff.take(state["device"]), None
        else:
            self.centers, self.lease = _unwire(state["centers"]), None
        self.scalars = state["scalars"]


def on_host(update: Update) -> Update:
    """The centres of an Update as a host copy, for the client (which cannot open a worker's device buffers)."""
    return Update(update.centers.cpu(), update.scalars)


@dataclass
class StepResult:
    """One worker's step: exact partials (sums joined to one int64 per value when they fit: half the bytes to the
    reducer, and to each peer that copies them over NVLink). Where they wait for the reducer (`placed`): on the
    device when the reducer is the same worker (it takes them with no copy); in a buffer a GPU peer of the same host
    opens (`handoff`) when the fit uses the device hand-off; otherwise as NumPy arrays (Dask ships those without
    copies), which is also what a device result becomes when Dask has to send it anyway (`__getstate__`: a reducer
    moved after a worker was lost)."""

    sums: torch.Tensor | np.ndarray  # int64 (K, D) joined, or limbs (2, K, D)
    weights: torch.Tensor | np.ndarray  # limbs (2, K)
    inertia: torch.Tensor | np.ndarray  # limbs (2,)
    n_changed: int
    seconds: float
    centers: torch.Tensor | None = None  # chained fits: the centres the step used, carried by one step of each
    lease: handoff.Lease | None = None  # set when the arrays are views of an exported buffer

    ARRAYS = ("sums", "weights", "inertia")

    @classmethod
    def of(cls, result, where: str = "host", token: str = "", centers: torch.Tensor | None = None) -> "StepResult":
        sums = result.partials.sums
        joined = fp.join(sums)
        arrays = [sums if joined is None else joined, result.partials.weights, result.inertia]
        return cls.placed(arrays, int(result.n_changed), float(result.seconds), where, token, centers)

    @classmethod
    def placed(cls, arrays: list, n_changed: int, seconds: float, where: str, token: str = "",
               centers: torch.Tensor | None = None) -> "StepResult":
        """`where`: 'device' (left as they are), 'export' (a leased buffer of fit `token`; device arrays only,
        others go to the host) or 'host'."""
        if where == "export" and torch.is_tensor(arrays[0]) and arrays[0].is_cuda:
            lease, views = handoff.export(token, arrays + ([] if centers is None else [centers]))
            return cls.exported(lease, views, n_changed, seconds)
        if where != "device":
            arrays = [_numpy(a) for a in arrays]
            centers = None if centers is None else centers.cpu()
        return cls(*arrays, n_changed, seconds, centers)

    @classmethod
    def exported(cls, lease: handoff.Lease, views: list, n_changed: int, seconds: float) -> "StepResult":
        """A result whose arrays (sums, weights, inertia, then the centres if carried) are views of `lease`."""
        return cls(*views[:3], n_changed, seconds, views[3] if len(views) > 3 else None, lease)

    @property
    def where(self) -> str:
        return "export" if self.lease else "host" if isinstance(self.sums, np.ndarray) else "device"

    def __getstate__(self):
        scalars = {"n_changed": self.n_changed, "seconds": self.seconds}
        if self.lease is not None:
            tensors = [getattr(self, n) for n in self.ARRAYS] + ([] if self.centers is None else [self.centers])
            return {"device": handoff.describe(self.lease, tensors), **scalars}
        return {**{name: _numpy(getattr(self, name)) for name in self.ARRAYS}, **scalars,
                "centers": None if self.centers is None else wire(self.centers)}

    def __setstate__(self, state):
        if "device" in state:
            tensors = handoff.take(state.pop("device"))
            state.update(zip(self.ARRAYS, tensors), centers=tensors[3] if len(tensors) > 3 else None)
        elif state.get("centers") is not None:
            state["centers"] = _unwire(state["centers"])
        self.__init__(**state)


@dataclass
class QueuedStep:
    """A step and its hand-over to the peers queued on the device and not yet waited for (`queue_step`)."""

    result: EngineStep
    ticks: torch.Tensor  # the step's start and end on the device's clock
    fits: torch.Tensor  # whether the joined sums are exact (else the limbs are handed over)
    lease: handoff.Lease
    views: list
    token: str
    centers: torch.Tensor | None

    def finish(self) -> StepResult:
        """The step's one wait: its pending values (the kernels' checks raise here), the join's check and its
        clock stamps in one read-back, which also waits for the copies into the exported buffer."""
        host = torch.cat([self.result.pending(), self.fits.reshape(1).to(torch.int64), self.ticks]).tolist()
        self.result.settle(host[:-3])
        self.result.seconds = (host[-1] - host[-2]) / 1e9
        if not host[-3]:  # sums too large to join exactly: hand the limbs over instead
            return StepResult.of(self.result, "export", self.token, centers=self.centers)
        return StepResult.exported(self.lease, self.views, self.result.n_changed, self.result.seconds)


def stamped_step(shard: Shard, *args) -> tuple[EngineStep, torch.Tensor]:
    """`Shard.step(*args)` queued without waiting, timed by two stamps of the device's clock (`kernels.clock`):
    (the step, its start and end ticks)."""
    ticks = torch.empty(2, dtype=torch.int64, device=shard.engine.device)
    clock.stamp(ticks, 0)
    result = shard.step(*args, wait=False)
    clock.stamp(ticks, 1)
    return result, ticks


def queue_step(shard: Shard, blocks: list, centers: torch.Tensor, numerics: FitNumerics, version, previous_version,
               previous_centers, token: str, carry: torch.Tensor | None) -> QueuedStep:
    """`Shard.step` and `StepResult.of(..., 'export')` queued together, so that the step's end is waited for once,
    and nothing but that read-back runs after the wait (host work right after a long wait for the device runs
    several times slower than warm)."""
    result, ticks = stamped_step(shard, blocks, centers, numerics, version, previous_version, previous_centers)
    joined_sums, fits = fp.join_unchecked(result.partials.sums)
    arrays = [joined_sums, result.partials.weights, result.inertia] + ([] if carry is None else [carry])
    return QueuedStep(result, ticks, fits, *handoff.export(token, arrays, wait=False), token, carry)


def _step_result(shard: Shard, blocks: list, centers: torch.Tensor, numerics: FitNumerics, version,
                 previous_version, previous_centers, where: str, token: str, carry: torch.Tensor | None) -> StepResult:
    """A step as the result its task returns: queued with its hand-over (`queue_step`) when it is exported from a
    GPU, else stepped and then placed (`StepResult.of`)."""
    if where == "export" and clock.available(shard.engine.device):
        return queue_step(shard, blocks, centers, numerics, version, previous_version, previous_centers, token,
                          carry).finish()
    result = shard.step(blocks, centers, numerics, version, previous_version, previous_centers)
    return StepResult.of(result, where, token, centers=carry)


@dataclass
class Skipped:
    """A chained step that did not step: its update found empty clusters (the client re-seeds them and restarts
    the chain), or the step it follows was skipped."""

    iteration: int


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if torch.is_tensor(a) else a


def worker_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked but worker {_address()} has no CUDA device; use "
                           "device='auto' to let CPU workers compute on their CPU (same results)")
    return torch.device(device)


def _address() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return "local"


def shard_for(spec: ShardSpec) -> Shard:
    key = (_address(), spec.token)
    with _REGISTRY_LOCK:
        shard = _SHARDS.get(key)
        if shard is None:
            engine = Engine(worker_device(spec.device), dtype=getattr(torch, spec.dtype), unit_rows=spec.unit_rows,
                            chunk_rows=spec.chunk_rows, cache_bytes=spec.cache_bytes, bounds=spec.bounds)
            shard = _SHARDS[key] = Shard(engine)
    return shard


def forget(token: str) -> int:
    """Drop this worker's state of a fit (run on every worker when the fit ends); returns entries dropped."""
    with _REGISTRY_LOCK:
        gone = [k for k in _SHARDS if k[1] == token]
        for k in gone:
            _SHARDS.pop(k).engine.release()
        for k in [k for k in _UPDATES if k[1] == token]:
            del _UPDATES[k]
    push.forget(token)
    return len(gone)


def to_host(value):
    """Tensors (also inside lists, tuples, dicts and dataclasses) moved to the host for the trip to the client."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: to_host(getattr(value, f.name)) for f in fields(value)})
    return value


def as_blocks(ids, datas) -> list[Block]:
    """Task arguments -> blocks: a block is its rows, or (rows, weights) for a weighted fit."""
    return [Block(d[0], torch.as_tensor(d[1], dtype=torch.float64), key=i) if isinstance(d, tuple)
            else Block(d, None, key=i) for i, d in zip(ids, datas)]


def pair(x, w):
    """One block's rows and weights, kept together on the worker that holds the rows."""
    return (x, np.asarray(w, dtype=np.float64))


# ---------------------------------------------------------------------------------------------- tasks
def call_shard(spec: ShardSpec, method: str, ids: list, args: tuple, *datas):
    """Seeding and statistics: one `Shard` method over this worker's blocks."""
    shard = shard_for(spec)
    with shard.lock:
        return to_host(getattr(shard, method)(as_blocks(ids, datas), *args))


def run_here(spec: ShardSpec, fn, args: tuple):
    return to_host(fn(*args, device=worker_device(spec.device)))


def joined(parts: list) -> torch.Tensor:
    """Centres given as consecutive row slices (`Update`s, one per reducer) as one (K, D) tensor."""
    return parts[0].centers if len(parts) == 1 else torch.cat([p.centers for p in parts])


def step(spec: ShardSpec, numerics: FitNumerics, ids: list, centers: list, version: str,
         previous: list | None, previous_version: str | None, where: str, carry: bool, peers: list, *datas):
    """One Lloyd step over this worker's blocks (see `Shard.step` for the label-change count). `where` the
    partials wait for their reducer (`StepResult.placed`); `carry`: keep the centres with them (chained fits);
    `peers`: the workers that take this result next (it is pushed to them, `push`)."""
    push.expect(peers)
    shard = shard_for(spec)
    with shard.lock:
        now, before = joined(centers), None if previous is None else joined(previous)
        return _step_result(shard, as_blocks(ids, datas), now, numerics, version, previous_version, before, where,
                            spec.token, now if carry else None)


def rows_of(result: StepResult, lo: int, hi: int) -> StepResult:
    """The partials of clusters lo..hi-1 of a step (the part one reducer sums), with the step's scalars."""
    sums = result.sums[lo:hi] if result.sums.ndim == 2 else result.sums[:, lo:hi]
    token = result.lease.buffer.token if result.lease else ""
    arrays = [_contiguous(sums), _contiguous(result.weights[:, lo:hi]), result.inertia]
    return StepResult.placed(arrays, result.n_changed, result.seconds, result.where, token)


def _contiguous(a):
    return a.contiguous() if torch.is_tensor(a) else np.ascontiguousarray(a)


def farthest(spec: ShardSpec, numerics: FitNumerics, ids: list, starts: list, centers: list, n: int, *datas):
    shard = shard_for(spec)
    with shard.lock:
        return shard.farthest(as_blocks(ids, datas), joined(centers), numerics, n, starts)


def _reduce_device(metric: str) -> torch.device:
    """The reducer's GPU when it has one: integer sums and the euclidean update are exact or elementwise, so they
    give the same bits anywhere. Cosine renormalises with a float reduction, kept on the CPU everywhere."""
    return torch.device("cuda" if metric == "euclidean" and torch.cuda.is_available() else "cpu")


def _limbs(sums, device: torch.device) -> torch.Tensor:
    """A step's sums (joined int64 (K, D) or limbs (2, K, D), NumPy or torch) as limbs on `device`."""
    sums = torch.as_tensor(sums).to(device)
    return fp.split(sums) if sums.dim() == 2 else sums


def _summed_limbs(steps: list, device: torch.device) -> tuple:
    """The steps' sums, weights and inertia added up on `device`, as limbs left un-normalised. Each part is
    stacked over the steps and summed at once: some ten kernels for any number of steps, not a dozen per step."""
    sums = [torch.as_tensor(s.sums).to(device) for s in steps]
    if all(t.dim() == 2 for t in sums):  # joined int64 (K, D): split once, all steps together
        limbs = fp.split(torch.stack(sums)).sum(dim=1)
    else:
        limbs = torch.stack([_limbs(t, device) for t in sums]).sum(dim=0)
    weights, inertia = (torch.stack([torch.as_tensor(getattr(s, name)).to(device) for s in steps]).sum(dim=0)
                        for name in ("weights", "inertia"))
    return limbs, weights, inertia


def _combined(steps: list, scale: fp.FixedPointScale, device: torch.device):
    sums, weights, inertia = _summed_limbs(steps, device)
    return (reference.Partials(fp.normalize(sums), fp.normalize(weights), scale),
            fp.normalize(inertia[:, None])[:, 0], sum(s.n_changed for s in steps))


def _inertia(steps: list, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The exact sum of the steps' inertia shares, as normalised limbs (2,) on `device`."""
    return fp.normalize(sum(torch.as_tensor(s.inertia).to(device) for s in steps)[:, None])[:, 0]


def _shift(metric: str, new: torch.Tensor, current: torch.Tensor) -> float:
    dev = _reduce_device(metric)
    return center_shift(new.to(dev), current.to(dev))


def _new_centres(numerics: FitNumerics, centers: torch.Tensor, steps: list, found: list | None):
    """Exact all-reduce of the workers' partials (of all clusters, or of one reducer's rows), empty clusters
    re-seeded with `found` (the workers' farthest rows) when given, and the Lloyd update of those rows: the new
    centres (on the reducing device) and the iteration's scalars, but for the shift (see `scalars`)."""
    partials, inertia, changed = _combined(steps, numerics.scale, _reduce_device(numerics.metric))
    n_empty = int(empty_clusters(partials).numel())
    previous = centers.to(partials.sums.device) if n_empty else None  # (only empty clusters keep theirs)
    if found is not None:
        partials, n_empty = move_to_empty(partials, Farthest.merge(found, n_empty)), 0
    new, _ = reference.finalize(partials, dtype=centers.dtype, metric=numerics.metric, previous=previous)
    return new, {"n_changed": int(changed), "n_empty": n_empty,
                 "inertia": float(fp.to_float(inertia, numerics.scale.dist_exp)),
                 "slowest_worker_seconds": max(s.seconds for s in steps)}


def _update(numerics: FitNumerics, centers: torch.Tensor, steps: list, found: list | None,
            token: str | None) -> Update:
    return Update.placed(*_new_centres(numerics, centers, steps, found), token)


def reduce(numerics: FitNumerics, fit: str, token: str | None, peers: list, lo: int, hi: int, centers: list,
           *steps) -> Update:
    """Rows lo..hi-1 of the iteration's update, from every step's partials of those rows (`rows_of`), or of all
    rows when there is one reducer. Empty clusters are only counted here; the client then asks the workers for
    their farthest rows and `reseed` redoes the update with them. `token`: export the centres (`Update.placed`).
    Euclidean on a GPU: through fit `fit`'s graphed update, as the chained steps make it (the same bits).
    `peers`: the workers of the next steps (the centres are pushed to them, `push`)."""
    push.expect(peers)
    current, steps = joined(centers)[lo:hi], list(steps)
    device = _reduce_device(numerics.metric)
    if device.type != "cuda":
        return _update(numerics, current, steps, None, token)
    new, out = _graphed_update(fit, numerics, current.to(device), steps)
    out.pop("shift")  # (the scalars task measures the shift of all rows)
    return Update.placed(new, out, token)


def reseed(numerics: FitNumerics, token: str | None, centers: list, n_steps: int, *parts) -> Update:
    """The update of an iteration with empty clusters: they take the farthest rows of all workers."""
    return _update(numerics, joined(centers), list(parts[:n_steps]), list(parts[n_steps:]), token)


def update_from(wired: tuple) -> Update:
    return Update(_unwire(wired))


def scalars(metric: str, n_current: int, *parts) -> dict:
    """What the client waits for: the reducers' scalars (the same in each, but for the empty clusters they
    counted), and the shift from the current centres (the first `n_current` parts) to the new ones (the rest).
    Off the iteration's critical path: the next steps need only the new centres."""
    current, new = joined(list(parts[:n_current])), joined(list(parts[n_current:]))
    out = dict(parts[n_current].scalars)
    out["n_empty"] = sum(p.scalars["n_empty"] for p in parts[n_current:])
    out["shift"] = _shift(metric, new, current)
    return out


def step_centres(step: StepResult) -> Update:
    """The centres a chained step used (it carries them), as a host Update: for the client, and as the explicit
    centres a re-seeding or a restarted chain starts from."""
    return Update(step.centers.cpu())


def chain_inertia(numerics: FitNumerics, *steps) -> float:
    """The inertia of one iteration's chained steps (the fit's final inertia): the exact sum of their shares."""
    return float(fp.to_float(_inertia(list(steps)), numerics.scale.dist_exp))


def _chained_update(spec: ShardSpec, numerics: FitNumerics, centers: torch.Tensor, steps: list):
    """The update of a chained step and its scalars. Euclidean centres on a GPU: as one vector through this fit's
    CUDA graph (`_summed_update`); otherwise as a reducer makes it. The same bits either way."""
    if not (centers.is_cuda and numerics.metric == "euclidean"):
        new, out = _new_centres(numerics, centers, steps, None)
        return new, {**out, "shift": _shift(numerics.metric, new, centers)}
    return _graphed_update(spec.token, numerics, centers, steps)


def _graphed_update(fit: str, numerics: FitNumerics, centers: torch.Tensor, steps: list):
    """`_summed_update` through this worker's graph of the update of fit `fit` (made on first use)."""
    key = (_address(), fit, numerics.scale)  # (a graph bakes in the scale: each run of a fit has its own)
    with _REGISTRY_LOCK:
        graphed = _UPDATES.setdefault(key, summed.GraphedUpdate(numerics))
    return _summed_update(graphed, centers, steps)


def _summed_update(graphed: summed.GraphedUpdate, centers: torch.Tensor, steps: list):
    """The steps' partials summed into one vector on the centres' device, and the update with one wait for the
    device (`summed`): the same integers and the same update kernels as `_new_centres`, so the same bits."""
    _, new, packed = graphed(summed_vector(steps, centers.device), centers)
    return new, summed.read(packed)


def summed_vector(steps: list, device: torch.device) -> torch.Tensor:
    """The steps' partials summed into one `summed` vector on `device`, its limbs left for the update to
    normalise (as after an all-reduce)."""
    counts = summed.counters_of([s.n_changed for s in steps], [s.seconds for s in steps])
    return summed.vector(*_summed_limbs(steps, device), counts, device)


def chained_step(spec: ShardSpec, numerics: FitNumerics, ids: list, iteration: int, version: str,
                 previous_version: str, where: str, carry: bool, topic: str | None, peers: list, n_prior: int,
                 *args):
    """One Lloyd iteration in one task: the update from every worker's partials of the step before (the same
    exact integer sums, so the same centres, in every worker), then this worker's step with those centres. Each
    iteration thus costs one scheduler hop instead of two (step -> reduce -> step). The first step of the prior
    iteration carries the centres it used (the fallback of empty clusters, the shift, and the label count of a
    shard that lost its state). `topic`: publish the update's scalars there (the client waits on them, not on
    a task). Empty clusters: publish and skip (the client re-seeds them and starts a new chain). `peers`: the
    workers whose next steps need this result (it is pushed to them, `push`)."""
    push.expect(peers)
    prior, datas = list(args[:n_prior]), args[n_prior:]
    if any(isinstance(p, Skipped) for p in prior):
        return Skipped(iteration)
    before = prior[0].centers
    shard = shard_for(spec)
    with shard.lock:
        new, out = _chained_update(spec, numerics, before, prior)
        if topic is not None:
            from distributed import get_worker
            get_worker().log_event(topic, {**out, "iteration": iteration - 1})
        if out["n_empty"]:
            return Skipped(iteration)
        return _step_result(shard, as_blocks(ids, datas), new, numerics, version, previous_version, before, where,
                            spec.token, new if carry else None)


# ---------------------------------------------------------------------------------------------- outputs
def _block_tensor(x, dtype: str, metric: str, device: str):
    """A chunk of X as the fit computed on it: on the worker's device, in the compute dtype, unit rows for
    cosine; plus how to hand results back (CuPy for CuPy chunks, NumPy otherwise)."""
    is_cupy = type(x).__module__.split(".")[0] == "cupy"
    t = torch.from_dlpack(x) if is_cupy else torch.from_numpy(np.ascontiguousarray(x))
    dev = t.device if is_cupy else worker_device(device)
    t = t.to(dev, getattr(torch, dtype))
    return (unit_rows_like(t) if metric == "cosine" else t), is_cupy


def _back(t: torch.Tensor, is_cupy: bool):
    if is_cupy:
        import cupy
        return cupy.from_dlpack(t.contiguous())
    return t.cpu().numpy()


def _fitted(x, centers: np.ndarray, shift, metric: str, dtype: str, device: str):
    """The chunk, the centres and the centring shift on the worker's device, as the fit computed with them."""
    t, is_cupy = _block_tensor(x, dtype, metric, device)
    c = torch.as_tensor(centers).to(t.device, t.dtype)
    return t, c, None if shift is None else torch.as_tensor(shift).to(t.device), is_cupy


def predict_block(x, centers: np.ndarray, shift, metric: str, dtype: str, device: str):
    t, c, s, is_cupy = _fitted(x, centers, shift, metric, dtype, device)
    labels, _ = backend_for(t.device).assign(t, c, metric=metric, shift=s) if t.shape[0] else (
        torch.empty(0, dtype=torch.int64, device=t.device), None)
    return _back(labels.to(torch.int64), is_cupy)


def transform_block(x, centers: np.ndarray, shift, metric: str, dtype: str, device: str):
    t, c, s, is_cupy = _fitted(x, centers, shift, metric, dtype, device)
    d = reference.distances(t, c, metric=metric, shift=s)
    if metric == "euclidean":
        d = d.sqrt()
    return _back(d.to(torch.float64 if t.dtype == torch.float64 else torch.float32), is_cupy)


def min_dist_block(x, centers: np.ndarray, shift, metric: str, dtype: str, device: str):
    """float64 distance of every row to its nearest centre (score)."""
    t, c, s, _ = _fitted(x, centers, shift, metric, dtype, device)
    if t.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return backend_for(t.device).assign(t, c, metric=metric, shift=s)[1].to(torch.float64).cpu().numpy()
