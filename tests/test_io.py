"""Readers and writers of `flashkm_dist.io`: every format opens lazily to the right values and chunks, and errors
name the problem. (The CLI tests fit and predict through each format on a cluster.)"""
from __future__ import annotations

import pickle

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import zarr

from flashkm_dist import io


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    np.save(root / "x.npy", data)
    np.save(root / "fortran.npy", np.asfortranarray(data))
    shards = root / "shards"
    shards.mkdir()
    for name, rows in [("part-2.npy", slice(0, 150)), ("part-10.npy", slice(150, 1000))]:  # natural order
        np.save(shards / name, data[rows])
    g = zarr.open_group(str(root / "store.zarr"), mode="w")
    g.create_array("features/x", shape=data.shape, chunks=(64, 6), dtype=data.dtype)[:] = data
    g.create_array("ids", shape=(1000,), chunks=(100,), dtype=np.int64)[:] = np.arange(1000)
    arr = zarr.open_array(str(root / "plain.zarr"), mode="w", shape=data.shape, chunks=(300, 3), dtype=data.dtype)
    arr[:] = data
    with h5py.File(root / "d.h5", "w") as f:
        f.create_dataset("grp/x", data=data, chunks=(50, 6))
        f["grp/w"] = np.ones(1000)
    with h5py.File(root / "one.hdf5", "w") as f:
        f["only"] = data
    return root


def _no_data_in_graph(x) -> bool:
    """The graph pickles to a few KiB: no chunk of data rides in it (readers hold paths, not arrays)."""
    return len(pickle.dumps(dict(x.__dask_graph__()))) < 16_384


@pytest.mark.parametrize("source, storage_rows", [
    ("x.npy", 1), ("fortran.npy", 1), ("shards", 1), ("store.zarr:/features/x", 64), ("store.zarr/features/x", 64),
    ("store.zarr", 64), ("plain.zarr", 300), ("d.h5:/grp/x", 50), ("d.h5:grp/x", 50), ("one.hdf5", 1)])
def test_every_format_opens_lazily_to_the_same_rows(files, data, source, storage_rows):
    x = io.open_array(str(files / source), min_chunks=3)
    assert x.shape == data.shape and x.dtype == data.dtype and x.numblocks == (x.numblocks[0], 1)
    assert x.numblocks[0] >= 3
    assert _no_data_in_graph(x)
    inner = x.chunks[0][:-1] if source != "shards" else ()
    assert all(c % storage_rows == 0 for c in inner), x.chunks  # whole storage chunks per Dask chunk
    with dask.config.set(scheduler="synchronous"):
        got = x.compute()
    np.testing.assert_array_equal(got, data)
    assert got.flags.c_contiguous


def test_chunk_rows_and_chunk_bytes(files, data):
    assert io.open_array(str(files / "x.npy"), chunk_rows=128).chunks[0] == (128,) * 7 + (104,)
    assert io.open_array(str(files / "x.npy")).numblocks[0] == 1  # 24 KB: one chunk of the default 128 MiB
    assert io.open_array(str(files / "x.npy"), chunk_bytes=2400).chunks[0][0] == 100  # 24 bytes a row
    shards = io.open_array(str(files / "shards"), chunk_rows=100)
    assert shards.chunks[0] == (100, 50) + (100,) * 8 + (50,)  # chunks never straddle two files
    z = io.open_array(str(files / "store.zarr:/features/x"), chunk_bytes=64 * 24 * 3 + 5)
    assert z.chunks[0][0] == 192  # a multiple of the storage chunk
    with pytest.raises(io.InputError, match="chunk rows"):
        io.open_array(str(files / "x.npy"), chunk_rows=0)


def test_one_dimensional_arrays_open_too(files):
    w = io.open_array(str(files / "d.h5:/grp/w"))
    assert w.shape == (1000,) and float(w.sum().compute()) == 1000.0
    ids = io.open_array(str(files / "store.zarr:/ids"), chunk_rows=250)
    assert ids.chunks == ((250,) * 4,)
    np.testing.assert_array_equal(ids.compute(), np.arange(1000))


@pytest.mark.parametrize("source, message", [
    ("missing.npy", "missing.npy: no such file or directory"),
    ("missing.h5:/x", "missing.h5: no such file or directory"),
    ("d.h5", "holds 2 datasets; name one as .*d.h5:/DATASET .*/grp/w, /grp/x"),
    ("d.h5:/grp/nope", "dataset '/grp/nope' does not exist .*datasets: /grp/w, /grp/x"),
    ("d.h5:/grp", "dataset '/grp' is a group"),
    ("store.zarr:/features/nope", "no array '/features/nope' in this zarr store .*arrays: /ids, /features/x"),
    ("x.npy:/x", "is a .npy file: it has no inner path"),
    ("plain.zarr:/x", "is a zarr array, not a group"),
    ("notes.txt", "unknown format"),
    ("empty", "neither a zarr store nor .npy files"),
    ("bad", "the .npy shards disagree"),
])
def test_errors_name_the_problem(files, source, message):
    (files / "notes.txt").write_text("hello")
    (files / "empty").mkdir(exist_ok=True)
    (files / "bad").mkdir(exist_ok=True)
    np.save(files / "bad" / "a.npy", np.zeros((3, 2)))
    np.save(files / "bad" / "b.npy", np.zeros((3, 4)))
    with pytest.raises(io.InputError, match=message):
        io.open_array(str(files / source))


def test_a_group_with_two_matrices_needs_a_name(tmp_path):
    g = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    g.create_array("a", shape=(4, 2), dtype="f4")
    g.create_array("b", shape=(4, 3), dtype="f4")
    with pytest.raises(io.InputError, match=r"is a zarr group; name the array as .*two.zarr:/ARRAY"):
        io.open_array(str(tmp_path / "two.zarr"))
    assert io.open_array(str(tmp_path / "two.zarr:/b")).shape == (4, 3)


@pytest.mark.parametrize("target", ["labels.npy", "labels.zarr", "out.zarr:/run1/labels"])
def test_written_arrays_read_back_with_the_dask_chunks(tmp_path, target):
    labels = da.from_array(np.arange(1000, dtype=np.int64) % 7, chunks=300)
    where = io.write_array(labels, str(tmp_path / target))
    back = io.open_array(where)
    np.testing.assert_array_equal(back.compute(), labels.compute())
    if "zarr" in target:
        path, _, inner = where.partition(":/")
        node = zarr.open(path, mode="r")
        node = node[inner] if inner else node
        assert node.chunks == (300,)  # one zarr chunk per Dask chunk: each task writes its own
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_irregular_chunks_are_made_uniform_for_zarr_and_kept_for_npy(tmp_path):
    x = da.concatenate([da.arange(150, chunks=150), da.arange(850, chunks=400)])
    assert x.chunks[0] == (150, 400, 400, 50)
    io.write_array(x, str(tmp_path / "a.zarr"))
    io.write_array(x, str(tmp_path / "a.npy"))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:], x.compute())
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), x.compute())


def test_writing_two_dimensional_results(tmp_path, data):
    x = da.from_array(data, chunks=(250, 6))
    io.write_array(x, str(tmp_path / "d.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), data)


@pytest.mark.parametrize("target, message", [("labels.csv", "written as .npy or .zarr"),
                                             ("no/such/dir/labels.npy", "does not exist")])
def test_bad_targets_are_refused_before_any_work(tmp_path, target, message):
    with pytest.raises(io.InputError, match=message):
        io.check_target(str(tmp_path / target))
