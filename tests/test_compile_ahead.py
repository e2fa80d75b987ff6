"""Compile-ahead: inside `ahead()` a launch becomes a concurrent compile of the same kernel and arguments."""
import threading

import pytest

from flashkm_dist.kernels import compile_ahead
from flashkm_dist.kernels.config import launch


class FakeKernel:
    """Records launches and compiles (the thread each compile ran on)."""

    def __init__(self, fail=False):
        self.launched, self.compiled, self.fail = [], [], fail

    def __getitem__(self, grid):
        return lambda *args, **options: self.launched.append((grid, args, options))

    def warmup(self, *args, grid, **options):
        if self.fail:
            raise RuntimeError("compile error")
        self.compiled.append((grid, args, options, threading.get_ident()))
        return self

    def _init_handles(self):  # (what Triton's first launch does: load the module, build the launcher)
        self.loaded = threading.get_ident()


def test_launches_inside_are_compiled_with_the_same_arguments_not_launched():
    a, b = FakeKernel(), FakeKernel()
    with compile_ahead.ahead():
        assert compile_ahead.active()
        launch(a, (4, 1), 7, 8, num_warps=8, BLOCK=64)
        launch(b, (2,), 9, num_warps=4, num_stages=None, BLOCK=32)
        assert not a.compiled and not b.compiled  # (compiled at the block's end, all at once)
    assert not compile_ahead.active()
    assert a.launched == [] and b.launched == []
    assert [c[:3] for c in a.compiled] == [((4, 1), (7, 8), {"num_warps": 8, "num_stages": 2, "BLOCK": 64})]
    assert [c[:3] for c in b.compiled] == [((2,), (9,), {"num_warps": 4, "BLOCK": 32})]  # (Gluon: no stages)
    assert threading.get_ident() not in {a.compiled[0][3], b.compiled[0][3]}
    assert a.loaded == a.compiled[0][3] and b.loaded == b.compiled[0][3]  # loaded where compiled
    launch(a, (1,), 5, BLOCK=16)  # outside: an ordinary launch
    assert a.launched == [((1,), (5,), {"num_warps": 4, "num_stages": 2, "BLOCK": 16})]


def test_a_failed_compile_is_raised_at_the_end_of_the_block():
    with pytest.raises(RuntimeError, match="compile error"):
        with compile_ahead.ahead():
            launch(FakeKernel(fail=True), (1,), 1)
            launch(FakeKernel(), (1,), 2)
