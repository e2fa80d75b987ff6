"""Compile the kernels of a call concurrently, before it launches them one after the other.

Why: the first call of a new shape compiles each of its kernels (FlashAssign: seven or eight) when it is first
launched, one after the other, although none depends on another; and each first launch also builds the kernel's
launcher, a small C module, with the host's compiler. Much of both runs outside Python's lock (ptxas and the C
compiler are subprocesses), so threads overlap them. Inside `ahead()`, `config.launch` hands each kernel to a
thread pool to be compiled, loaded and given its launcher, instead of launching it; the caller then runs the call
for real and finds every kernel ready. Launches need nothing from earlier kernels' results on the host (the passes
never wait for the device), so the dry run sees the same arguments, hence the same specialisations, as the real
one.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("compile_ahead", default=None)


def active() -> bool:
    return _PENDING.get() is not None


def submit(kernel, grid, args: tuple, options: dict) -> None:
    """Queue the compile of kernel[grid](*args, **options) in the open `ahead()` block."""
    _PENDING.get().append(functools.partial(_compile, kernel, grid, args, options))


def _compile(kernel, grid, args: tuple, options: dict) -> None:
    """Compile for the arguments' device, then load the module and build the launcher (a small C module the host
    compiler builds for each new kernel signature: as slow as the compile itself, and otherwise done at the first
    launch, one kernel after the other)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        compiled = kernel.warmup(*args, grid=grid, **options)
        load = getattr(compiled, "_init_handles", None)  # (Triton's own first-launch step; absent: skipped)
        if load is not None:
            load()


@contextlib.contextmanager
def ahead(max_workers: int | None = None):
    """Collect the launches made inside, then compile them all at once; the first error is raised at exit."""
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    if pending:
        _start_driver()
        workers = max_workers or min(len(pending), os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            for done in [pool.submit(fn) for fn in pending]:
                done.result()


def _start_driver() -> None:
    """Triton's driver builds its own helper module on first use: once, here, rather than in every thread."""
    try:
        from triton.runtime import driver
        driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no GPU driver (tests with stand-in kernels): the threads need none
        pass
