"""The device half of a Lloyd iteration over rows that stay on one GPU, replayed as one CUDA graph.

Why: once no kernel waits for the host, what is left between two iterations is the host queuing some eighty
launches (the step's small kernels and the update on K x D values) after each read-back, while the device idles:
about 0.6 ms of a 6.5 ms iteration at N=1M, K=8192, D=128 on an H200, a quarter of one at D=64. A graph queues
them in one launch. The same kernels on the same addresses and values: the same bits as launching them one by one.

Only for rows already on the device (nothing streamed, no host copies inside the graph). Captured after an
op-by-op iteration (so the kernels are compiled, and the engine's label buffers, whose addresses the graph keeps
writing to, exist); given up for good if capture fails.
"""
from __future__ import annotations

import dataclasses
import time
import traceback

import torch

from flashkm_dist.lloyd import Iteration, finish_iteration, iteration_on_device
from flashkm_dist.streaming import _as_tensor

ENABLED = True  # (benchmarks switch it off to measure what the graph saves)
SLOW_ITERATION_S = 0.05  # iterations longer than this gain nothing visible from a graph: not worth its memory
REFUSED: list = []  # why captures in this process were refused, and where (benchmarks report it)


def _described(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)[-8:]
    return f"{err!r:.300} at " + " / ".join(f"{f.name}:{f.lineno}" for f in frames)


class Replay:
    """fn(*inputs) (device tensors in, device tensors out) captured once as a CUDA graph, then replayed on new
    input values of the same shapes. Outputs are the graph's own tensors: the next replay overwrites them.
    `failed` once a capture was refused (the caller goes on op by op)."""

    def __init__(self, fn, device: torch.device, keep_free_bytes: int = 0):
        self.fn, self.device, self.keep_free_bytes = fn, device, keep_free_bytes
        self.graph, self.failed = None, not ENABLED

    def __call__(self, *inputs):
        if self.graph is None:
            self._capture(inputs)
            if self.graph is None:
                return None
        else:
            for static, value in zip(self.inputs, inputs):
                static.copy_(value)
        self.graph.replay()
        return self.out

    def _capture(self, inputs) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device):
                self.inputs = [t.to(self.device, copy=True) for t in inputs]
                torch.cuda.synchronize()
                if torch.cuda.mem_get_info()[0] < self.keep_free_bytes:  # the buffers the graph holds on to
                    torch.cuda.empty_cache()  # (op-by-op iterations' cached blocks: the graph's pool may reuse them)
                    if torch.cuda.mem_get_info()[0] < self.keep_free_bytes:
                        raise torch.OutOfMemoryError("too little free device memory to keep a graph")
                # thread_local: calls that other threads make meanwhile (a Dask worker's event loop copying a
                # peer's buffer and waiting for it) neither fail nor break this capture
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.out = self.fn(*self.inputs)
        except Exception as err:  # noqa: BLE001 - anything a capture refuses: op by op from now on
            REFUSED.append(_described(err) + ("" if err.__context__ is None else  # (what broke the capture)
                                              " <- during: " + _described(err.__context__)))
            del REFUSED[:-20]  # (the latest are enough)
            self.failed, self.out, self.inputs = True, None, None
            torch.cuda.synchronize(self.device)
            return
        self.graph = graph


def resident(device: torch.device, tensors) -> bool:
    """Whether a graph may serve: a CUDA device and every tensor (None: absent) already on it."""
    device = torch.device(device)
    return device.type == "cuda" and all(t is None or torch.as_tensor(t).device == device for t in tensors)


class GraphedIteration:
    """`lloyd.lloyd_iteration` for one run: op by op until a quick iteration has run, then replayed."""

    def __init__(self, engine, blocks, numerics):
        self.engine, self.blocks, self.numerics = engine, blocks, engine.local(numerics)
        data = [_as_tensor(b.data) for b in blocks]
        self.replay = Replay(lambda centers: iteration_on_device(engine, blocks, centers, self.numerics),
                             engine.device, 2 * sum(t.numel() * t.element_size() for t in data))
        self.replay.failed |= not (blocks and resident(engine.device, data + [b.weights for b in blocks]))
        self.replay.failed |= engine._bounded(numerics)  # (bounded steps wait for the device inside the step)
        self.ready, self.label_buffers = False, None

    @property
    def graph(self):
        return self.replay.graph

    def __call__(self, centers: torch.Tensor) -> Iteration:
        if self.graph is not None and not self._same_label_buffers():  # (the engine started a new run)
            self.replay.graph, self.replay.failed = None, True
        if (self.ready and not self.replay.failed) or self.graph is not None:
            out = self.replay(centers)
            if out is not None:
                self.label_buffers = self.label_buffers or self.engine.label_buffers()
                step, new, packed = out
                it = finish_iteration(self.engine, self.blocks, centers, self.numerics,
                                      dataclasses.replace(step, n_changed=None), new, packed)
                # (the next replay overwrites the graph's outputs: the caller keeps a copy of the centres)
                return dataclasses.replace(it, centers=it.centers.clone() if it.centers is new else it.centers)
        start = time.perf_counter()
        it = finish_iteration(self.engine, self.blocks, centers, self.numerics,
                              *iteration_on_device(self.engine, self.blocks, centers, self.numerics))
        # capture after an op-by-op iteration that was quick: the kernels are compiled, and launching is a
        # visible share of the time
        self.ready = time.perf_counter() - start < SLOW_ITERATION_S
        return it

    def _same_label_buffers(self) -> bool:
        now = self.engine.label_buffers()
        return now.keys() == self.label_buffers.keys() and all(now[k] is v for k, v in self.label_buffers.items())
