"""The opt-in collective path (`allreduce='nccl'`): workers all-reduce their partials among themselves.

One task per worker runs a whole Lloyd run. Each iteration sums the exact integer partials of all workers with one
`torch.distributed.all_reduce` (NCCL when every worker has a GPU, else Gloo: the same code, tested on CPUs), then
every worker makes the same update on its own device (integer sums, an elementwise update and an exact shift:
identical bits everywhere), so all see the same scalars and stop together. Nothing passes through Dask between
iterations. A collective cannot survive a lost worker (the fit fails with the worker's error); the default Dask
reduction is the one that recovers.
"""
from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from flashkm_dist.dask import summed, worker
from flashkm_dist.lloyd import move_to_empty, update_on_device
from flashkm_dist.streaming import Farthest

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


def _iterate(shard, blocks, starts, centers, numerics, version, previous, previous_centers, graphed=None):
    """One iteration on this worker: local step, all-reduce, re-seeding of empty clusters (all-gather of the
    farthest rows), the update. Every worker returns the same scalars and centres. `graphed`: a
    `summed.GraphedUpdate` of this run (CUDA), or None to run the update op by op."""
    result = shard.step(blocks, centers, numerics, version, previous, previous_centers)
    dev = shard.engine.device
    counts = summed.counters(result.n_changed, result.seconds, dist.get_rank(), dist.get_world_size())
    flat = summed.vector(result.partials.sums, result.partials.weights, result.inertia, counts, dev)
    if dist.get_backend() == "gloo":
        flat = flat.cpu()
    dist.all_reduce(flat)  # one collective for all of it
    partials, new, packed = graphed(flat, centers) if graphed else summed.after_sum(flat, centers, numerics)
    s = summed.read(packed)  # the one wait for the device in an iteration
    if s["n_empty"]:  # (all workers see the same count) the farthest rows of all workers take the empty clusters
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, shard.farthest(blocks, centers, numerics, s["n_empty"], starts))
        new, shift = update_on_device(move_to_empty(partials, Farthest.merge(found, s["n_empty"])), centers,
                                      numerics.metric)
        s["shift"] = float(shift)
    return {"n_changed": s["n_changed"], "inertia": s["inertia"], "center_shift": s["shift"],
            "slowest_worker_seconds": s["slowest_worker_seconds"]}, new.to(dev)


def run_loop(spec, numerics, ids: list, starts: list, run: int, start: int, initial, previous, max_iter: int,
             tol: float, past: list, writer, channel: str, *datas) -> dict:
    """A whole Lloyd run on this worker, in step with the others: they all see the same scalars, so they all
    stop at the same iteration. Rank 0 logs each iteration as an event (progress) and writes the checkpoint."""
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
        strict, s, i, new = False, None, start - 1, centers
        graphed = summed.GraphedUpdate(numerics) if dev.type == "cuda" and numerics.metric == "euclidean" and GRAPHS \
            else None
        for i in range(start, max_iter + 1):
            t0 = time.perf_counter()
            s, new = _iterate(shard, blocks, starts, centers, numerics, (run, i), prev_version, prev_centers,
                              graphed)
            history.append({"iteration": i, "inertia": s["inertia"], "center_shift": s["center_shift"],
                            "labels_changed": s["n_changed"], "seconds": time.perf_counter() - t0,
                            "slowest_worker_seconds": s["slowest_worker_seconds"]})
            if rank == 0:
                if writer is not None:
                    writer(i, (new, centers), history)
                get_worker().log_event(channel, history[-1])  # fire and forget: the client's progress bar
            strict = s["n_changed"] == 0
            if strict or s["center_shift"] <= tol or i == max_iter:
                break
            prev_centers, prev_version, centers = centers, (run, i), new
        inertia = s["inertia"]
        if not (strict and s["center_shift"] == 0.0):  # the final assignment, to the returned centres
            inertia = _iterate(shard, blocks, starts, new, numerics, (run, i + 1), (run, i), centers,
                               graphed)[0]["inertia"]
    return {"centers": worker.Update(new.cpu()), "inertia": inertia, "n_iter": i, "history": history}
