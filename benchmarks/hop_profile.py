"""Where the event loops spend the Dask path's overhead: a long chained fit on one host, to run under a sampling
profiler of the whole process tree (development tool; prints its timing, the profiler writes the stacks):

    py-spy record --subprocesses --nonblocking -r 1000 --threads -f raw -o stacks.txt -- \
        python benchmarks/hop_profile.py --workers 4 --iters 60
"""
from __future__ import annotations

import argparse
import statistics
import time

from dask_scaling import balanced, cluster, make_block

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--log2n", type=int, default=26)
    ap.add_argument("--allreduce", default="chained")
    args = ap.parse_args()
    from distributed import Client

    from flashkm_dist import KMeans
    n, d, k = 1 << args.log2n, 128, 8192
    init = make_block((10_000, 0), rows=k, d=d, seed=0, on_gpu=True, host=True)
    with cluster(args.workers, False) as lc, Client(lc) as client:
        X = balanced(client, n, d, args.workers * 8, on_gpu=True, host=False).persist()
        KMeans(k, init=init, max_iter=3, tol=0.0, allreduce=args.allreduce).fit(X, client=client)
        t0 = time.time()
        km = KMeans(k, init=init, max_iter=args.iters, tol=0.0, allreduce=args.allreduce).fit(X, client=client)
        h = km.history_[2:]
        it = 1e3 * statistics.median(x["seconds"] for x in h)
        over = 1e3 * statistics.median(x["seconds"] - x["slowest_worker_seconds"] for x in h)
        print(f"fit from {t0:.3f} to {time.time():.3f}: iteration {it:.2f} ms, overhead {over:.2f} ms", flush=True)
