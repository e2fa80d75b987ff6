"""Dask's own floor for one chained iteration on this host: the time per iteration of a chain of trivial tasks,
one per worker and iteration, each taking every task of the iteration before (the dependency shape of the chained
fit, with nothing computed and nothing moved but a small result, pushed to the peers as the fit pushes its results
or fetched by them): about what the fit's Dask overhead cannot go below (the fit adds its update and the tail of
its steps; the chain here is queued whole, the fit keeps two iterations queued).

    python benchmarks/dask_floor.py --out floor.json [--workers 1,2,4] [--iters 200]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time


def trivial(i, peers, *prior):
    """`peers`: hand the result to them when it is in memory (the fit's push), or None (they fetch it)."""
    if peers:
        from flashkm_dist.dask import push
        push.expect(peers)
    return i


def chain(client, workers: list, iters: int, pushed: bool) -> float:
    """Milliseconds per iteration of `iters` iterations, all submitted at once (the client never waits)."""
    from distributed import wait
    peers = workers if pushed else None
    prior = [client.submit(trivial, 0, peers, workers=[a], pure=False) for a in workers]
    wait(prior)
    t0 = time.perf_counter()
    for i in range(1, iters + 1):
        prior = [client.submit(trivial, i, peers, *prior, workers=[a], pure=False, key=f"floor-{i}-{j}-{t0}")
                 for j, a in enumerate(workers)]
    wait(prior)
    return 1e3 * (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import distributed
    from distributed import Client, LocalCluster

    from flashkm_dist.dask import latency, push
    result = {"host": platform.node(), "distributed": distributed.__version__, "iters": args.iters,
              "fit_batching_interval_s": latency.INTERVAL_S, "ms_per_iteration": {}}
    for w in (int(x) for x in args.workers.split(",")):
        with LocalCluster(n_workers=w, threads_per_worker=1, dashboard_address=None) as lc, Client(lc) as client:
            workers = sorted(client.nthreads())
            push.install(client)
            chain(client, workers, 20, True)  # (warm-up)
            for mode, interval, pushed in (("unbatched_pushed", 0.0, True), ("unbatched", 0.0, False),
                                           ("batch_per_0.5ms_pushed", 0.0005, True),
                                           ("distributed_default", None, False)):
                with latency.Tightened(client, interval) if interval is not None else contextlib.nullcontext():
                    runs = [chain(client, workers, args.iters, pushed) for _ in range(args.repeats)]
                result["ms_per_iteration"].setdefault(mode, {})[w] = statistics.median(runs)
                print(w, "workers", mode, [round(r, 3) for r in runs], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
