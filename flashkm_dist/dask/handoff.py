"""Device-to-device hand-off between GPU workers of one host (CUDA IPC) instead of the socket: step partials to
the reducer, and the reducer's centres to the next steps.

Why: on a 4-GPU host most of the Dask path's overhead was moving 8 MB of partials per worker per iteration:
device -> host copy, socket, host -> device copy (~15-20 ms at 4 workers). A buffer exported once through CUDA
IPC and opened once by each peer costs ~0.06 ms per hand-off (2xH200, measured: benchmarks/ipc_probe.py).

How it stays correct:
- Exports: each worker keeps a pool of device buffers of its own (plain cudaMalloc, exported once). A result
  bound for another worker leases one, and returns it to the pool only when Dask drops that result (the lease dies
  with the object), so a buffer is never rewritten while Dask may still send the result it holds.
- Imports: a peer opens a buffer once (cached) and copies it into its own memory at once (on a stream of its own,
  waiting for that copy only), while Dask still holds the producer's result; its copy is then an ordinary device
  result that owes nothing to the producer.
- A payload names its host; a process elsewhere refuses it with a clear error. `probe` checks, per fit, that the
  workers can open each other's buffers; otherwise the fit keeps the socket path.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
import weakref

import torch

_LOCK = threading.Lock()
_FREE: dict = {}  # (token, nbytes) -> [Buffer] returned to the pool
_EXPORTED: dict = {}  # token -> [Buffer] ever made by this process
_OPENED: dict = {}  # (token, handle) -> a uint8 tensor over this process's mapping of a peer's buffer (made once)
_CLOSED: set = set()  # tokens whose fit has ended here: buffers still leased are freed when their lease dies
_PROBES: dict = {}  # probe token -> the lease of its test buffer


@functools.cache
def host_token() -> str:
    """Processes that can share device buffers see the same token (the host name and its boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class Buffer:
    """A device buffer of this process with its IPC handle."""

    def __init__(self, token: str, nbytes: int):
        import cupy
        self.token, self.nbytes = token, nbytes
        self.ptr = cupy.cuda.runtime.malloc(nbytes)
        self.handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self.ptr))
        self.view = _tensor(self.ptr, nbytes)

    def free(self) -> None:
        import cupy
        self.view = None
        cupy.cuda.runtime.free(self.ptr)


def _tensor(ptr: int, nbytes: int) -> torch.Tensor:
    """uint8 tensor over raw device memory (the caller keeps the memory alive)."""
    import cupy
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, None)
    arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.as_tensor(arr, device="cuda")


ALIGN = 16


def _layout(specs: list) -> tuple[list, int]:
    """(byte offset, byte size) of tensors (shape, dtype) laid out one after another, each aligned to ALIGN, and
    the bytes of the whole."""
    spans, at = [], 0
    for shape, dtype in specs:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        spans.append((at, nbytes))
        at += -(-nbytes // ALIGN) * ALIGN
    return spans, max(at, ALIGN)


def _views(flat: torch.Tensor, specs: list) -> list[torch.Tensor]:
    return [flat[at:at + n].view(dtype).view(shape) for (shape, dtype), (at, n) in zip(specs, _layout(specs)[0])]


class Lease:
    """A pool buffer held by one result; back to the pool when the result is garbage."""

    def __init__(self, token: str, nbytes: int):
        with _LOCK:
            free = _FREE.get((token, nbytes))
            self.buffer = free.pop() if free else None
        if self.buffer is None:
            self.buffer = Buffer(token, nbytes)
            with _LOCK:
                _EXPORTED.setdefault(token, []).append(self.buffer)
        weakref.finalize(self, _give_back, self.buffer)

    def payload(self) -> dict:
        b = self.buffer
        return {"host": host_token(), "token": b.token, "handle": b.handle, "nbytes": b.nbytes}


def _give_back(buffer: Buffer) -> None:
    with _LOCK:
        if buffer.token not in _CLOSED:
            _FREE.setdefault((buffer.token, buffer.nbytes), []).append(buffer)
            return
        exported = _EXPORTED.get(buffer.token, [])
        if buffer in exported:
            exported.remove(buffer)
        if not exported:  # (the fit's last buffer: forget the fit here)
            _EXPORTED.pop(buffer.token, None)
    buffer.free()


def export(token: str, tensors: list[torch.Tensor], wait: bool = True) -> tuple[Lease, list[torch.Tensor]]:
    """Copy device tensors into one leased buffer; returns the lease and views of them in it. The copy is finished
    before this returns (a peer reads it from another process, outside any stream order). The tensors come from
    the current stream (the engine computes on it), so the copies queued after them read them finished, and only
    that stream is waited for (not the peers' results this worker copies in meanwhile, `take`). `wait=False`:
    the copies are only queued; the caller waits for the current stream before anyone is told of the buffer."""
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    lease = Lease(token, _layout(specs)[1])
    views = _views(lease.buffer.view, specs)
    for view, t in zip(views, tensors):
        view.copy_(t)
    if wait:
        torch.cuda.current_stream().synchronize()
    return lease, views


def describe(lease: Lease, tensors: list[torch.Tensor]) -> dict:
    """What a peer needs to take the exported `tensors` (see `take`)."""
    return {**lease.payload(), "specs": [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]}


def take(payload: dict) -> list[torch.Tensor]:
    """A peer's exported tensors (see `export`, `describe`) copied into this process's device memory."""
    if payload["host"] != host_token():
        raise RuntimeError(f"data was handed over as device memory of host {payload['host']!r}, which this "
                           f"process on {host_token()!r} cannot open: a worker of another host took over a task "
                           "of a fit that checked, at its start, that its workers share one host; refit")
    key = (payload["token"], payload["handle"])
    with _LOCK:
        view = _OPENED.get(key)
        if view is None:
            import cupy
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(payload["handle"])
            view = _OPENED[key] = _tensor(ptr, payload["nbytes"])
    stream = _copy_stream(view.device)
    with torch.cuda.stream(stream):
        flat = view.clone()
    stream.synchronize()  # (only the copy: this worker's own step may still be queued on its default stream)
    flat.record_stream(torch.cuda.default_stream(view.device))  # (the tasks that read it run on the default stream)
    return _views(flat, [(shape, getattr(torch, dtype)) for shape, dtype in payload["specs"]])


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream peers' buffers are copied on. `take` runs while a result is deserialised, on the worker's event
    loop: waiting there for the default stream would hold the loop until this worker's own step is done."""
    return torch.cuda.Stream(device)


def close(token: str) -> int:
    """Close this process's mappings of peers' buffers of a fit (run on every worker before `free`)."""
    with _LOCK:
        ptrs = [_OPENED.pop(k).data_ptr() for k in [k for k in _OPENED if k[0] == token]]
    if ptrs:
        import cupy
        for p in ptrs:
            cupy.cuda.runtime.ipcCloseMemHandle(p)
    return len(ptrs)


def free(token: str) -> int:
    """Free the pool buffers of a fit (after every peer closed them); those still leased go when their lease dies."""
    with _LOCK:
        _CLOSED.add(token)
        pooled = [b for (t, _), bs in list(_FREE.items()) if t == token for b in bs]
        for k in [k for k in _FREE if k[0] == token]:
            del _FREE[k]
        exported = _EXPORTED.get(token, [])
        for b in pooled:
            exported.remove(b)
        if not exported:
            _EXPORTED.pop(token, None)
    for b in pooled:
        b.free()
    return len(pooled)


# ---------------------------------------------------------------------------------------------- per-fit probe
def _probe_export(token: str, dask_worker=None):
    """A small buffer with known values, kept until `free(token)`; its payload, or None without a GPU or CuPy."""
    try:
        if not torch.cuda.is_available():
            return None
        import cupy  # noqa: F401
        lease, views = export(token, [torch.arange(4, dtype=torch.int64, device="cuda")])
        _PROBES[token] = lease
        return describe(lease, views)
    except Exception:  # noqa: BLE001 - any failure means: not this way
        return None


def _probe_import(payload: dict, dask_worker=None) -> bool:
    try:
        got, = take(payload)
        return bool((got.cpu() == torch.arange(4)).all())
    except Exception:  # noqa: BLE001
        return False


def _probe_end(token: str, dask_worker=None) -> None:
    _PROBES.pop(token, None)
    close(token)



def probe(client, addresses: list) -> bool:
    """True when every worker in `addresses` has a GPU, all are on one host, and each can open the others'
    buffers (checked with a real export and import per worker)."""
    if len(addresses) < 2:
        return False
    token = f"probe-{os.getpid()}-{id(addresses)}"
    payloads = client.run(_probe_export, token, workers=addresses)
    ok = all(payloads.get(a) for a in addresses) and len({p["host"] for p in payloads.values()}) == 1
    try:
        for a in addresses if ok else ():
            others = [b for b in addresses if b != a]
            ok = ok and all(client.run(_probe_import, payloads[a], workers=others).values())
    finally:
        client.run(_probe_end, token, workers=addresses)
        client.run(free, token, workers=addresses)
    return bool(ok)
