"""No message batching between the scheduler and the workers while a fit runs.

Distributed batches the messages of each scheduler-worker stream, sending at most one batch per 5 ms (scheduler to
worker) or 2 ms (worker to scheduler). That suits many small tasks; a Lloyd iteration is a short chain of few
tasks (step, slice, reduce, next step), and each hand-off can wait out a batching interval. During a fit the
intervals are set to `INTERVAL_S` and afterwards put back. 0 (each message goes at once): in three A/B runs on 4
H200 workers the chained fit's Dask overhead was 0.1-1.0 ms lower than with 0.5 ms (7.2 / 8.4 / 7.4 ms against
8.2 / 8.7 / 7.5; benchmarks/results/dask_scaling_h200x4_{summed,unbatched,noreply}.json); a wash at 1-2 workers.
Best effort: a scheduler that cannot import this module (another environment) keeps its defaults, which only
costs time.
"""
from __future__ import annotations

import logging

INTERVAL_S = 0.0
ENABLED = True  # benchmarks switch it off to measure what it saves
logger = logging.getLogger(__name__)


def _scheduler_streams(interval: float, dask_scheduler=None) -> dict:
    """Set the interval of every stream to a worker; returns the previous ones."""
    before = {a: b.interval for a, b in dask_scheduler.stream_comms.items()}
    for b in dask_scheduler.stream_comms.values():
        b.interval = interval
    return before


def _restore_scheduler(saved: dict, dask_scheduler=None) -> None:
    for address, b in dask_scheduler.stream_comms.items():
        if address in saved:
            b.interval = saved[address]


def _worker_stream(interval: float, dask_worker=None) -> float:
    before = dask_worker.batched_stream.interval
    dask_worker.batched_stream.interval = interval
    return before


class Tightened:
    """Context manager: the batching intervals of the client's cluster set to `interval` (default `INTERVAL_S`)
    for the duration of a fit."""

    def __init__(self, client, interval: float | None = None):
        self.client, self.interval = client, INTERVAL_S if interval is None else interval
        self.scheduler: dict | None = None
        self.workers: dict = {}

    def __enter__(self):
        if not ENABLED:
            return self
        try:
            self.scheduler = self.client.run_on_scheduler(_scheduler_streams, self.interval)
            self.workers = self.client.run(_worker_stream, self.interval)
        except Exception as err:  # noqa: BLE001 - an optimisation only
            logger.debug("message batching left as it is: %r", err)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.scheduler is not None:
                self.client.run_on_scheduler(_restore_scheduler, self.scheduler)
            live = set(self.client.nthreads())  # (asking a worker that died would wait out the connect timeout)
            for before in set(self.workers.values()):
                self.client.run(_worker_stream, before, on_error="ignore",
                                workers=[a for a, b in self.workers.items() if b == before and a in live])
        except Exception as err:  # noqa: BLE001 - the fit's own outcome matters more
            logger.debug("message batching not put back: %r", err)
