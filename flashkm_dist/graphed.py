"""The device half of a Lloyd iteration over rows that stay on one GPU, replayed as one CUDA graph.

Why: once no kernel waits for the host, what is left between two iterations is the host queuing some eighty
launches (the step's small kernels and the update on K x D values) after each read-back, while the device idles:
about 0.6 ms of a 6.5 ms iteration at N=1M, K=8192, D=128 on an H200, a quarter of one at D=64. A graph queues
them in one launch. The same kernels on the same addresses and values: the same bits as launching them one by one.

Only for blocks already on the engine's device (nothing streamed, no host copies inside the graph). Captured after
an op-by-op iteration that took under SLOW_ITERATION_S (so the kernels are compiled and the engine's label buffers,
whose addresses the graph keeps writing to, exist); given up for good if capture fails.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from flashkm_dist.lloyd import Iteration, finish_iteration, iteration_on_device
from flashkm_dist.streaming import _as_tensor

ENABLED = True  # (benchmarks switch it off to measure what the graph saves)
SLOW_ITERATION_S = 0.05  # iterations longer than this gain nothing visible from a graph: not worth its memory


class GraphedIteration:
    """`lloyd.lloyd_iteration` for one run: launched op by op until `capture` succeeds, then replayed."""

    def __init__(self, engine, blocks, numerics):
        self.engine, self.blocks, self.numerics = engine, blocks, engine.local(numerics)
        self.graph, self.ready, self.failed = None, False, not (ENABLED and self.supported(engine, blocks))
        self.data_bytes = sum(_as_tensor(b.data).numel() * _as_tensor(b.data).element_size() for b in blocks)

    @staticmethod
    def supported(engine, blocks) -> bool:
        dev = engine.device
        if dev.type != "cuda" or not blocks:
            return False
        for b in blocks:
            data = _as_tensor(b.data)
            if data.device != dev or (b.weights is not None and torch.as_tensor(b.weights).device != dev):
                return False
        return True

    def __call__(self, centers: torch.Tensor) -> Iteration:
        if self.graph is not None and not self._same_label_buffers():  # (the engine started a new run)
            self.graph, self.out, self.failed = None, None, True
        if self.graph is None and self.ready:
            self._capture(centers)
        if self.graph is None:
            start = time.perf_counter()
            it = finish_iteration(self.engine, self.blocks, centers, self.numerics,
                                  *iteration_on_device(self.engine, self.blocks, centers, self.numerics))
            # capture after an op-by-op iteration that was quick: the kernels are compiled, and launching is a
            # visible share of the time
            self.ready = not self.failed and time.perf_counter() - start < SLOW_ITERATION_S
            return it
        self.centers.copy_(centers)
        self.graph.replay()
        step, new, packed = self.out
        it = finish_iteration(self.engine, self.blocks, centers, self.numerics,
                              dataclasses.replace(step, n_changed=None), new, packed)
        # (the next replay overwrites the graph's own outputs: the caller keeps copies)
        return dataclasses.replace(it, centers=it.centers.clone() if it.centers is new else it.centers)

    def _capture(self, centers: torch.Tensor) -> None:
        dev = self.engine.device
        self.centers = centers.to(dev, copy=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(dev):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # (the op-by-op iteration's cached blocks: the graph's pool reuses them)
                if torch.cuda.mem_get_info()[0] < 2 * self.data_bytes:  # the step's buffers, held by the graph
                    raise torch.OutOfMemoryError("too little free device memory to keep a graph")
                with torch.cuda.graph(graph):
                    self.out = iteration_on_device(self.engine, self.blocks, self.centers, self.numerics)
                self.label_buffers = self.engine.label_buffers()  # (kept alive: the graph writes to them)
        except Exception:  # noqa: BLE001 - anything a capture refuses: launch op by op from now on
            self.failed, self.out = True, None
            torch.cuda.synchronize(dev)
            return
        self.graph = graph

    def _same_label_buffers(self) -> bool:
        now = self.engine.label_buffers()
        return now.keys() == self.label_buffers.keys() and all(now[k] is v for k, v in self.label_buffers.items())
