"""Where the Dask path's overhead goes: the critical path of an iteration, from timestamps taken in the workers.

`install(client)` wraps, in every worker process, the step and reduce tasks and their phases (the engine's step,
the hand-over of the partials to the host, the reduction's sum and update, the device synchronised at the phase
ends) so that each call leaves (kind, start, end) on a monotonic clock the processes of one host share.
`segments(client)` fetches them and splits every steady-state iteration into:
  in_ms        last step's end -> the reduce task starts (scheduler hop, partials' transfer, deserialisation)
  combine_ms   the partials to the device and summed          finalize_ms  the Lloyd update
  reduce_ms    the whole reduce task                          out_ms       reduce's end -> the last next step starts
  step_head_ms step task start -> engine start (centres in)  step_tail_ms engine end -> step task end (partials out)
`chained_segments(client)` does the same for allreduce='chained' (one task per worker and iteration):
  hop_ms       last engine end of the iteration before -> the last worker receives its next task (scheduler hop)
  fetch_ms     task received -> task starts (the other workers' partials fetched), slowest worker
  update_ms    the update from every worker's partials, inside the task (device synchronised), slowest worker
  head_ms      task start -> engine start, slowest worker      gap_ms  last engine end -> last engine start
  tail_ms      engine end -> task end (partials out), slowest worker
`collective_segments(client)` splits allreduce='nccl' iterations (rank 0): the engine's step, the all-reduce and
the update (each device-synchronised), the rest of the iteration, and the gap to the next one.
A development tool used by `dask_scaling.py --timeline`; it changes nothing the fit computes.
"""
from __future__ import annotations

import statistics
import time

WARMUP = 2


def _wrap_in_worker(dask_worker=None):  # noqa: C901 - one wrapper per instrumented function
    import functools

    import torch

    from flashkm_dist import shard as shard_mod
    from flashkm_dist.dask import worker
    from flashkm_dist.kernels import reference

    log = worker.__dict__.setdefault("_TIMELINE", [])
    if worker.__dict__.get("_TIMELINE_WRAPPED"):
        log.clear()
        return 0

    def sync():  # (not inside a CUDA graph capture: it would break it, and the update would run op by op)
        if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
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

    def tagged(kind, fn):  # (kind, start, end, iteration) for chained steps
        @functools.wraps(fn)
        def inner(spec, numerics, ids, iteration, *args):
            t0 = time.perf_counter()
            out = fn(spec, numerics, ids, iteration, *args)
            log.append((kind, t0, time.perf_counter(), iteration))
            return out
        return inner

    w = dask_worker
    receive = w.handle_stimulus

    def handle_stimulus(*stims):  # when the scheduler's compute-task message for a step arrives
        for s in stims:
            if type(s).__name__ == "ComputeTaskEvent" and "-step-" in str(s.key):
                log.append(("recv", time.perf_counter(), time.perf_counter()))
        return receive(*stims)

    w.handle_stimulus = handle_stimulus
    from flashkm_dist.dask import collective, summed
    worker.chained_step = tagged("chained", worker.chained_step)
    worker._chained_update = timed("centres", worker._chained_update, synced=True)
    collective._iterate = timed("iterate", collective._iterate)
    collective.dist.all_reduce = timed("allreduce", collective.dist.all_reduce, synced=True)
    summed.GraphedUpdate.__call__ = timed("update", summed.GraphedUpdate.__call__, synced=True)
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


def _median_rows(rows: list) -> dict:
    rows = rows[WARMUP:] or rows
    if not rows:
        return {}
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"iterations": len(rows)}


def chained_segments(client) -> dict:
    """Median milliseconds of each segment of a chained fit's iterations (see the module docstring)."""
    per_worker = client.run(_fetch)
    tasks = {}  # iteration -> [(address, start, end, engine, recv, centres)]
    for address, recs in per_worker.items():
        recvs = sorted(r[1] for r in recs if r[0] == "recv")
        for r in recs:
            if r[0] != "chained":
                continue
            engine = _within(recs, "engine", r[1], r[2])
            centres = _within(recs, "centres", r[1], r[2])
            recv = max((t for t in recvs if t <= r[1]), default=r[1])
            if engine:
                tasks.setdefault(r[3], []).append((address, r[1], r[2], engine[-1], recv,
                                                   sum(c[2] - c[1] for c in centres)))
    rows = []
    for j in sorted(tasks):
        if j - 1 not in tasks or len(tasks[j]) != len(tasks[j - 1]):
            continue
        last_end = max(t[3][2] for t in tasks[j - 1])
        row = {"hop_ms": max(t[4] for t in tasks[j]) - last_end,
               "fetch_ms": max(t[1] - t[4] for t in tasks[j]),
               "update_ms": max(t[5] for t in tasks[j]),
               "head_ms": max(t[3][1] - t[1] for t in tasks[j]),
               "gap_ms": max(t[3][1] for t in tasks[j]) - last_end,
               "tail_ms": max(t[2] - t[3][2] for t in tasks[j - 1])}
        rows.append({k: 1e3 * v for k, v in row.items()})
    return _median_rows(rows)


def collective_segments(client) -> dict:
    """Median milliseconds of the parts of an allreduce='nccl' iteration on its first worker."""
    recs = min(client.run(_fetch).items())[1]
    iterations = sorted((r for r in recs if r[0] == "iterate"), key=lambda r: r[1])
    rows = []
    for it, nxt in zip(iterations, iterations[1:]):
        part = {kind: sum(r[2] - r[1] for r in _within(recs, kind, it[1], it[2]))
                for kind in ("engine", "allreduce", "update")}
        rows.append({f"{k}_ms": 1e3 * v for k, v in part.items()} | {
            "rest_ms": 1e3 * (it[2] - it[1] - sum(part.values())), "between_ms": 1e3 * (nxt[1] - it[2])})
    return _median_rows(rows)


def install(client) -> None:
    """Wrap the task functions in every worker (again: clears their logs)."""
    client.run(_wrap_in_worker)


def _within(records, kind, lo, hi, where=None):
    return [r for r in records if r[0] == kind and lo <= r[1] and r[2] <= hi and (where is None or r[3] == where)]


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
    return _median_rows(rows)
