"""Wall-clock timing with the device synchronised around the timed call, shared by the benchmark scripts: device
work is asynchronous, so a host clock only means something once the queue is drained (a no-op on the CPU)."""
from __future__ import annotations

import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn):
    """(fn(), seconds it took, device work included)."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def seconds(fn, reps: int, warmup: int = 0) -> list:
    """Seconds of each of `reps` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        synced(fn)
    return [synced(fn)[1] for _ in range(reps)]
