"""Checks of device results that raise when the host next reads from the device, instead of at once.

Why: a check that reads a flag back stalls the host until the device has caught up, so the device then idles
while the host queues the rest of the step one launch at a time. A Lloyd step reads its scalars back once at its
end anyway; the checks of its kernels travel in that same transfer and raise there, before any result is used.
"""
from __future__ import annotations

from typing import Callable

import torch


class DeferredChecks:
    """int64 device values, each group with the function that raises if they are bad."""

    def __init__(self):
        self._items: list[tuple[torch.Tensor, Callable[[list], None]]] = []

    def add(self, values: torch.Tensor, check: Callable[[list], None]) -> None:
        """Queue `check(values.tolist())` (values: int64, any shape, flattened)."""
        self._items.append((values.reshape(-1).to(torch.int64), check))

    def values(self, device) -> torch.Tensor:
        """All queued values as one int64 vector on `device` (empty when nothing is queued)."""
        if not self._items:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.cat([v.to(device) for v, _ in self._items])

    def verify(self, host: list | None = None) -> None:
        """Run the checks on `host`, the values as read back with the caller's own (default: read them now).
        The checks stay queued: a replayed CUDA graph refills the same value tensors and verifies again."""
        if not self._items:
            return
        host = self.values(self._items[0][0].device).tolist() if host is None else list(host)
        pos = 0
        for v, check in self._items:
            check(host[pos:pos + v.numel()])
            pos += v.numel()
