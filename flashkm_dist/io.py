"""Readers and writers for the distributed fit: files on disk as lazy Dask arrays, and results written back.

Sources (`open_array`), opened lazily: nothing is read but headers and metadata until a chunk is computed, and
then each chunk is read where its task runs (a worker), so the data never passes through the client:

- ``data.npy``: a NumPy file, memory-mapped per chunk;
- ``shards/``: a folder of ``.npy`` files (natural order: ``part-2`` before ``part-10``), stacked by rows;
- ``data.zarr``: a zarr array, or a group (``data.zarr:/path/to/array``, or the group's only 2-D array);
- ``data.h5:/dataset``: an HDF5 dataset (``.h5``, ``.hdf5``; the dataset may be left out when there is one).

Targets (`write_array`): ``out.npy`` (one file; each chunk's task writes its own rows) or ``out.zarr`` /
``out.zarr:/name`` (a zarr array whose chunks are the Dask chunks). Written in parallel where the chunks live;
with several nodes, the target must be on a filesystem they share.

Paths are the caller's (a shared filesystem on a cluster); readers pickle as a path plus a few numbers.
"""
from __future__ import annotations

import math
import os
import re
import uuid

import numpy as np

CHUNK_BYTES = 128 * 2**20  # default size of a Dask chunk (rows x features x itemsize), ~128 MiB
NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


class InputError(ValueError):
    """A problem with the user's files or paths (missing file, wrong dataset, unsupported format): reported to
    the user as a message, without a traceback."""


# ------------------------------------------------------------------------------------------------- sources
def split_source(source) -> tuple[str, str | None]:
    """``path`` or ``path:/inner/path`` into (path, inner or None). The longest prefix that exists is the path."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source, None
    for m in reversed([m.start() for m in re.finditer(":", source)]):
        path, inner = source[:m], source[m + 1:]
        if path and os.path.exists(path):
            inner = inner.strip("/")
            return path, inner or None
    path = source.split(":", 1)[0] if ":" in source and not os.path.exists(source) else source
    raise InputError(f"{path}: no such file or directory")


def detect_format(path: str) -> str:
    """'npy', 'npy-dir', 'zarr' or 'hdf5', from the content (suffixes only break ties)."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zarray", ".zgroup")):
            return "zarr"
        if any(name.endswith(".npy") for name in os.listdir(path)):
            return "npy-dir"
        if path.rstrip("/").endswith(".zarr"):
            return "zarr"
        raise InputError(f"{path}: a folder with neither a zarr store nor .npy files in it")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head == HDF5_MAGIC or path.lower().endswith(HDF5_SUFFIXES):
        return "hdf5"
    if path.endswith(".npy"):
        raise InputError(f"{path}: not a NumPy .npy file (bad header)")
    raise InputError(f"{path}: unknown format; expected .npy, a folder of .npy files, a zarr store or an HDF5 file")


def open_array(source, *, chunk_rows: int | None = None, min_chunks: int = 1, chunk_bytes: int = CHUNK_BYTES):
    """`source` (see the module docstring) as a lazy Dask array, chunked by rows (all columns in each chunk).

    `chunk_rows` fixes the rows per chunk. Otherwise chunks hold about `chunk_bytes`, are whole multiples of the
    storage chunks (zarr, chunked HDF5), and number at least `min_chunks` when the data has that many rows (give
    the number of workers, so that each one holds a part)."""
    path, inner = split_source(source)
    fmt = detect_format(path)
    if fmt == "npy":
        if inner is not None:
            raise InputError(f"{path} is a .npy file: it has no inner path (got '{inner}')")
        return _from_store(NpyFile(path), chunk_rows, min_chunks, chunk_bytes, name=f"npy-{_token(path)}")
    if fmt == "npy-dir":
        return _open_npy_dir(path, inner, chunk_rows, min_chunks, chunk_bytes)
    if fmt == "zarr":
        return _open_zarr(path, inner, chunk_rows, min_chunks, chunk_bytes)
    return _open_hdf5(path, inner, chunk_rows, min_chunks, chunk_bytes)


def describe(x) -> str:
    """'rows x features dtype, n chunks' for messages."""
    shape = " x ".join(f"{n:,}" for n in x.shape)
    return f"{shape} {x.dtype}, {x.numblocks[0]} chunk{'s' if x.numblocks[0] != 1 else ''}"


def _token(*parts) -> str:
    from dask.base import tokenize
    stats = []
    for p in parts:
        try:
            st = os.stat(p)
            stats.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
        except (OSError, TypeError):
            stats.append(p)
    return tokenize(*stats)


def _rows_per_chunk(n_rows: int, row_bytes: int, storage_rows: int, chunk_rows, min_chunks: int,
                    chunk_bytes: int) -> int:
    if chunk_rows is not None:
        if int(chunk_rows) < 1:
            raise InputError(f"chunk rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    storage_rows = max(1, int(storage_rows))
    rows = max(1, chunk_bytes // max(1, row_bytes))
    if min_chunks > 1 and n_rows >= min_chunks:
        rows = min(rows, math.ceil(n_rows / min_chunks))
    return max(storage_rows, rows // storage_rows * storage_rows) if storage_rows > 1 else max(1, rows)


def _from_store(store, chunk_rows, min_chunks, chunk_bytes, *, storage_rows: int = 1, name: str):
    import dask.array as da
    if len(store.shape) not in (1, 2):
        raise InputError(f"{store.label}: expected a 1-D or 2-D array, got shape {store.shape}")
    n = store.shape[0]
    row_bytes = store.dtype.itemsize * (store.shape[1] if len(store.shape) == 2 else 1)
    rows = _rows_per_chunk(n, row_bytes, storage_rows, chunk_rows, min_chunks, chunk_bytes)
    chunks = (rows,) + ((-1,) if len(store.shape) == 2 else ())
    return da.from_array(store, chunks=chunks, lock=False, asarray=True, fancy=False, name=name,
                         meta=np.empty((0,) * len(store.shape), dtype=store.dtype))


class NpyFile:
    """A .npy file as a lazy array: shape and dtype from the header; `x[rows]` maps the file and copies the rows.
    Pickles as its path (what a worker needs to read its chunks)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.label = path
        try:
            mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise InputError(f"{path}: cannot be memory-mapped ({err})") from None
        if not isinstance(mm, np.ndarray) or mm.dtype.hasobject:
            raise InputError(f"{path}: an array of numbers is needed, got dtype {getattr(mm, 'dtype', '?')}")
        self.shape, self.dtype, self.ndim = mm.shape, mm.dtype, mm.ndim
        del mm

    def __getitem__(self, key):
        mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        try:
            return np.ascontiguousarray(mm[key])
        finally:
            del mm

    def __len__(self):
        return self.shape[0]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _open_npy_dir(path, inner, chunk_rows, min_chunks, chunk_bytes):
    import dask.array as da
    if inner is not None:
        raise InputError(f"{path} is a folder of .npy files: it has no inner path (got '{inner}')")
    names = sorted((n for n in os.listdir(path) if n.endswith(".npy")), key=_natural_key)
    files = [NpyFile(os.path.join(path, n)) for n in names]
    first = files[0]
    for f in files[1:]:
        if f.shape[1:] != first.shape[1:] or f.dtype != first.dtype:
            raise InputError(f"{path}: the .npy shards disagree: {first.label} is {first.shape} {first.dtype}, "
                             f"{f.label} is {f.shape} {f.dtype} (all need the same columns and dtype)")
    n_total = sum(f.shape[0] for f in files)
    row_bytes = first.dtype.itemsize * (first.shape[1] if first.ndim == 2 else 1)
    rows = _rows_per_chunk(n_total, row_bytes, 1, chunk_rows, min_chunks, chunk_bytes)
    parts = [_from_store(f, rows, 1, chunk_bytes, name=f"npy-{_token(f.path)}") for f in files]
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)


# ------------------------------------------------------------------------------------------------- zarr
def _zarr():
    try:
        import zarr
    except ImportError:
        raise InputError("reading or writing zarr needs the 'zarr' package (pip install zarr)") from None
    return zarr


def _zarr_arrays(group, prefix=""):
    """Every array below a zarr group, as (path, array), depth first."""
    out = []
    for name, arr in sorted(group.arrays()):
        out.append((f"{prefix}{name}", arr))
    for name, sub in sorted(group.groups()):
        out.extend(_zarr_arrays(sub, f"{prefix}{name}/"))
    return out


def _open_zarr(path, inner, chunk_rows, min_chunks, chunk_bytes):
    import dask.array as da
    zarr = _zarr()
    try:
        node = zarr.open(path, mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds for a broken store
        raise InputError(f"{path}: cannot open as a zarr store ({type(err).__name__}: {err})") from None
    if inner is not None:
        if not hasattr(node, "arrays"):
            raise InputError(f"{path} is a zarr array, not a group: it has no inner path (got '{inner}')")
        try:
            node = node[inner]
        except KeyError:
            listed = ", ".join(f"/{p}" for p, _ in _zarr_arrays(node)) or "none"
            raise InputError(f"{path}: no array '/{inner}' in this zarr store (arrays: {listed})") from None
    where = path if inner is None else f"{path}:/{inner}"
    if hasattr(node, "arrays"):  # a group: its only array of 2 dimensions, if there is exactly one
        arrays = _zarr_arrays(node)
        two_d = [(p, a) for p, a in arrays if a.ndim == 2]
        if len(two_d) != 1:
            listed = ", ".join(f"/{p} {a.shape}" for p, a in arrays) or "none"
            raise InputError(f"{where} is a zarr group; name the array as {path}:/ARRAY (arrays: {listed})")
        sub, node = two_d[0]
        where = f"{path}:/{sub}" if inner is None else f"{where}/{sub}"
    if node.ndim not in (1, 2):
        raise InputError(f"{where}: expected a 1-D or 2-D array, got shape {node.shape}")
    n = node.shape[0]
    row_bytes = node.dtype.itemsize * (node.shape[1] if node.ndim == 2 else 1)
    rows = _rows_per_chunk(n, row_bytes, node.chunks[0], chunk_rows, min_chunks, chunk_bytes)
    chunks = (rows,) + ((-1,) if node.ndim == 2 else ())
    return da.from_zarr(node, chunks=chunks, name=f"zarr-{_token(path, inner)}")


# ------------------------------------------------------------------------------------------------- HDF5
def _h5py():
    try:
        import h5py
    except ImportError:
        raise InputError("reading HDF5 needs the 'h5py' package (pip install h5py)") from None
    return h5py


def _h5_datasets(group) -> list[str]:
    h5py = _h5py()
    names = []
    group.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


class H5Dataset:
    """An HDF5 dataset as a lazy array: `x[rows]` opens the file (read-only), reads the rows and closes it.
    Pickles as (path, dataset name)."""

    def __init__(self, path: str, name: str | None):
        h5py = _h5py()
        self.path = os.path.abspath(path)
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(f"{path}: cannot open as HDF5 ({err})") from None
        with f:
            datasets = _h5_datasets(f)
            if name is None:
                if len(datasets) != 1:
                    raise InputError(f"{path} holds {len(datasets)} datasets; name one as {path}:/DATASET "
                                     f"(datasets: {', '.join(datasets) or 'none'})")
                name = datasets[0]
            name = "/" + name.strip("/")
            obj = f.get(name)
            if obj is None or not isinstance(obj, h5py.Dataset):
                what = "is a group" if obj is not None else "does not exist"
                raise InputError(f"{path}: dataset '{name}' {what} (datasets: {', '.join(datasets) or 'none'})")
            if obj.dtype.kind not in "fiub":
                raise InputError(f"{path}:{name}: an array of numbers is needed, got dtype {obj.dtype}")
            self.shape, self.dtype, self.ndim = obj.shape, obj.dtype, obj.ndim
            self.storage_rows = obj.chunks[0] if obj.chunks else 1
        self.name = name
        self.label = f"{path}:{name}"

    def __getitem__(self, key):
        import h5py
        with h5py.File(self.path, "r") as f:
            return np.ascontiguousarray(f[self.name][key])

    def __len__(self):
        return self.shape[0]


def _open_hdf5(path, inner, chunk_rows, min_chunks, chunk_bytes):
    ds = H5Dataset(path, inner)
    return _from_store(ds, chunk_rows, min_chunks, chunk_bytes, storage_rows=ds.storage_rows,
                       name=f"h5-{_token(path, ds.name)}")


# ------------------------------------------------------------------------------------------------- targets
def check_target(target) -> tuple[str, str, str | None]:
    """Validate an output path before any work is done: (kind 'npy' or 'zarr', path, inner array or None)."""
    target = os.fspath(target)
    path, inner = target, None
    m = re.match(r"^(.*\.zarr):/?(.*)$", target)
    if m:
        path, inner = m.group(1), m.group(2).strip("/") or None
    if path.endswith(".npy"):
        kind = "npy"
    elif path.rstrip("/").endswith(".zarr"):
        kind = "zarr"
        _zarr()
    else:
        raise InputError(f"{target}: outputs are written as .npy or .zarr (optionally out.zarr:/array)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{target}: folder {folder} is not writable")
    return kind, path, inner


class NpyWriter:
    """Rows of an existing .npy file, written in place (memory-mapped) by whichever task holds them."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __setitem__(self, key, value):
        mm = np.load(self.path, mmap_mode="r+", allow_pickle=False)
        try:
            mm[key] = np.asarray(value)
            mm.flush()
        finally:
            del mm


def write_array(x, target) -> str:
    """Write the Dask array x to `target` (.npy, .zarr or .zarr:/name) where its chunks are computed; the zarr
    chunks are x's row chunks (made uniform first when they are not). Returns the path written."""
    import dask.array as da
    kind, path, inner = check_target(target)
    if any(np.isnan(c) for c in x.chunks[0]):
        x.compute_chunk_sizes()
    if kind == "npy":
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.npy")
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=x.dtype, shape=x.shape)
        del header  # the file now has its header and its full (sparse) size
        try:
            da.store(x, NpyWriter(tmp), lock=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path
    zarr = _zarr()
    rows = x.chunks[0]
    if len(set(rows[:-1])) > 1 or (len(rows) > 1 and rows[-1] > rows[0]):
        x = x.rechunk({0: max(rows)})
    chunks = tuple(max(1, c[0]) for c in x.chunks)
    try:
        z = zarr.open_array(store=path, path=inner or "", mode="w", shape=x.shape, chunks=chunks, dtype=x.dtype)
    except (ValueError, TypeError, OSError) as err:
        raise InputError(f"{target}: cannot create the zarr array ({err})") from None
    da.store(x, z, lock=False)
    return path if inner is None else f"{path}:/{inner}"
