"""The GPU's own clock, written into a device tensor in stream order (no host wait).

Why: a step's time used to be read on the host after waiting for the step, and only then was the rest of the
iteration queued. On an H100 every host call right after a wait of some 90 ms ran 5-10 times slower than warm
(the vector, the all-reduce call, the update's launch: 1.2 ms together, against about 0.15 ms queued while the step
still runs). Stamping the step's start and end on the device lets the whole iteration be queued before the one
wait, with the step's time travelling in the summed vector like any other value.

No plain-torch twin: on the CPU the host clock is the step's clock (everything there runs synchronously).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _stamp_kernel(out_ptr):
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(out_ptr, now)


def stamp(out: torch.Tensor, index: int) -> None:
    """out[index] = the device's global timer in ns, when the stream reaches this point (int64 CUDA tensor)."""
    with torch.cuda.device(out.device):
        _stamp_kernel[(1,)](out[index:], num_warps=1)


@functools.cache
def available(device: torch.device) -> bool:
    """Whether stamps work on `device` (a CUDA GPU on which the kernel compiles and the clock advances)."""
    if device.type != "cuda":
        return False
    try:
        ticks = torch.zeros(2, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        stamp(ticks, 0)
        torch.cuda._sleep(1000)
        stamp(ticks, 1)
        first, second = ticks.tolist()
        return second > first > 0
    except Exception:  # noqa: BLE001 - no stamps: the caller times on the host, after waiting
        return False
