"""Where one Lloyd iteration of gpu_check's timed rows spends its time, kernel by kernel and in order: the
graphed iteration's CUDA-event time, then one op-by-op iteration under the profiler as a timeline (each device
operation with its start, its length and the idle time before it), per-kernel totals, and the idle total. The
same for gpu_check's assign timing (flash_assign called back to back, rows prepared anew each call).

    python benchmarks/iteration_profile.py --out iteration.json [--cases 8M_1024_fp16,1M_8192_fp16]

Per-kernel totals (profile_kernels.py) leave out what a timeline shows: the small operations between the big
kernels and the device's idle time between them.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from flashkm_dist import graphed
from flashkm_dist.engine import backend_for, numerics_for
from flashkm_dist.kernels.assign import flash_assign
from flashkm_dist.streaming import Block, Engine
from gpu_check import DEV, blobs, cuda_ms, our_iteration
from profile_kernels import CASES, device_rows
from provenance import gpu_run
from stream_timeline import device_ops, gaps


def timeline(ops: list, stream) -> list:
    """[start ms, length ms, idle ms before it, name] of the operations of one stream, in order."""
    mine = sorted((s, e, n) for st, s, e, n in ops if st == stream)
    out, reach = [], mine[0][0]
    for start, end, name in mine:
        out.append([round((start - mine[0][0]) / 1e3, 4), round((end - start) / 1e3, 4),
                    round(max(0.0, start - reach) / 1e3, 4), name[:70]])
        reach = max(reach, end)
    return out


def profiled(fn, calls: int) -> dict:
    """Per-kernel totals, the idle summary and the compute stream's timeline of `calls` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ops = device_ops(prof)
    summary = gaps(ops, min_gap_us=5.0)
    return {"summary": summary, "kernels": device_rows(prof)[:25], "timeline": timeline(ops, summary["compute_stream"])}


def profile_case(name: str) -> dict:
    n, k, d, dtype = CASES[name]
    x = blobs(n, d, min(k, 4096), dtype, seed=4)  # gpu_check's rows and centroids
    c = x[torch.randperm(n, device=DEV)[:k]].clone()
    nm = numerics_for(x, None, metric="euclidean")
    out = {"shape": [n, k, d, str(dtype)]}
    iterate = graphed.GraphedIteration(Engine(DEV, dtype=x.dtype, backend=backend_for(DEV)), [Block(x)], nm)
    out["graphed_iter_ms"] = cuda_ms(lambda: our_iteration(iterate, c))
    graphed.ENABLED = False
    try:
        plain = graphed.GraphedIteration(Engine(DEV, dtype=x.dtype, backend=backend_for(DEV)), [Block(x)], nm)
        out["op_by_op_iter_ms"] = cuda_ms(lambda: our_iteration(plain, c))
        out.update(profiled(lambda: our_iteration(plain, c), 1))
    finally:
        graphed.ENABLED = True
    out["assign_ms"] = cuda_ms(lambda: flash_assign(x, c, shift=nm.shift))
    out["assign"] = profiled(lambda: flash_assign(x, c, shift=nm.shift), 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="8M_1024_fp16,1M_8192_fp16")
    args = ap.parse_args()
    result = gpu_run(DEV)
    for name in args.cases.split(","):
        result[name] = profile_case(name)
        r = result[name]
        print(name, "graphed", round(r["graphed_iter_ms"], 3), "op by op", round(r["op_by_op_iter_ms"], 3),
              "idle", r["summary"]["compute_idle_ms"], "assign", round(r["assign_ms"], 3), "assign idle (3 calls)",
              r["assign"]["summary"]["compute_idle_ms"], flush=True)
        for row in r["kernels"][:14]:
            print("   ", row)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
