"""The opt-in collective path (`allreduce='nccl'`): workers all-reduce their partials among themselves.

One task per worker runs a whole Lloyd run. Each iteration sums the exact integer partials of all workers with one
`torch.distributed.all_reduce` (NCCL when every worker has a GPU, else Gloo: the same code, tested on CPUs), then
every worker makes the same update on its own device (integer sums, an elementwise update and an exact shift:
identical bits everywhere), so all see the same scalars and stop together. Nothing passes through Dask between
iterations. The device never waits for the host: each iteration is queued whole (step, all-reduce, update, the
scalars' copy to the host) and the next step is queued before the scalars are read (`run_loop`). A collective
cannot survive a lost worker (the fit fails with the worker's error); the default Dask
reduction is the one that recovers.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flashkm_dist.dask import summed, worker
from flashkm_dist.kernels import clock
from flashkm_dist.lloyd import move_to_empty, update_on_device
from flashkm_dist.streaming import EngineStep, Farthest

TIMEOUT = timedelta(minutes=10)
GRAPHS = True  # the update as one CUDA graph (benchmarks switch it off to measure what it saves)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    return torch.cuda.is_available()


def join(addresses: list, init_method: str, backend: str, dask_worker=None) -> str:
    """Run (by `Client.run`) on every worker of the fit at once: one group, rank = position in `addresses`.
    `backend`: NCCL when every worker has a GPU, else Gloo for all (a CPU worker beside GPU workers)."""
    if dist.is_initialized():
        raise RuntimeError(f"worker {dask_worker.address} is already in a torch.distributed group (another "
                           "allreduce='nccl' fit running?)")
    dist.init_process_group(backend, init_method=init_method, rank=addresses.index(dask_worker.address),
                            world_size=len(addresses), timeout=TIMEOUT)
    return backend


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class _Queued:
    """One iteration queued on this worker's device (step, all-reduce, update, the scalars' copy to the host) and
    not waited for: the host can queue the next step meanwhile, so the device never idles between the two."""

    result: EngineStep
    flat: torch.Tensor  # the summed vector (the graph's outputs are overwritten by the next replay; this is not)
    new: torch.Tensor
    host: torch.Tensor
    copied: torch.cuda.Event | None


def _queue(shard, blocks, centers, numerics, version, previous, previous_centers, graphed=None) -> _Queued:
    """Queue one iteration: local step, all-reduce, the update. With the device's clock the step is timed by
    stamps in stream order (`kernels.clock`), so nothing here waits for it; else the step waits and is timed on
    the host. `graphed`: a `summed.GraphedUpdate` of this run (CUDA), or None to run the update op by op."""
    dev, rank, world = shard.engine.device, dist.get_rank(), dist.get_world_size()
    if clock.available(dev):
        result, ticks = worker.stamped_step(shard, blocks, centers, numerics, version, previous, previous_centers)
        counts = summed.device_counters(result.changed, ticks, rank, world)
    else:
        result = shard.step(blocks, centers, numerics, version, previous, previous_centers)
        counts = summed.counters(result.n_changed, result.seconds, rank, world)
    flat = summed.vector(result.partials.sums, result.partials.weights, result.inertia, counts, dev)
    if dist.get_backend() == "gloo":
        flat = flat.cpu()
    if world > 1:
        dist.all_reduce(flat)  # one collective for all of it
    _, new, packed = graphed(flat, centers) if graphed else summed.after_sum(flat, centers, numerics)
    return _Queued(result, flat, new, *summed.copy_to_host(packed, result.pending()))


def _finish(queued: _Queued, shard, blocks, starts, centers, numerics) -> tuple[dict, torch.Tensor, bool]:
    """Wait for a queued iteration's scalars (the kernels' checks raise here); empty clusters take the farthest rows
    of all workers (all see the same count, so all re-seed together). Returns (scalars, new centres, re-seeded)."""
    if queued.copied is not None:
        queued.copied.synchronize()
    s, pending = summed.unpack(queued.host)
    queued.result.settle(pending)
    new = queued.new
    if s["n_empty"]:
        partials = summed.after_sum(queued.flat, centers, numerics)[0]
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, shard.farthest(blocks, centers, numerics, s["n_empty"], starts))
        new, shift = update_on_device(move_to_empty(partials, Farthest.merge(found, s["n_empty"])), centers,
                                      numerics.metric)
        s["shift"] = float(shift)
    return ({"n_changed": s["n_changed"], "inertia": s["inertia"], "center_shift": s["shift"],
             "slowest_worker_seconds": s["slowest_worker_seconds"]}, new.to(shard.engine.device),
            bool(s["n_empty"]))


def run_loop(spec, numerics, ids: list, starts: list, run: int, start: int, initial, previous, max_iter: int,
             tol: float, past: list, writer, channel: str, *datas) -> dict:
    """A whole Lloyd run on this worker, in step with the others: they all see the same scalars, so they all
    stop at the same iteration. Rank 0 logs each iteration as an event (progress) and writes the checkpoint.
    Each iteration's next step is queued before its scalars are read: it is the final assignment when the run
    stops there, and is dropped when empty clusters were re-seeded (the shard then recounts the labels it
    changed against the iteration before, from its centres: `Shard.step`)."""
    from distributed import get_worker
    shard = worker.shard_for(spec)
    rank = dist.get_rank()
    with shard.lock:
        blocks = worker.as_blocks(ids, datas)
        dev = shard.engine.device
        centers = initial.centers.to(dev)
        prev_centers = None if previous is None else previous.centers.to(dev)
        prev_version = None if previous is None else (run, start - 1)
        history = list(past)  # the iterations before a resume
        graphed = summed.GraphedUpdate(numerics) if dev.type == "cuda" and numerics.metric == "euclidean" and GRAPHS \
            else None

        def queue(i, now, before, before_version):
            return _queue(shard, blocks, now, numerics, (run, i), before_version, before, graphed)

        strict, s, i, new = False, None, start - 1, centers
        current = queue(start, centers, prev_centers, prev_version) if start <= max_iter else None
        ahead = None
        t0 = time.perf_counter()
        for i in range(start, max_iter + 1):
            ahead = queue(i + 1, current.new, centers, (run, i))
            s, new, reseeded = _finish(current, shard, blocks, starts, centers, numerics)
            if reseeded:
                ahead = None  # (it stepped from the centres before re-seeding)
            now = time.perf_counter()
            history.append({"iteration": i, "inertia": s["inertia"], "center_shift": s["center_shift"],
                            "labels_changed": s["n_changed"], "seconds": now - t0,
                            "slowest_worker_seconds": s["slowest_worker_seconds"]})
            t0 = now
            if rank == 0:
                if writer is not None:
                    writer(i, (new, centers), history)
                get_worker().log_event(channel, history[-1])  # fire and forget: the client's progress bar
            strict = s["n_changed"] == 0
            if strict or s["center_shift"] <= tol or i == max_iter:
                break
            current = ahead or queue(i + 1, new, centers, (run, i))
            prev_centers, centers = centers, new
        inertia = None if s is None else s["inertia"]
        final = ahead or (None if s is None else queue(i + 1, new, centers, (run, i)))
        if final is not None:  # the final assignment, to the returned centres (waited for in any case: its
            last = _finish(final, shard, blocks, starts, new, numerics)[0]  # all-reduce is queued everywhere)
            if not (strict and s["center_shift"] == 0.0):
                inertia = last["inertia"]
    return {"centers": worker.Update(new.cpu()), "inertia": inertia, "n_iter": i, "history": history}
