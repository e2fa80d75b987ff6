"""Where an allreduce='nccl' iteration spends the time outside the engine's step, on one GPU, outside Dask.

    python benchmarks/collective_profile.py --out collective.json [--rows 16777216] [--k 8192] [--iters 30]

One process, a torch.distributed group of one rank (NCCL), a shard of resident fp16 rows in blocks as a Dask
worker holds them, iterated as `collective.run_loop` iterates (each iteration's next step queued before its
scalars are read). Per iteration: the wall time between two read-backs, the step's time on the device (its clock
stamps), their difference (the overhead the Dask benchmark reports for this path), and, from the device's clock,
the time from a step's end to the next step's start (the update, the copies, and any time the device waited for
the host). Medians after warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from provenance import provenance

from flashkm_dist.dask import collective, summed
from flashkm_dist.engine import numerics_for
from flashkm_dist.kernels import clock
from flashkm_dist.shard import Shard
from flashkm_dist.streaming import Block, Engine

WARMUP = 3


def _kept_stamps() -> list:
    """Every (2,) tensor of step stamps `collective._queue` makes, in order."""
    kept, stamp = [], clock.stamp

    def keep(out, index):
        if index == 0:
            kept.append(out)
        return stamp(out, index)

    clock.stamp = keep
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=1 << 24)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{collective.free_port()}", rank=0, world_size=1)
    gen = torch.Generator(device=dev).manual_seed(0)
    per = args.rows // args.blocks
    blocks = [Block(torch.randn(per, args.d, device=dev, generator=gen).to(torch.float16), key=i)
              for i in range(args.blocks)]
    starts = [j * per for j in range(args.blocks)]
    numerics = numerics_for(blocks[0].data, None, metric="euclidean")
    centers = blocks[0].data[:args.k].clone()
    shard = Shard(Engine(dev, dtype=torch.float16))
    graphed = summed.GraphedUpdate(numerics) if dev.type == "cuda" else None
    stamps = _kept_stamps()
    rows = []
    current = collective._queue(shard, blocks, centers, numerics, (0, 0), None, None, graphed)
    t0 = time.perf_counter()
    for i in range(args.iters):
        ahead = collective._queue(shard, blocks, current.new, numerics, (0, i + 1), (0, i), centers, graphed)
        s, new, _ = collective._finish(current, shard, blocks, starts, centers, numerics)
        now = time.perf_counter()
        step = s["slowest_worker_seconds"]
        rows.append({"iteration_ms": 1e3 * (now - t0), "step_ms": 1e3 * step, "overhead_ms": 1e3 * (now - t0 - step)})
        t0, current, centers = now, ahead, new
    collective._finish(current, shard, blocks, starts, centers, numerics)
    if stamps:
        ticks = [t.tolist() for t in stamps]
        for row, this, nxt in zip(rows, ticks, ticks[1:]):
            row["between_steps_ms"] = 1e-6 * (nxt[0] - this[1])
    steady = rows[WARMUP:]
    out = {**provenance(), "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "rows": args.rows, "blocks": args.blocks, "k": args.k, "d": args.d,
           "median": {k: statistics.median(r[k] for r in steady) for k in steady[0]}, "iterations": rows}
    print(json.dumps(out["median"], indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
