"""What the launch-shape sweeps (class_sweep, finish_sweep, stream_variants) share: the prepared operands of a
shape, one variant measured in its own try (a variant that fails to build or run is recorded, not fatal), and
the loop over shapes that writes the result after each (a run cut short keeps what it measured)."""
from __future__ import annotations

import argparse
import json
import statistics
import traceback

import torch

import gpu_check as G
from provenance import gpu_run
from flashkm_dist.engine import numerics_for
from flashkm_dist.kernels import assign as A


def prepared(n: int, k: int, d: int):
    """fp16 blobs, k of their rows as centroids, and FlashAssign's centroid side for them (`assign._Prepared`)."""
    x = G.blobs(n, d, min(k, 4096), torch.float16, seed=4)
    c = x[torch.randperm(n, device=G.DEV)[:k]].clone()
    return A._prepare(x[None], c[None], "euclidean", numerics_for(x, None, metric="euclidean").shift)


def measured(row: dict, out: dict, measure) -> None:
    """measure(out) fills out; its traceback instead if it raises. Appended to the row's variants and printed."""
    try:
        measure(out)
    except Exception:
        out["error"] = traceback.format_exc()[-2000:]
    row["variants"].append(out)
    print(json.dumps(out), flush=True)


def timed_in_turns(runs, rounds: int, reps: int, key: str = "ms") -> None:
    """Time each (out, fn) of `runs` in turns, `rounds` times (CUDA events, median of `reps` calls each round):
    out["rounds_ms"] gets every round and out[key] their median. Taking turns matters because the GPU's speed
    drifts over a run by more than the variants differ."""
    for out, _ in runs:
        out["rounds_ms"] = []
    for _ in range(rounds):
        for out, fn in runs:
            out["rounds_ms"].append(G.cuda_ms(fn, reps=reps))
    for out, _ in runs:
        out[key] = statistics.median(out["rounds_ms"])


def run_shapes(result: dict, shapes, run_shape, path: str) -> None:
    """run_shape(n, k, d) for every shape into result["shapes"], the JSON rewritten after each."""
    result.setdefault("shapes", [])
    for n, k, d in shapes:
        try:
            row = run_shape(n, k, d)
        except Exception:
            row = {"n": n, "k": k, "d": d, "error": traceback.format_exc()}
        result["shapes"].append(row)
        print(json.dumps({key: v for key, v in row.items() if key != "variants"}), flush=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def sweep_main(shapes, run_shape, streamed=None) -> None:
    """The command line of a sweep: --out, and with `streamed` = (shapes, run_shape) a --streamed flag that runs
    those instead (shapes where D is streamed); every shape through `run_shapes`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    if streamed:
        ap.add_argument("--streamed", action="store_true", help="the shapes where D is streamed instead")
    args = ap.parse_args()
    if streamed and args.streamed:
        shapes, run_shape = streamed
    run_shapes(gpu_run(G.DEV), shapes, run_shape, args.out)
