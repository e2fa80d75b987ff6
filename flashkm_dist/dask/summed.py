"""The Lloyd update from the workers' summed partials, laid out as one int64 vector, and back as one vector.

Shared by the two paths whose every worker makes the same update itself: `collective` (NCCL all-reduces the
vector) and the chained steps (`worker.chained_step` sums the steps it receives). One vector in and one out means
one wait for the device per iteration, and the update's some fifty short kernels on K x D values can run as one
CUDA graph (`GraphedUpdate`): ~0.3 ms instead of 1.2-1.7 ms op by op on an H200 (K=8192, D=128).

The summed vector: sums limbs (2 K D) | weight limbs (2 K) | inertia limbs (2) | labels changed (1) | each
worker's step time in ns in its own slot (summing leaves them side by side, so the slowest is read after the sum).
"""
from __future__ import annotations

import torch

from flashkm_dist.graphed import Replay
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import update_with_weights


def counters(n_changed: int, seconds: float, slot: int, n_slots: int) -> torch.Tensor:
    """The tail of one worker's vector: its labels changed, and its step time in its slot (host, int64)."""
    counts = torch.zeros(1 + n_slots, dtype=torch.int64)
    counts[0], counts[1 + slot] = n_changed, round(seconds * 1e9)
    return counts


def device_counters(changed: torch.Tensor, ticks: torch.Tensor, slot: int, n_slots: int) -> torch.Tensor:
    """`counters` made on the device, in stream order: labels changed (0-d), and the step's time from its start and
    end stamps `ticks` (2,) (`kernels.clock`), so nothing waits for the step before the vector is queued."""
    dev = changed.device
    return torch.cat([changed.reshape(1), torch.zeros(slot, dtype=torch.int64, device=dev), ticks[1:] - ticks[:1],
                      torch.zeros(n_slots - slot - 1, dtype=torch.int64, device=dev)])


def counters_of(n_changed: list, seconds: list) -> torch.Tensor:
    """The tails of several workers' vectors summed (`counters` of each, in slot order), made at once."""
    return torch.tensor([sum(n_changed)] + [round(t * 1e9) for t in seconds], dtype=torch.int64)


def vector(sums: torch.Tensor, weights: torch.Tensor, inertia: torch.Tensor, counts: torch.Tensor,
           device: torch.device) -> torch.Tensor:
    """One worker's (or already summed) partials as the vector above, on `device`. `sums`: limbs (2, K, D).
    The host counters go to a GPU from pinned memory: a copy from pageable memory would wait for the device."""
    if device.type == "cuda" and not counts.is_cuda:
        counts = counts.pin_memory().to(device, non_blocking=True)
    return torch.cat([sums.reshape(-1).to(device), weights.reshape(-1).to(device),
                      inertia.reshape(-1).to(device), counts.to(device)])


def after_sum(flat: torch.Tensor, centers: torch.Tensor, numerics):
    """From the summed vector to the next centres, without waiting for the device: the partials, the new centres
    and the scalars in one float64 vector (empty clusters, labels changed and the slowest step in ns as int64
    bits, then inertia and shift; `read` unpacks it)."""
    k, d = centers.shape
    sums, weights = flat[:2 * k * d].view(2, k, d), flat[2 * k * d:2 * k * d + 2 * k].view(2, k)
    partials = reference.Partials(fp.normalize(sums), fp.normalize(weights), numerics.scale)
    tail = flat[2 * k * d + 2 * k:]  # inertia limbs (2), labels changed, the step times
    inertia = fp.to_float(fp.normalize(tail[:2][:, None])[:, 0], numerics.scale.dist_exp)
    new, shift, weights = update_with_weights(partials, centers, numerics.metric)
    empty = weights == 0
    ints = torch.stack([empty.sum(), tail[2], tail[3:].max()])
    return partials, new, torch.cat([ints.view(torch.float64), torch.stack([inertia, shift])])


def read(packed: torch.Tensor) -> dict:
    """`after_sum`'s scalars on the host (the one wait for the device)."""
    return unpack(packed.view(torch.int64).cpu())[0]


def copy_to_host(packed: torch.Tensor, also: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Queue the copy of `after_sum`'s scalars and of `also` (int64 values of the caller) to the host, without
    waiting: (host vector, the event to wait for before reading it; None when it is already there)."""
    both = torch.cat([packed.view(torch.int64), also.reshape(-1).to(packed.device)])
    if not both.is_cuda:
        return both, None
    host = torch.empty(both.shape, dtype=torch.int64, pin_memory=True)
    host.copy_(both, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def unpack(host: torch.Tensor) -> tuple[dict, list]:
    """The scalars of an int64 host vector laid out as `copy_to_host` makes it, and the caller's values after."""
    n_empty, n_changed, slowest = host[:3].tolist()
    inertia, shift = host[3:5].view(torch.float64).tolist()
    return {"n_empty": n_empty, "n_changed": n_changed, "slowest_worker_seconds": slowest / 1e9, "inertia": inertia,
            "shift": shift}, host[5:].tolist()


class GraphedUpdate:
    """`after_sum` of one run as a CUDA graph (`graphed.Replay`). The same kernels on the same values: the same
    bits. The first call runs op by op (the warm-up), the second captures; a refused capture leaves it op by op."""

    def __init__(self, numerics):
        self.numerics, self.replay, self.shapes = numerics, None, None

    def fits(self, flat: torch.Tensor, centers: torch.Tensor) -> bool:
        failed = self.replay is not None and self.replay.failed
        return flat.is_cuda and not failed and self.shapes in (None, (flat.shape, centers.shape, centers.dtype))

    def __call__(self, flat, centers):
        if not self.fits(flat, centers):
            return after_sum(flat, centers, self.numerics)
        if self.replay is None:
            self.shapes = (flat.shape, centers.shape, centers.dtype)
            self.replay = Replay(lambda f, c: after_sum(f, c, self.numerics), flat.device)
            return after_sum(flat, centers, self.numerics)
        out = self.replay(flat, centers)
        if out is None:
            return after_sum(flat, centers, self.numerics)
        partials, new, packed = out
        return partials, new.clone(), packed  # (the next replay overwrites the graph's own outputs)
