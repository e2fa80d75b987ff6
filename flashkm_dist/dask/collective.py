"""The opt-in collective path (`allreduce='nccl'`): workers all-reduce their partials among themselves.

Each worker's step task sums the exact integer partials of all workers with one `torch.distributed.all_reduce`
(NCCL between GPU workers, Gloo between CPU workers: the same code, tested on CPUs), then every worker makes the
same update on its own device (integer sums and an elementwise update: identical bits everywhere) and keeps the
centres for its next step. Nothing but scalars goes through Dask. A collective cannot survive a lost worker: this
path refuses a change of workers; the default Dask reduction is the one that recovers.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from flashkm_dist.dask import worker
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import empty_clusters, move_to_empty, next_centers
from flashkm_dist.streaming import Farthest

TIMEOUT = timedelta(minutes=10)
_KEEP = 4  # centre versions a worker keeps (the speculative step runs one ahead)


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


def _store(shard, version, centers: torch.Tensor) -> None:
    kept = shard.__dict__.setdefault("collective_centers", {})
    kept[version] = centers
    for old in sorted(kept)[:-_KEEP]:
        del kept[old]


def centers_of(spec, version) -> worker.Update:
    return worker.Update(worker.shard_for(spec).collective_centers[version].cpu())


def step(spec, numerics, ids: list, starts: list, version, previous, initial, after, *datas) -> dict:
    """One iteration on this worker: local step, all-reduce, re-seeding of empty clusters (all-gather of the
    farthest rows), the update. `initial`: the run's first centres (and the previous ones, when resuming)."""
    shard = worker.shard_for(spec)
    with shard.lock:
        if initial is not None:
            _store(shard, version, initial[0].centers)
            if previous is not None and initial[1] is not None:
                _store(shard, previous, initial[1].centers)
        kept = shard.collective_centers
        centers = kept[version].to(shard.engine.device)
        blocks = worker.as_blocks(ids, datas)
        result = shard.step(blocks, centers, numerics, version, previous, kept.get(previous))
        dev = shard.engine.device
        k, d = centers.shape
        flat = torch.cat([result.partials.sums.reshape(-1), result.partials.weights.reshape(-1),
                          result.inertia.reshape(-1), torch.tensor([result.n_changed], device=dev)]).to(dev)
        if dist.get_backend() == "gloo":
            flat = flat.cpu()
        dist.all_reduce(flat)
        sums, weights = flat[:2 * k * d].view(2, k, d), flat[2 * k * d:2 * k * d + 2 * k].view(2, k)
        partials = reference.Partials(fp.normalize(sums), fp.normalize(weights), numerics.scale)
        inertia = fp.normalize(flat[-3:-1][:, None])[:, 0]
        n_empty = int(empty_clusters(partials).numel())
        if n_empty:
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, shard.farthest(blocks, centers, numerics, n_empty, starts))
            partials = move_to_empty(partials, Farthest.merge(found, n_empty))
        new, shift = next_centers(partials, centers, numerics.metric)
        _store(shard, (version[0], version[1] + 1), new)
        return {"n_changed": int(flat[-1]), "inertia": float(fp.to_float(inertia, numerics.scale.dist_exp)),
                "shift": shift, "n_empty": n_empty, "seconds": result.seconds}
