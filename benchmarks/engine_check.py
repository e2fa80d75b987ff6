"""Engine check on one GPU: host-pinned data streamed in chunks, with and without the device cache, against
flash-kmeans' `kmeans_largeN` on the same data in the same process.

    python benchmarks/engine_check.py --out engine.json [--log2n 24] [--k 8192] [--d 128]

Checks that the partials are bitwise equal whatever the cache and chunk sizes (and equal to one device-resident
block), then times Lloyd steps: streaming only, the first cached step and later cached steps, the H2D bandwidth
of this host measured in the same run, the copy time hidden behind compute, and the peak device memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

from flashkm_dist.engine import numerics_for
from provenance import provenance
from timing import seconds
from flashkm_dist.kernels.fixed_point import FixedPointScale
from flashkm_dist import streaming
from flashkm_dist.streaming import Block, Engine

DEV = torch.device("cuda")
STEP_ROWS = 1 << 22  # rows made or scanned at a time on the GPU


def h2d_gbps(x):
    chunk = x[: min(x.shape[0], (1 << 30) // (x.shape[1] * x.element_size()))]
    dev = torch.empty(chunk.shape, dtype=chunk.dtype, device=DEV)
    secs = statistics.median(seconds(lambda: dev.copy_(chunk, non_blocking=True), 5))
    return chunk.numel() * chunk.element_size() / secs / 1e9


def host_blobs(n: int, k: int, d: int):
    """n fp32 blobs round k centres (randn * 4, unit noise) in page-locked host memory, made on the GPU in pieces,
    and k initial centres (random rows, on the GPU)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    centers = torch.randn(k, d, generator=g, device=DEV) * 4
    # Page-locked in place (cudaHostRegister): the pinned allocator would round 92 GB up to 128 GB.
    x = torch.empty((n, d), dtype=torch.float32)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(x.data_ptr(), x.numel() * x.element_size(), 0))
    for s in range(0, n, STEP_ROWS):
        m = min(STEP_ROWS, n - s)
        x[s:s + m] = (centers[torch.randint(0, k, (m,), generator=g, device=DEV)]
                      + torch.randn(m, d, generator=g, device=DEV)).cpu()
    return x, x[torch.randperm(n, generator=g, device=DEV)[:k].cpu()].to(DEV)


def host_numerics(x: torch.Tensor):
    """The fit's shift and tolerance from a sample; the fixed-point grids from a bound on every row (max |x|)."""
    n, d = x.shape
    max_abs = max(float(x[s:s + STEP_ROWS].abs().max()) for s in range(0, n, STEP_ROWS))
    return dataclasses.replace(numerics_for(x[:1 << 20].to(DEV), None, metric="euclidean"),
                               scale=FixedPointScale.from_bounds(max_abs, 1.0, 2.0 * d * (2.0 * max_abs) ** 2))


def quarters(x: torch.Tensor) -> list:
    quarter = -(-x.shape[0] // 4)
    return [Block(x[i:i + quarter], key=i) for i in range(0, x.shape[0], quarter)]


def flash_largeN_iter_s(x: torch.Tensor, init: torch.Tensor) -> float:
    """flash-kmeans' `kmeans_largeN` seconds per iteration on the same host rows: (3 iterations - 1) / 2."""
    from flash_kmeans import kmeans_largeN
    k = init.shape[0]
    kmeans_largeN(x, k, max_iters=1, init_centroids=init.clone(), device=DEV)  # warm-up / compile
    one = statistics.median(seconds(lambda: kmeans_largeN(x, k, max_iters=1, init_centroids=init.clone(),
                                                        device=DEV), 2))
    three = statistics.median(seconds(lambda: kmeans_largeN(x, k, max_iters=3, init_centroids=init.clone(),
                                                          device=DEV), 2))
    return (three - one) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--n", type=int, default=None, help="rows (overrides --log2n), e.g. 180000000 on an H100")
    args = ap.parse_args()
    n, k, d = args.n or 1 << args.log2n, args.k, args.d
    x, init = host_blobs(n, k, d)
    result = {**provenance(), "device": torch.cuda.get_device_name(), "n": n, "k": k, "d": d, "dtype": "float32",
              "host_pinned": bool(x.is_pinned()),
              "host_bytes": x.numel() * 4, "h2d_GBps": h2d_gbps(x)}
    result["pcie_floor_s"] = result["host_bytes"] / result["h2d_GBps"] / 1e9

    nm = host_numerics(x)
    blocks = quarters(x)

    streamer = Engine(DEV, cache_bytes=0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    first = streamer.step(blocks, init, nm)
    result["streaming_step_s"] = statistics.median(seconds(lambda: streamer.step(blocks, init, nm), args.iters))
    result["streaming_peak_device_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    result["streaming_peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2 ** 30  # (with allocator cache)

    cached = Engine(DEV, chunk_rows=1 << 19)
    torch.cuda.reset_peak_memory_stats()
    result["cached_first_step_s"] = seconds(lambda: cached.step(blocks, init, nm), 1)[0]
    result["cached_step_s"] = statistics.median(seconds(lambda: cached.step(blocks, init, nm), args.iters))
    result["cached_peak_device_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    cached_bytes = sum(t.numel() * t.element_size() for t in cached._cache.values())  # (rows the cache holds)
    result["cache_GiB"] = cached_bytes / 2 ** 30
    result["cache_reserved_GiB"] = cached._cache_used / 2 ** 30  # (with their labels and prepared rows)
    result["cache_keeps_prepared_rows"] = bool(cached._prepare_cached)
    result["uncached_floor_s"] = max(0, result["host_bytes"] - cached_bytes) / result["h2d_GBps"] / 1e9
    again = cached.step(blocks, init, nm)
    result["bitwise_equal_cache_vs_streaming"] = bool(torch.equal(again.partials.sums, first.partials.sums)
                                                      and torch.equal(again.inertia, first.inertia))
    all_cached = cached_bytes >= result["host_bytes"]
    cached = None  # (its cache given back)
    torch.cuda.empty_cache()
    if all_cached:
        # the streamed step's kernel work without its copies: every row cached, but served in the streamed
        # chunks and prepared afresh (the cached step above does less work per row than a streamed one)
        plain = Engine(DEV, chunk_rows=1 << 19)
        plain._prepare_cached = False
        factor, streaming.CACHED_CHUNK_FACTOR = streaming.CACHED_CHUNK_FACTOR, 1
        try:
            plain.step(blocks, init, nm)
            compute_only = statistics.median(seconds(lambda: plain.step(blocks, init, nm), args.iters))
        finally:
            streaming.CACHED_CHUNK_FACTOR = factor
        plain = None
        torch.cuda.empty_cache()
        copy = result["pcie_floor_s"]
        hidden = max(0.0, compute_only + copy - result["streaming_step_s"])
        result["streamed_chunks_compute_s"] = compute_only
        result["overlap_efficiency"] = min(1.0, hidden / copy)  # (copy time hidden / copy time)
        result["overlap_of_shorter"] = min(1.0, hidden / min(copy, compute_only))  # (1: the shorter fully hidden)

    try:
        result["flash_largeN_iter_s"] = flash_largeN_iter_s(x, init)
        result["cached_vs_flash"] = result["cached_step_s"] / result["flash_largeN_iter_s"]
    except Exception as err:
        result["flash_error"] = repr(err)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
