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
  combine_ms   the part of it that sums the partials into one vector
  export_ms    the part of the tail that copies the partials into a buffer the peers open
  head_ms      task start -> engine start, slowest worker      gap_ms  last engine end -> last engine start
  tail_ms      engine end -> task end (partials out), slowest worker
  slowest_tail_ms, slowest_export_ms  the same for the worker whose engine ended last (the critical path)
`collective_segments(client)` splits allreduce='nccl' iterations (rank 0) into the host's queuing and its wait.
A step queued with its hand-over (`worker.queue_step`) counts as the engine from its queuing to the end of its wait.
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

    def tagged(kind, fn):  # (kind, start, end, iteration, task key) for chained steps
        from distributed import get_worker

        @functools.wraps(fn)
        def inner(spec, numerics, ids, iteration, *args):
            t0 = time.perf_counter()
            out = fn(spec, numerics, ids, iteration, *args)
            log.append((kind, t0, time.perf_counter(), iteration, str(get_worker().get_current_task())))
            return out
        return inner

    w = dask_worker
    receive = w.handle_stimulus

    def handle_stimulus(*stims):  # when the scheduler's compute-task message for a step arrives
        for s in stims:
            if type(s).__name__ == "ComputeTaskEvent" and "-step-" in str(s.key):
                log.append(("recv", time.perf_counter(), time.perf_counter(), str(s.key)))
        return receive(*stims)

    w.handle_stimulus = handle_stimulus
    _wrap_messaging(w, log)
    from flashkm_dist.dask import collective
    worker.chained_step = tagged("chained", worker.chained_step)
    worker._chained_update = timed("centres", worker._chained_update, synced=True)
    collective._queue = timed("queue", collective._queue)  # (no added device waits: they would undo the queuing)
    collective._finish = timed("finish", collective._finish)
    worker.step = timed("step", worker.step)
    worker.reduce = timed("reduce", worker.reduce)
    worker._combined = timed("combine", worker._combined, synced=True)
    worker.summed_vector = timed("combine", worker.summed_vector, synced=True)
    worker.handoff.export = timed("export", worker.handoff.export)  # (it waits for the device itself)
    reference.finalize = timed("finalize", reference.finalize, synced=True)
    shard_mod.Shard.step = timed("engine", shard_mod.Shard.step)
    queue, finish = worker.queue_step, worker.QueuedStep.finish

    def queued(*args, **kwargs):  # a queued step's engine runs from its queuing to the end of its one wait
        t0 = time.perf_counter()
        out = queue(*args, **kwargs)
        out._t0 = t0
        return out

    def finished(self):
        out = finish(self)
        log.append(("engine", getattr(self, "_t0", time.perf_counter()), time.perf_counter()))
        return out

    worker.queue_step, worker.QueuedStep.finish = queued, finished
    worker._TIMELINE_WRAPPED = True
    return 0


def _wrap_messaging(w, log: list) -> None:
    """Worker side of the hop between chained steps: when 'task-finished' is handed to the batched stream, each
    fetch of peers' results (gather_dep: start, end, keys), each result served to a peer, and each device
    hand-off taken (deserialised)."""
    import functools

    from flashkm_dist.dask import handoff

    _stamp_sends(w.batched_stream, "task-finished", "sent", log)
    gather = w.gather_dep

    async def gather_dep(peer, to_gather, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await gather(peer, to_gather, *args, **kwargs)
        finally:
            log.append(("gather", t0, time.perf_counter(), tuple(str(k) for k in to_gather)))

    w.gather_dep = gather_dep
    serve = w.handlers["get_data"]

    @functools.wraps(serve)
    async def get_data(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await serve(*args, **kwargs)
        finally:
            log.append(("served", t0, time.perf_counter(), None))

    w.handlers["get_data"] = get_data
    take = handoff.take

    def timed_take(payload):
        t0 = time.perf_counter()
        out = take(payload)
        log.append(("take", t0, time.perf_counter(), None))
        return out

    handoff.take = timed_take


def _stamp_sends(stream, op: str, kind: str, log: list) -> None:
    """Log (kind, now, now, key) whenever a step's `op` message is handed to the batched `stream`."""
    send = stream.send

    def sent(*msgs):
        for m in msgs:
            if isinstance(m, dict) and m.get("op") == op and "-step-" in str(m.get("key")):
                log.append((kind, time.perf_counter(), time.perf_counter(), str(m["key"])))
        return send(*msgs)

    stream.send = sent


def _wrap_scheduler(dask_scheduler=None) -> int:
    """Scheduler side: when a step's 'task-finished' arrives, and when a step's 'compute-task' is handed to a
    worker's batched stream."""
    log = dask_scheduler.__dict__.setdefault("_flashkm_timeline", [])
    log.clear()
    if dask_scheduler.__dict__.get("_flashkm_wrapped"):
        return 0
    finished = dask_scheduler.stream_handlers["task-finished"]

    def on_finished(*args, **kwargs):
        key = kwargs.get("key", args[0] if args else None)
        if "-step-" in str(key):
            log.append(("s_fin", time.perf_counter(), time.perf_counter(), str(key)))
        return finished(*args, **kwargs)

    dask_scheduler.stream_handlers["task-finished"] = on_finished

    for stream in dask_scheduler.stream_comms.values():
        _stamp_sends(stream, "compute-task", "s_send", log)
    dask_scheduler._flashkm_wrapped = True
    return 0


def _fetch_scheduler(dask_scheduler=None) -> list:
    return list(dask_scheduler.__dict__.get("_flashkm_timeline", []))


def _fetch(dask_worker=None) -> list:
    from flashkm_dist.dask import worker
    return list(worker.__dict__.get("_TIMELINE", []))  # (`install` clears it)


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
            recv = max((t for t in recvs if t <= r[1]), default=r[1])
            if engine:
                tasks.setdefault(r[3], []).append((address, r[1], r[2], engine[-1], recv, *(
                    sum(c[2] - c[1] for c in _within(recs, kind, r[1], r[2]))
                    for kind in ("centres", "combine", "export"))))
    rows = []
    for j in sorted(tasks):
        if j - 1 not in tasks or len(tasks[j]) != len(tasks[j - 1]):
            continue
        last_end = max(t[3][2] for t in tasks[j - 1])
        row = {"hop_ms": max(t[4] for t in tasks[j]) - last_end,
               "fetch_ms": max(t[1] - t[4] for t in tasks[j]),
               "update_ms": max(t[5] for t in tasks[j]),
               "combine_ms": max(t[6] for t in tasks[j]),
               "head_ms": max(t[3][1] - t[1] for t in tasks[j]),
               "gap_ms": max(t[3][1] for t in tasks[j]) - last_end,
               "tail_ms": max(t[2] - t[3][2] for t in tasks[j - 1]),
               "export_ms": max(t[7] for t in tasks[j - 1])}
        slowest = max(tasks[j - 1], key=lambda t: t[3][2])  # the worker whose engine ended last
        row |= {"slowest_tail_ms": slowest[2] - slowest[3][2], "slowest_export_ms": slowest[7]}
        rows.append({k: 1e3 * v for k, v in row.items()})
    return _median_rows(rows)


def chained_hops(client) -> dict:
    """Median milliseconds of the hop between chained iterations, message by message (`_wrap_messaging`,
    `_wrap_scheduler`), each the slowest worker's unless said:
      finished_ms  last step's task end -> its 'task-finished' handed to the batched stream
      to_scheduler_ms  -> the scheduler has it (batching interval, the socket, the scheduler's event loop)
      scheduler_ms  the last 'task-finished' in -> the last 'compute-task' out
      to_worker_ms  'compute-task' handed to the stream -> the worker has it
      to_gather_ms  task received -> its first fetch starts;  gather_ms  first fetch start -> last fetch end
      one_gather_ms the longest single fetch;  take_ms  device hand-offs taken (deserialised) while fetching
      to_start_ms  last fetch end -> the task runs;  served_ms  results served to peers while they fetch
      slowest_tail_ms, slowest_finished_ms, slowest_to_scheduler_ms  the same for the worker whose engine ended
      last (the critical path; the figures above are the maximum over workers);  slowest_fin_is_last  how often
      its 'task-finished' was also the last to reach the scheduler"""
    per_worker = client.run(_fetch)
    on_scheduler = client.run_on_scheduler(_fetch_scheduler)
    s_fin = {r[3]: r[1] for r in on_scheduler if r[0] == "s_fin"}
    s_send = {r[3]: r[1] for r in on_scheduler if r[0] == "s_send"}
    tasks = {}  # iteration -> [dict]
    for address, recs in per_worker.items():
        by_kind = {}
        for r in recs:
            by_kind.setdefault(r[0], []).append(r)
        for r in by_kind.get("chained", []):
            key = r[4]
            recv = next((v for v in by_kind.get("recv", []) if v[3] == key), None)
            sent = next((v[1] for v in by_kind.get("sent", []) if v[3] == key), None)
            if key is None or recv is None or sent is None or key not in s_fin or key not in s_send:
                continue
            window = [g for g in by_kind.get("gather", []) if recv[1] <= g[1] and g[2] <= r[1]]
            took = [t for t in by_kind.get("take", []) if recv[1] <= t[1] and t[2] <= r[1]]
            served = [t for t in by_kind.get("served", []) if recv[1] - 0.05 <= t[1] and t[2] <= r[1]]
            engine = _within(recs, "engine", r[1], r[2])
            tasks.setdefault(r[3], []).append({
                "start": r[1], "end": r[2], "recv": recv[1], "sent": sent, "s_fin": s_fin[key],
                "engine_end": engine[-1][2] if engine else r[2],
                "s_send": s_send[key], "gathers": [(g[1], g[2]) for g in window],
                "take": sum(t[2] - t[1] for t in took), "served": sum(t[2] - t[1] for t in served)})
    rows = []
    for j in sorted(tasks):
        now, before = tasks[j], tasks.get(j - 1)
        if not before or len(now) != len(before):
            continue
        last = max(before, key=lambda t: t["s_fin"])
        row = {"finished_ms": max(t["sent"] - t["end"] for t in before),
               "to_scheduler_ms": max(t["s_fin"] - t["sent"] for t in before),
               "scheduler_ms": max(t["s_send"] for t in now) - last["s_fin"],
               "to_worker_ms": max(t["recv"] - t["s_send"] for t in now),
               "take_ms": max(t["take"] for t in now), "served_ms": max(t["served"] for t in now)}
        slowest = max(before, key=lambda t: t["engine_end"])  # the critical path runs through this worker
        row |= {"slowest_tail_ms": slowest["end"] - slowest["engine_end"],
                "slowest_finished_ms": slowest["sent"] - slowest["end"],
                "slowest_to_scheduler_ms": slowest["s_fin"] - slowest["sent"],
                "slowest_fin_is_last": float(slowest is last)}
        gathered = [t for t in now if t["gathers"]]
        if gathered:
            row |= {"to_gather_ms": max(min(g[0] for g in t["gathers"]) - t["recv"] for t in gathered),
                    "gather_ms": max(max(g[1] for g in t["gathers"]) - min(g[0] for g in t["gathers"])
                                     for t in gathered),
                    "one_gather_ms": max(g[1] - g[0] for t in gathered for g in t["gathers"]),
                    "to_start_ms": max(t["start"] - max(g[1] for g in t["gathers"]) for t in gathered)}
        rows.append({k: v if k == "slowest_fin_is_last" else 1e3 * v for k, v in row.items()})
    return _median_rows(rows)


def collective_segments(client) -> dict:
    """Median milliseconds of an allreduce='nccl' iteration on its first worker (`collective.run_loop`): from one
    read-back of scalars to the next (iteration_ms), the host's time to queue an iteration (queue_ms), and the wait
    for the scalars (finish_ms: the device's step and update, as far as the queuing did not already cover them)."""
    recs = min(client.run(_fetch).items())[1]
    finished = sorted((r for r in recs if r[0] == "finish"), key=lambda r: r[1])
    rows = []
    for before, it in zip(finished, finished[1:]):
        queued = _within(recs, "queue", before[2], it[1])
        rows.append({"iteration_ms": 1e3 * (it[2] - before[2]), "queue_ms": 1e3 * sum(r[2] - r[1] for r in queued),
                     "finish_ms": 1e3 * (it[2] - it[1])})
    return _median_rows(rows)


def install(client) -> None:
    """Wrap the task functions in every worker and the scheduler's messaging (again: clears their logs)."""
    client.run(_wrap_in_worker)
    client.run_on_scheduler(_wrap_scheduler)


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
