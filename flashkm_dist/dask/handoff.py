"""Same-host hand-off of a step's partials through shared memory instead of the socket.

Dask moves a task result between two worker processes over TCP even when both run on one host: the 8 MB of exact
partial sums a step returns (K=8192, D=128) cross the sender's and the receiver's event loops and two kernel
copies, once per worker and iteration, on the critical path of the Dask reduction. Instead, a step copies its sums
from the device straight into a file in /dev/shm (tmpfs: memory, no disk; `shared_empty`), and when Dask
serialises the result for a peer on the same host only the file's name travels: the receiver maps the file
(copy-on-write), with no copy at all. The file goes when the producer's array does (the mapping outlives it).
Same host means: the connection's two ends have the same IP, and every worker of the fit with that IP opens the
files of the others (`usable`, probed once per fit: containers that share a network but not /dev/shm fail it).
Anything else (another host, spilling to disk, no file: /dev/shm missing or full) sends the bytes as before.
Files left by a process that died are removed when the fit ends (`sweep`). `FLASHKM_SAME_HOST_SHM=0` switches
the hand-off off.
"""
from __future__ import annotations

import mmap
import os
import uuid
import weakref

import numpy as np

ROOT = "/dev/shm"
MIN_BYTES = 1 << 16  # smaller arrays ride in the message (a file costs more than it saves)
ENABLED = os.environ.get("FLASHKM_SAME_HOST_SHM", "1") != "0"  # benchmarks switch it per worker to compare
_FILES: "weakref.WeakKeyDictionary[mmap.mmap, str]" = weakref.WeakKeyDictionary()  # mapping -> its file


def _prefix(token: str) -> str:
    return os.path.join(ROOT, f"flashkm-{token}-")


def _host(address) -> str | None:
    if not isinstance(address, str) or "://" not in address:
        return None
    from distributed.comm.addressing import get_address_host
    try:
        return get_address_host(address)
    except ValueError:
        return None


def same_host(context) -> bool:
    """Whether a comm's two ends are on this host (the same IP); False when unknown (disk spill, no comm)."""
    if not context:
        return False
    mine = _host(context.get("sender", {}).get("address"))
    return mine is not None and mine == _host(context.get("recipient", {}).get("address"))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def shared_empty(shape: tuple, dtype, token: str | None) -> np.ndarray:
    """An uninitialised array in a new file of the fit `token` in /dev/shm, removed with the array; a plain
    array when there is no token, the hand-off is off, the array is small or the file cannot be made."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if not token or not ENABLED or nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    path = _prefix(token) + uuid.uuid4().hex
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return np.empty(shape, dtype)
    try:
        os.posix_fallocate(fd, 0, nbytes)  # a full tmpfs fails here, not with SIGBUS on a later write
        buf = mmap.mmap(fd, nbytes)
    except OSError:
        _unlink(path)
        return np.empty(shape, dtype)
    finally:
        os.close(fd)
    _FILES[buf] = path
    weakref.finalize(buf, _unlink, path)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def file_of(arr: np.ndarray) -> str | None:
    """The /dev/shm file an array from `shared_empty` fills (None for any other array, views included)."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or base not in _FILES or not arr.flags.c_contiguous or arr.nbytes != len(base):
        return None  # (a view of part of a file is not the file)
    return _FILES[base] if arr.ctypes.data == np.frombuffer(base, np.uint8).ctypes.data else None


def _open(path: str, dtype: str, shape: list) -> np.ndarray:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"the shared-memory file {path} of a step's partials is missing: the workers of "
                                "this host do not share /dev/shm as the fit's probe found; set "
                                "FLASHKM_SAME_HOST_SHM=0 on the workers to send partials over the network") from None
    try:  # copy-on-write: writable, as torch wants it, and never changes the producer's file
        buf = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def dump(arrays: dict, context) -> tuple[dict, list]:
    """A Dask serialisation of named arrays: the file's name for an array from `shared_empty` when the peer
    shares this host, else a frame each."""
    shm = ENABLED and same_host(context)
    header, frames = {}, []
    for name, arr in arrays.items():
        entry = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        path = file_of(arr) if shm else None
        if path is None:
            entry["frame"] = len(frames)
            frames.append(np.ascontiguousarray(arr).data.cast("B") if arr.nbytes else b"")
        else:
            entry["path"] = path
        header[name] = entry
    return header, frames


def load(header: dict, frames: list, names) -> dict:
    out = {}
    for name in names:
        e = header[name]
        if "path" in e:
            out[name] = _open(e["path"], e["dtype"], e["shape"])
        else:
            out[name] = np.frombuffer(frames[e["frame"]], dtype=e["dtype"]).reshape(e["shape"])
    return out


# ---------------------------------------------------------------------------------------------- per fit
_PROBES: dict = {}  # fit token -> this worker's marker (its file lives as long as the array)


def _mark(token: str, dask_worker=None) -> tuple:
    """(this worker's host, the name of a marker file it made, or None when it cannot write one)."""
    host = _host(dask_worker.address)
    marker = _PROBES[token] = shared_empty((MIN_BYTES,), np.uint8, f"probe-{token}")
    path = file_of(marker)
    return host, None if path is None else os.path.basename(path)


def _unmark(token: str) -> None:
    _PROBES.pop(token, None)


def _sees(marks: dict, dask_worker=None) -> bool:
    """Whether this worker can open the marker of every other worker with its IP (its host-mates): same
    /dev/shm, same permissions."""
    me = dask_worker.address
    host = marks[me][0]
    for address, (h, name) in marks.items():
        if address != me and h == host:
            try:
                os.close(os.open(os.path.join(ROOT, name), os.O_RDONLY))
            except OSError:
                return False
    return True


def usable(client, token: str) -> bool:
    """Probe once per fit: True when every worker can write a marker and opens the markers of its host-mates.
    Markers are removed before returning."""
    try:
        marks = client.run(_mark, token)
        if any(name is None for _, name in marks.values()):
            return False
        return all(client.run(_sees, marks, workers=list(marks)).values())
    except Exception:  # noqa: BLE001 - an optimisation only: the bytes go on the socket
        return False
    finally:
        client.run(_unmark, token, on_error="ignore")


def sweep(token: str) -> int:
    """Remove this host's files of a fit (run on every worker when the fit ends); returns how many."""
    prefix = _prefix(token)
    gone = 0
    try:
        names = os.listdir(ROOT)
    except OSError:
        return 0
    for name in names:
        path = os.path.join(ROOT, name)
        if path.startswith(prefix):
            _unlink(path)
            gone += 1
    return gone
