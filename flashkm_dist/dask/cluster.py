"""The rows of a persisted Dask array as shards: one per worker holding blocks, driven by tasks.

Placement only: which worker holds which block (asked of the scheduler, refreshed when workers come or go), and
tasks pinned there (loosely, so a task whose worker died runs elsewhere instead of waiting forever). No numerics.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import dask
import torch
from dask.core import flatten
from distributed import futures_of, wait

from flashkm_dist.dask import collective, handoff, worker


@dataclass
class Iteration:
    """The futures of one Lloyd iteration: per-worker steps, the next centres (consecutive row slices, one per
    reducer: each reducer sums every step's partials of its rows) and the scalars the client waits for."""

    steps: list
    centres: list
    scalars: object
    rows: list = field(default_factory=list)  # each step's partials cut per reducer (held: see `cancel`)

    def cancel(self, client) -> None:
        """(Cancelling a key cancels its dependents; the scheduler asserts that some client wants each of them,
        so every future of the iteration is held here.)"""
        client.cancel([*self.steps, *self.rows, *self.centres, self.scalars])


CHAIN_MAX_WORKERS = 4  # allreduce='auto': chained steps up to this many workers of one host (`suits_chaining`)


def _host(address: str) -> str:
    """The host part of a worker address ('tcp://10.0.0.5:4321' -> '10.0.0.5')."""
    return address.split("://")[-1].rsplit(":", 1)[0]


class DaskShards:
    """Blocks of `x` (persisted, one column chunk) and optional weights (a Dask array with x's row chunks)."""

    reducers: int | None = None  # None: one per host (see `_reducers`); tests and benchmarks set a number
    chained: bool = False  # Lloyd as chained steps (one task per worker and iteration; `driver.lloyd_chained`)
    device_handoff: bool = True  # partials to a reducer through CUDA IPC when `handoff.probe` passes (A/B: False)

    def __init__(self, client, x, weights, spec: worker.ShardSpec, dtype: torch.dtype):
        self.client, self.spec, self.array = client, spec, x
        self.dtype, self.device = dtype, torch.device("cpu")
        self.n_features = int(x.shape[1])
        self.weighted = weights is not None
        self.sizes = [int(n) for n in x.chunks[0]]
        self._names = itertools.count()
        by_key = {f.key: f for f in futures_of(x)}
        self.futures = [by_key[k] for k in flatten(x.__dask_keys__())]
        wait(self.futures)  # (placement follows where the blocks are: a block not computed yet is held nowhere)
        if weights is not None:
            w_by_key = {f.key: f for f in futures_of(weights)}
            w_futures = [w_by_key[k] for k in flatten(weights.__dask_keys__())]
            holders = client.who_has(self.futures)
            self.futures = [client.submit(worker.pair, xf, wf, key=self._key("block", i), workers=holders[xf.key]
                                          or None, allow_other_workers=True, pure=False)
                            for i, (xf, wf) in enumerate(zip(self.futures, w_futures))]
            wait(self.futures)
        self.place()
        if self.device_handoff and handoff.probe(client, sorted(self._workers)):
            self.spec = dataclasses.replace(spec, handoff="ipc")

    def _key(self, name: str, part) -> str:
        return f"flashkm-{name}-{next(self._names)}-{part}-{self.spec.token}"

    # ------------------------------------------------------------------------------------------ placement
    def place(self) -> None:
        """Blocks by holder (the first worker the scheduler names); blocks held nowhere (lost, being recomputed)
        go to the worker with the fewest rows."""
        self._workers = self._live_workers()
        holders = self.client.who_has(self.futures)
        owner = [next((a for a in holders.get(f.key, ()) if a in self._workers), None) for f in self.futures]
        addresses = sorted({a for a in owner if a is not None}) or sorted(self._workers)[:1]
        load = {a: sum(n for n, o in zip(self.sizes, owner) if o == a) for a in addresses}
        for i, a in enumerate(owner):
            if a is None:
                owner[i] = min(addresses, key=lambda addr: (load[addr], addr))
                load[owner[i]] += self.sizes[i]
        self.addresses = addresses
        self.shard_ids = list(range(len(addresses)))
        self._blocks = {s: [i for i, o in enumerate(owner) if o == a] for s, a in enumerate(addresses)}
        self.starts = list(itertools.accumulate([0, *self.sizes[:-1]]))

    def _live_workers(self) -> set:
        """Asked of the scheduler now: scheduler_info() can return the periodic summary, which lists no workers."""
        return set(self.client.nthreads())

    def refresh(self) -> bool:
        """Re-place when the set of workers changed (one died, one joined); True if it did."""
        if self._live_workers() == self._workers:
            return False
        self.place()
        return True

    @property
    def _owned(self) -> list[int]:
        """The shards that hold blocks (a worker may hold none): one step task each."""
        return [s for s in self.shard_ids if self._blocks[s]]

    @property
    def _owners(self) -> list[str]:
        """Their workers' addresses."""
        return [self.addresses[s] for s in self._owned]

    def blocks_of(self, shard: int) -> list[int]:
        return self._blocks[shard]

    def _submit(self, fn, shard: int, name: str, *args, ids=None):
        """fn(*args, *blocks) on the shard's worker, for its blocks or the given `ids` among them."""
        ids = self._blocks[shard] if ids is None else ids
        return self.client.submit(fn, *args, *[self.futures[i] for i in ids], key=self._key(name, shard),
                                  workers=[self.addresses[shard]], allow_other_workers=True, pure=False)

    # ------------------------------------------------------------------------------------------ seeding
    def run(self, method: str, calls: dict) -> dict:
        futures = {s: self._submit(worker.call_shard, s, method, self.spec, method, ids, args, ids=ids)
                   for s, (ids, args) in calls.items()}
        return dict(zip(futures, self.client.gather(list(futures.values()))))

    def run_here(self, fn, *args):
        return self.client.submit(worker.run_here, self.spec, fn, args, key=self._key("recluster", 0),
                                  workers=self.addresses[:1], allow_other_workers=True, pure=False).result()

    def as_array(self):
        return self.array

    # ------------------------------------------------------------------------------------------ Lloyd
    def submit_step(self, numerics, k: int, centres: list, previous: list | None,
                    versions: tuple | None = None) -> Iteration:
        """Queue one iteration from `centres` (futures of row slices of the K centres, `worker.Update`s);
        `previous`: the centres of the step before (None: a new run). A step per worker, then the reduction:
        the rows of the centres are cut into one range per reducer, and each reducer sums every step's partials
        of its range (a reduce-scatter: each receives 1/R of the partials), so the next steps gather R slices;
        the scalars follow off the critical path. `versions`: the names of the centres and previous centres
        (the shards remember labels by them); default: their futures' keys."""
        version, previous_version = versions or (centres[0].key, None if previous is None else previous[0].key)
        owners = self._owners
        reducers = self._reducers(owners, k)
        steps = [self._submit(worker.step, s, "step", self.spec, numerics, self._blocks[s], centres, version,
                              previous, previous_version,
                              "device" if reducers == [self.addresses[s]] else self._remote, False,
                              reducers if len(reducers) == 1 else [])
                 for s in self._owned]
        bounds = [k * j // len(reducers) for j in range(len(reducers) + 1)]
        parts, cut = [], []
        for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            rows = steps if len(reducers) == 1 else [
                self.client.submit(worker.rows_of, step, lo, hi, key=self._key("rows", f"{i}.{j}"),
                                   workers=[owners[i]], allow_other_workers=True, pure=False)
                for i, step in enumerate(steps)]
            cut += [] if len(reducers) == 1 else rows
            parts.append(self.client.submit(worker.reduce, numerics, self.spec.token, self._export_token, owners,
                                            lo, hi, centres, *rows, key=self._key("reduce", j),
                                            workers=[reducers[j]], allow_other_workers=True, pure=False))
        return Iteration(steps, parts, self._scalars(numerics, centres, parts), cut)

    @property
    def _remote(self) -> str:
        """Where step results bound for another worker wait (`worker.StepResult.placed`)."""
        return "export" if self.spec.handoff == "ipc" else "host"

    def _steps_where(self) -> str:
        """Chained steps: every worker takes every step's partials (kept on the device with a single worker)."""
        return "device" if len(self._owned) == 1 else self._remote

    def start_chain(self, centres: list, previous: list | None, version: str, previous_version: str | None,
                    numerics) -> list:
        """The first steps of a chain, from explicit centres (futures of `worker.Update`s); the first carries them."""
        owned, peers = self._owned, self._owners
        return [self._submit(worker.step, s, "step", self.spec, numerics, self._blocks[s], centres, version,
                             previous, previous_version, self._steps_where(), s == owned[0], peers)
                for s in owned]

    def submit_chained(self, numerics, prior: list, iteration: int, version: str, previous_version: str,
                       topic: str) -> list:
        """Iteration `iteration` as one chained step per worker over every step of the iteration before (see
        `worker.chained_step`); the first publishes the update's scalars to `topic` and carries the centres."""
        owned, peers = self._owned, self._owners
        return [self._submit(worker.chained_step, s, "step", self.spec, numerics, self._blocks[s], iteration,
                             version, previous_version, self._steps_where(), s == owned[0],
                             topic if s == owned[0] else None, peers, len(prior), *prior) for s in owned]

    def step_centres(self, step) -> object:
        """A future of the host Update of the centres a chained step carries (`worker.step_centres`)."""
        return self.client.submit(worker.step_centres, step, key=self._key("centres-of", 0), pure=False)

    def chain_inertia(self, numerics, steps: list):
        return self.client.submit(worker.chain_inertia, numerics, *steps, key=self._key("inertia", 0), pure=False)

    def _reducers(self, owners: list, k: int) -> list:
        """Where the reduction runs: one reducer per host (its first worker), or `reducers` of them if set.
        Measured on one 4-GPU host (K=8192, D=128), one reducer beat one per worker (33 vs 39 ms of overhead
        per iteration): the transfers share the host, and the cut adds a hand-off. Across hosts each node's
        network link takes its share, which is what the reduce-scatter spreads."""
        if self.reducers is not None:  # (more reducers than workers share them)
            chosen = [owners[j % len(owners)] for j in range(max(1, self.reducers))]
        else:
            first = {}
            for a in owners:
                first.setdefault(_host(a), a)
            chosen = list(first.values())
        return chosen[:max(1, min(len(chosen), k))]

    def suits_chaining(self) -> bool:
        """allreduce='auto' chains the steps when at most CHAIN_MAX_WORKERS workers of one host hold blocks: each
        worker then receives every other's partials, cheap there (measured faster on 1-4 GPUs of one host with the
        device hand-off), while the reduction moves less across a network."""
        owners = self._owners
        return len(owners) <= CHAIN_MAX_WORKERS and len({_host(a) for a in owners}) == 1

    def submit_reseed(self, it: Iteration, numerics, centres: list, n_empty: int) -> Iteration:
        """Redo an iteration's update with its empty clusters taken by the farthest rows of every worker (rare:
        one reducer over the whole steps)."""
        far = [self._submit(worker.farthest, s, "farthest", self.spec, numerics, self._blocks[s],
                            [self.starts[i] for i in self._blocks[s]], centres, n_empty)
               for s in self._owned]
        update = self.client.submit(worker.reseed, numerics, self._export_token, centres, len(it.steps), *it.steps,
                                    *far,
                                    key=self._key("reseed", 0), pure=False)
        return Iteration(it.steps, [update], self._scalars(numerics, centres, [update]))

    def submit_update(self, numerics, k: int, steps: list, centres: list) -> Iteration:
        """The update of one iteration's steps (chained ones included) as a reduction task, with its scalars."""
        update = self.client.submit(worker.reduce, numerics, self.spec.token, self._export_token, [], 0, k,
                                    centres, *steps, key=self._key("reduce", 0),
                                    workers=self._reducers(self._owners, k)[:1], allow_other_workers=True,
                                    pure=False)
        return Iteration(steps, [update], self._scalars(numerics, centres, [update]))

    def _scalars(self, numerics, centres: list, parts: list):
        return self.client.submit(worker.scalars, numerics.metric, len(centres), *centres, *parts,
                                  key=self._key("scalars", 0), pure=False)

    @property
    def _export_token(self) -> str | None:
        """Reducers export the centres (see `worker.Update`) in a fit with the device hand-off."""
        return self.spec.token if self.spec.handoff == "ipc" else None

    def gather(self, *centres: list) -> list:
        """Centres held as row-slice futures, as tensors: all of them in one round trip (through a host copy on
        the workers when they are exported device buffers)."""
        futures = [f for c in centres for f in c]
        if self._export_token:
            futures = [self.client.submit(worker.on_host, f, key=self._key("on-host", i), pure=False)
                       for i, f in enumerate(futures)]
        got = iter(self.client.gather(futures))
        return [worker.joined([next(got) for _ in c]) for c in centres]

    def anchor(self, centers: torch.Tensor) -> list:
        """Centres from the client as futures of row slices (one here) that Dask can recompute: a task carrying
        the values. Scattered data would die with its worker and take every iteration built on it along (a lost
        step or reduction is recomputed through that chain)."""
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):  # K*D values, once
            return [self.client.submit(worker.update_from, worker.wire(centers), key=self._key("centres", 0),
                                       pure=False)]

    # ------------------------------------------------------------------------------------------ collective
    def start_collective(self) -> str:
        """One torch.distributed group over the workers holding blocks (rank: position in `addresses`)."""
        first = self.addresses[0]
        port = self.client.run(collective.free_port, workers=[first])[first]
        host = first.split("://")[-1].rsplit(":", 1)[0]
        gpus = self.client.run(collective.has_gpu, workers=self.addresses)
        backend = "nccl" if all(gpus.values()) else "gloo"
        self.client.run(collective.join, self.addresses, f"tcp://{host}:{port}", backend, workers=self.addresses)
        return backend

    def stop_collective(self) -> None:
        self.client.run(collective.leave, workers=self.addresses)

    def submit_run(self, numerics, run: int, start: int, initial, previous, max_iter: int, tol: float, past: list,
                   writer, channel: str) -> list:
        """One task per worker that runs a whole Lloyd run in lock-step with the others (`collective.run_loop`)."""
        return [self._submit(collective.run_loop, s, "run", self.spec, numerics, self._blocks[s],
                             [self.starts[i] for i in self._blocks[s]], run, start, initial, previous, max_iter,
                             tol, past, writer if s == 0 else None, channel) for s in self.shard_ids]

    def forget(self) -> None:
        self.client.run(worker.forget, self.spec.token)
        if self.spec.handoff == "ipc":  # peers close their mappings before the owners free the buffers
            self.client.run(handoff.close, self.spec.token)
            self.client.run(handoff.free, self.spec.token)
