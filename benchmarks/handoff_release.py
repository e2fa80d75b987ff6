"""GPU check: the CUDA IPC hand-off gives its device buffers back once fits end (no leak across fits).

Fits on a dask-cuda cluster with the hand-off (default and chained Dask paths), then, after garbage collection,
polls every worker's hand-off state until nothing is left or 20 s pass. Writes JSON.
Usage: python handoff_release.py --out F.json [--workers 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np


def state(dask_worker=None) -> tuple:
    import gc as worker_gc

    from flashkm_dist.dask import handoff
    worker_gc.collect()
    return len(handoff._EXPORTED), sum(map(len, handoff._FREE.values())), len(handoff._OPENED)


def holders(dask_worker=None) -> list:
    """Who keeps each live lease of the hand-off alive: the result holding it, the worker's data entry (key and
    task state) when Dask still stores it, else the types of that result's referrers."""
    import gc as worker_gc

    from flashkm_dist.dask import handoff
    worker_gc.collect()
    found = []
    stored = {id(v): k for k, v in dask_worker.data.items()}
    for lease in [o for o in worker_gc.get_objects() if isinstance(o, handoff.Lease)]:
        for owner in worker_gc.get_referrers(lease):
            if type(owner).__name__ in ("StepResult", "Update"):
                key = stored.get(id(owner))
                ts = dask_worker.state.tasks.get(key) if key is not None else None
                found.append({"token": lease.buffer.token[:8], "result": type(owner).__name__, "key": str(key),
                              "task_state": getattr(ts, "state", None),
                              "referrers": sorted({type(r).__name__ for r in worker_gc.get_referrers(owner)})})
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import cupy
    import dask.array as da
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from flashkm_dist import KMeans
    from flashkm_dist.dask import handoff
    out = {"fits": []}
    with LocalCUDACluster(n_workers=args.workers) as lc, Client(lc) as client:
        out["device_handoff"] = handoff.probe(client, sorted(client.nthreads()))
        x = cupy.random.RandomState(0).standard_normal((1 << 18, 32), dtype=cupy.float32)
        X = da.from_array(x, chunks=(1 << 15, 32)).persist()
        ref = None
        for allreduce in ("dask", "chained", "dask", "chained"):
            km = KMeans(256, init="k-means++", random_state=0, max_iter=15, allreduce=allreduce).fit(X)
            ref = km.cluster_centers_ if ref is None else ref
            out["fits"].append({"allreduce": allreduce, "n_iter": km.n_iter_,
                                "same_centres": bool(np.array_equal(km.cluster_centers_, ref))})
            out.setdefault("after_each_fit", []).append(sorted(set(client.run(state).values())))
        del km
        gc.collect()
        t0 = time.perf_counter()
        while True:
            left = client.run(state)
            if all(v == (0, 0, 0) for v in left.values()) or time.perf_counter() - t0 > 20:
                break
            time.sleep(0.5)
        out["left_after_gc"] = sorted(set(left.values()))
        out["holders"] = client.run(holders)
        out["seconds_to_clean"] = time.perf_counter() - t0
    print(out)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
