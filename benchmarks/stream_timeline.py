"""Where a profiled call's compute stream waits: its idle gaps, what ran on the other streams meanwhile, and
which operation ended each gap. Per-kernel totals (profile_kernels.device_rows) cannot show this: a step can
spend 0.77 s of kernels and 0.62 s of copies in 1.14 s of wall time without saying what each stream waited for.

Works on (stream, start_us, end_us, name) tuples, so it is tested without a GPU; `device_ops` reads them from a
finished torch profiler."""
from __future__ import annotations

from collections import defaultdict


def device_ops(prof) -> list:
    """(stream, start_us, end_us, name) of every kernel, copy and memset a finished profiler saw on a GPU."""
    ops = []
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start:
            ops.append((e.device_resource_id, e.time_range.start, e.time_range.end, e.name))
    return ops


def host_waits(prof, min_us: float = 100.0) -> list:
    """[name, count, ms] of the CUDA runtime calls that held the host at least min_us each (synchronizations,
    copies from pageable memory, launches into a full command buffer), longest total first."""
    totals = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        took = e.time_range.end - e.time_range.start
        if not str(getattr(e, "device_type", "")).endswith("CUDA") and e.name.startswith("cu") and took >= min_us:
            totals[e.name][0] += 1
            totals[e.name][1] += took / 1e3
    return sorted(([n, c, round(ms, 3)] for n, (c, ms) in totals.items()), key=lambda r: -r[2])


def _merged(spans: list) -> list:
    """Sorted, overlapping or touching (start, end) spans joined."""
    out = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _covered(busy: list, start: float, end: float) -> float:
    """How much of [start, end) the merged spans `busy` cover."""
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in busy)


def gaps(ops: list, min_gap_us: float = 50.0, top: int = 12) -> dict:
    """The compute stream (the one with the most kernel time) and its idle gaps of at least min_gap_us between
    its first and last operation: their total, how much of it another stream was copying host to device, and the
    gaps grouped by the operation that ended them (count, ms), longest total first; plus each stream's busy ms."""
    by_stream = defaultdict(list)
    for stream, start, end, name in ops:
        by_stream[stream].append((start, end, name))
    if not by_stream:
        return {}
    busy_ms = {s: sum(e - b for b, e in _merged([(b, e) for b, e, _ in v])) / 1e3 for s, v in by_stream.items()}
    kernel_ms = {s: sum(e - b for b, e, n in v if not n.startswith("Memcpy") and not n.startswith("Memset"))
                 for s, v in by_stream.items()}
    compute = max(kernel_ms, key=kernel_ms.get)
    copying = _merged([(b, e) for s, v in by_stream.items() if s != compute
                       for b, e, n in v if n.startswith("Memcpy HtoD")])
    mine = sorted(by_stream[compute])
    idle, idle_copying, ended, longest = 0.0, 0.0, defaultdict(lambda: [0, 0.0]), []
    reach = mine[0][1]
    for start, end, name in mine[1:]:
        gap = start - reach
        if gap >= min_gap_us:
            idle += gap
            idle_copying += _covered(copying, reach, start)
            ended[name[:60]][0] += 1
            ended[name[:60]][1] += gap / 1e3
            longest.append((round(gap / 1e3, 3), round((reach - mine[0][0]) / 1e3, 3), name[:60]))
        reach = max(reach, end)
    span = (reach - mine[0][0]) / 1e3
    by_end = sorted(([n, c, round(ms, 3)] for n, (c, ms) in ended.items()), key=lambda r: -r[2])
    return {"compute_stream": compute, "span_ms": round(span, 3),
            "busy_ms": {str(s): round(ms, 3) for s, ms in busy_ms.items()},
            "compute_idle_ms": round(idle / 1e3, 3), "compute_idle_while_copying_ms": round(idle_copying / 1e3, 3),
            "gaps_ended_by": by_end[:top], "longest_gaps_ms_at_ms": sorted(longest, reverse=True)[:top]}
