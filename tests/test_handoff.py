"""Same-host hand-off of step partials through /dev/shm: the file goes only to a same-host peer, bytes otherwise."""
from __future__ import annotations

import os

import numpy as np
import pytest
from distributed.protocol import deserialize, serialize

from flashkm_dist.dask import handoff
from flashkm_dist.dask.worker import StepResult

pytestmark = pytest.mark.skipif(not os.path.isdir(handoff.ROOT), reason="no /dev/shm on this machine")

SAME = {"sender": {"address": "tcp://127.0.0.1:4001"}, "recipient": {"address": "tcp://127.0.0.1:4002"}}
OTHER = {"sender": {"address": "tcp://10.0.0.1:4001"}, "recipient": {"address": "tcp://10.0.0.2:4002"}}


def shared(shape=(512, 128), token="test-token"):
    a = handoff.shared_empty(shape, np.int64, token)
    a[...] = np.arange(a.size, dtype=np.int64).reshape(shape) * 7 - 3
    return a


def test_a_same_host_peer_maps_the_file_and_the_file_goes_with_the_producer():
    a = shared()
    path = handoff.file_of(a)
    assert path is not None and path.startswith(handoff.ROOT) and os.path.exists(path)
    header, frames = handoff.dump({"sums": a}, SAME)
    assert frames == [] and header["sums"]["path"] == path
    got = handoff.load(header, frames, ["sums"])["sums"]
    np.testing.assert_array_equal(got, a)
    got[0, 0] = 123456  # copy-on-write: the receiver may write, the producer's file does not change
    assert a[0, 0] == -3
    expected = a.copy()
    del a
    assert not os.path.exists(path)
    expected[0, 0] = 123456
    np.testing.assert_array_equal(got, expected)  # (the mapping outlives the name)


@pytest.mark.parametrize("case", ["other host", "no comm", "plain array", "view", "small", "switched off"])
def test_everything_else_sends_the_bytes(case, monkeypatch):
    a = shared()
    arr, context = a, SAME
    if case == "other host":
        context = OTHER
    elif case == "no comm":  # e.g. a worker spilling to disk
        context = None
    elif case == "plain array":
        arr = np.array(a)
    elif case == "view":  # part of a file is not the file
        arr = a[1:]
    elif case == "small":
        arr = shared((4, 4))
    else:
        monkeypatch.setattr(handoff, "ENABLED", False)
    header, frames = handoff.dump({"sums": arr}, context)
    assert "path" not in header["sums"] and len(frames) == 1
    np.testing.assert_array_equal(handoff.load(header, frames, ["sums"])["sums"], arr)


def test_no_token_or_no_shared_memory_gives_a_plain_array(monkeypatch):
    assert handoff.file_of(handoff.shared_empty((512, 128), np.int64, None)) is None
    monkeypatch.setattr(handoff, "ROOT", "/nonexistent-flashkm-dir")
    a = handoff.shared_empty((512, 128), np.int64, "test-token")
    assert handoff.file_of(a) is None and a.shape == (512, 128)


def test_a_missing_file_is_a_clear_error():
    header = {"sums": {"dtype": "<i8", "shape": [2], "path": os.path.join(handoff.ROOT, "flashkm-none-x")}}
    with pytest.raises(FileNotFoundError, match="FLASHKM_SAME_HOST_SHM=0"):
        handoff.load(header, [], ["sums"])


def test_a_step_result_through_dasks_serialisation():
    """What a worker's comm does with a step result: the registered Dask serialiser, with the comm's context."""
    sums = shared()
    step = StepResult(sums, np.arange(8, dtype=np.int64).reshape(2, 4), np.array([5, -1]), 17, 0.25)
    for context, by_file in ((SAME, True), (OTHER, False)):
        header, frames = serialize(step, serializers=("dask", "pickle"), context=context)
        assert header["serializer"] == "dask"
        assert ("path" in header["sub-header"]["sums"]) == by_file
        got = deserialize(header, frames)
        for name in StepResult.ARRAYS:
            np.testing.assert_array_equal(getattr(got, name), getattr(step, name))
        assert (got.n_changed, got.seconds) == (17, 0.25)


def test_sweep_removes_only_the_fits_files():
    mine, other = shared(token="fit-a"), shared(token="fit-b")
    paths = handoff.file_of(mine), handoff.file_of(other)
    assert handoff.sweep("fit-a") == 1
    assert not os.path.exists(paths[0]) and os.path.exists(paths[1])
