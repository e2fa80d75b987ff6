"""Where the Dask path's overhead goes: the critical path of an iteration, from timestamps taken in the workers.

`install(client)` wraps, in every worker process, the step and reduce tasks and their phases (the engine's step,
the hand-over of the partials to the host, the reduction's sum and update, the device synchronised at the phase
ends) so that each call leaves (kind, start, end) on a monotonic clock the processes of one host share.
`segments(client)` fetches them and splits every steady-state iteration into:
  in_ms        last step's end -> the reduce task starts (scheduler hop, partials' transfer, deserialisation)
  combine_ms   the partials to the device and summed          finalize_ms  the Lloyd update
  reduce_ms    the whole reduce task                          out_ms       reduce's end -> the last next step starts
  step_head_ms step task start -> engine start (centres in)  step_tail_ms engine end -> step task end (partials out)
A development tool used by `dask_scaling.py --timeline`; it changes nothing the fit computes.
"""
from __future__ import annotations

import statistics
import time

WARMUP = 2


def _wrap_in_worker(dask_worker=None):
    import functools

    import torch

    from flashkm_dist import shard as shard_mod
    from flashkm_dist.dask import worker
    from flashkm_dist.kernels import reference

    log = worker.__dict__.setdefault("_TIMELINE", [])
    if worker.__dict__.get("_TIMELINE_WRAPPED"):
        log.clear()
        return 0

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(kind, fn, synced=False):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if synced:
                sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if synced:
                sync()
            log.append((kind, t0, time.perf_counter()))
            return out
        return inner

    worker.step = timed("step", worker.step)
    worker.reduce = timed("reduce", worker.reduce)
    worker._combined = timed("combine", worker._combined, synced=True)
    reference.finalize = timed("finalize", reference.finalize, synced=True)
    shard_mod.Shard.step = timed("engine", shard_mod.Shard.step)
    worker._TIMELINE_WRAPPED = True
    return 0


def _fetch(dask_worker=None) -> list:
    from flashkm_dist.dask import worker
    out = list(worker.__dict__.get("_TIMELINE", []))
    worker.__dict__.get("_TIMELINE", []).clear()
    return out


def install(client) -> None:
    """Wrap the task functions in every worker (again: clears their logs)."""
    client.run(_wrap_in_worker)


def _within(records, kind, lo, hi, where=None):
    return [r for r in records if r[0] == kind and lo <= r[1] and r[2] <= hi and where in (None, r[3])]


def segments(client) -> dict:
    """Median milliseconds of each segment over the iterations after the warm-up (see the module docstring)."""
    records = [(*r, address) for address, recs in client.run(_fetch).items() for r in recs]
    reduces = sorted((r for r in records if r[0] == "reduce"), key=lambda r: r[1])
    steps = sorted((r for r in records if r[0] == "step"), key=lambda r: r[1])
    rows = []
    for prev, red, nxt in zip(reduces, reduces[1:], reduces[2:]):
        before = [s for s in steps if prev[2] <= s[1] and s[2] <= red[1]]
        after = [s for s in steps if red[2] <= s[1] and s[2] <= nxt[1]]
        if not before or not after:
            continue
        row = {"in_ms": red[1] - max(s[2] for s in before), "reduce_ms": red[2] - red[1],
               "out_ms": max(s[1] for s in after) - red[2], "out_first_ms": min(s[1] for s in after) - red[2]}
        for kind in ("combine", "finalize"):
            inside = _within(records, kind, red[1], red[2])
            row[f"{kind}_ms"] = sum(r[2] - r[1] for r in inside)
        heads, tails = [], []
        for s in after:
            engine = _within(records, "engine", s[1], s[2], s[3])
            if engine:
                heads.append(engine[0][1] - s[1])
                tails.append(s[2] - engine[-1][2])
        row["step_head_ms"] = max(heads, default=0.0)
        row["step_tail_ms"] = max(tails, default=0.0)
        row["iteration_ms"] = nxt[2] - red[2]
        rows.append({k: 1e3 * v for k, v in row.items()})
    rows = rows[WARMUP:] or rows
    if not rows:
        return {}
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"iterations": len(rows)}
