"""Distributed fit on one multi-GPU host: strong scaling over Dask-CUDA workers, Dask overhead, out-of-core.

    python benchmarks/dask_scaling.py --out dask.json [--log2n 26] [--k 8192] [--d 128] [--workers 1,2,4]
    python benchmarks/dask_scaling.py --out weak.json --weak 16777216 --workers 1,2,4 --resident-only
    python benchmarks/dask_scaling.py --out big.json --n 1000000000 --k 32768 --workers 4 --iters 3 --resident-only
    python benchmarks/dask_scaling.py --out smoke.json --cpu-smoke     # tiny, CPU workers (checks the script)
    ... --task-stream: per task kind, median transfer and compute ms and the critical path's hand-offs

Data (fp16, N x D standard normal) is generated on the workers, block by block from the block index, so every
worker count clusters the same rows. Per worker count: a `LocalCUDACluster` with one worker per GPU, the data as
CuPy blocks resident on the GPUs, `max_iter` Lloyd iterations from the same initial centres (tol=0). Reported:
median client-side iteration time (from the fit's history, after the warm-up iterations), the slowest worker's step
time in the same iterations, the Dask overhead (their difference), speed-up and strong-scaling efficiency, with the
default Dask reduction and with allreduce='nccl' (workers all-reduce among themselves). Then,
on all GPUs: host-resident NumPy blocks streamed every iteration (cache off) and cached, and flash-kmeans'
`kmeans_largeN` on the same host data over the same GPUs, in this process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import dask_timeline
from provenance import provenance

WARMUP_ITERS = 2


def make_block(block_id=None, *, rows: int, d: int, seed: int, on_gpu: bool, host: bool):
    """One block of the data set, a function of its index only."""
    if on_gpu:
        import cupy
        x = cupy.random.RandomState(seed + block_id[0]).standard_normal((rows, d), dtype=cupy.float32)
        x = x.astype(cupy.float16)
        cupy.get_default_memory_pool().free_all_blocks()  # the float32 draw: give it back before the fit
        return cupy.asnumpy(x) if host else x
    return np.random.RandomState(seed + block_id[0]).standard_normal((rows, d)).astype(np.float16)


def dataset(n: int, d: int, n_blocks: int, *, on_gpu: bool, host: bool, seed: int = 0):
    import dask.array as da
    rows = n // max(n_blocks, 1)
    meta = np.empty((0, 0), dtype=np.float16)
    if on_gpu and not host:
        import cupy
        meta = cupy.empty((0, 0), dtype=cupy.float16)
    return da.map_blocks(make_block, rows=rows, d=d, seed=seed, on_gpu=on_gpu, host=host,
                         chunks=((rows,) * n_blocks, (d,)), dtype=np.float16, meta=meta, name="flashkm-data")


def balanced(client, n: int, d: int, n_blocks: int, *, on_gpu: bool, host: bool):
    """The data set with the same number of blocks made on every worker (the scheduler alone may place 9 and 7),
    so the scaling figures measure the fit, not an uneven placement."""
    import dask.array as da
    from distributed import wait
    workers = sorted(client.nthreads())
    rows = n // n_blocks
    futures = [client.submit(make_block, (b, 0), rows=rows, d=d, seed=0, on_gpu=on_gpu, host=host, pure=False,
                             workers=[workers[b * len(workers) // n_blocks]], allow_other_workers=False)
               for b in range(n_blocks)]
    wait(futures)
    meta = dataset(0, d, 1, on_gpu=on_gpu, host=host)._meta
    return da.concatenate([da.from_delayed(f, (rows, d), dtype=np.float16, meta=meta) for f in futures])


def placement(client, X) -> dict:
    from dask.core import flatten
    from distributed import futures_of
    held = client.who_has(futures_of(X))
    rows = {}
    for key, n in zip(flatten(X.__dask_keys__()), X.chunks[0]):
        for addr in held.get(key, ()):
            rows[addr] = rows.get(addr, 0) + int(n)
    return rows


def task_breakdown(records: list) -> dict:
    """Where a Dask-path iteration goes, from the task stream: median milliseconds of each task kind's transfer
    and compute, and the two hand-offs of the critical path (last step done -> reduce starts, reduce done -> the
    next steps start), over the iterations after the warm-up."""
    spans = {}
    for r in records:
        kind = r["key"].split("-")[1] if r["key"].startswith("flashkm-") else "other"
        it = spans.setdefault(kind, [])
        it.append({ss["action"]: (ss["start"], ss["stop"]) for ss in r["startstops"]})
    out = {}
    for kind, items in spans.items():
        for action in ("transfer", "compute"):
            times = [1e3 * (i[action][1] - i[action][0]) for i in items if action in i]
            if times:
                out[f"{kind}_{action}_ms"] = statistics.median(times)
    steps = sorted(i["compute"] for i in spans.get("step", []) if "compute" in i)
    reduces = sorted(i["compute"] for i in spans.get("reduce", []) if "compute" in i)
    handoff_in, handoff_out = [], []
    for a, b in zip(reduces, reduces[1:]):
        before = [s for s in steps if s[1] <= a[0]]
        after = [s for s in steps if a[1] <= s[0] <= b[0]]
        if before and after:
            handoff_in.append(1e3 * (a[0] - max(s[1] for s in before)))
            handoff_out.append(1e3 * (min(s[0] for s in after) - a[1]))
    if handoff_in:
        out["steps_done_to_reduce_start_ms"] = statistics.median(handoff_in[WARMUP_ITERS:] or handoff_in)
        out["reduce_done_to_next_steps_ms"] = statistics.median(handoff_out[WARMUP_ITERS:] or handoff_out)
    return out


def use_graphs(on: bool) -> None:
    """On a worker: the collective path's update as a CUDA graph, or op by op."""
    from flashkm_dist.dask import collective
    collective.GRAPHS = on


def timed_fit(client, X, init: np.ndarray, iters: int, allreduce: str = "dask", tasks: bool = False) -> dict:
    from distributed import get_task_stream, wait

    from flashkm_dist import KMeans
    X = X.persist()
    wait(X)
    t0 = time.perf_counter()
    rows = placement(client, X)
    with (get_task_stream(client) if tasks else contextlib.nullcontext()) as stream:
        km = KMeans(init.shape[0], init=init, max_iter=iters, tol=0.0, allreduce=allreduce).fit(X, client=client)
    total = time.perf_counter() - t0
    hist = km.history_[WARMUP_ITERS:] or km.history_
    it = statistics.median(h["seconds"] for h in hist)
    worker = statistics.median(h["slowest_worker_seconds"] for h in hist)
    over = statistics.median(h["seconds"] - h["slowest_worker_seconds"] for h in hist)
    first = total - sum(h["seconds"] for h in km.history_[1:])  # placement, seeding (an array here), iteration 1
    breakdown = {"task_breakdown": task_breakdown(stream.data)} if tasks and allreduce == "dask" else {}
    return {**breakdown, "iteration_s": it, "slowest_worker_step_s": worker, "dask_overhead_s": over,
            "fit_s": total, "to_first_iteration_s": first,
            "rows_per_worker": rows,
            "n_iter": km.n_iter_, "inertia": km.inertia_,
            "iterations": [{k: h[k] for k in ("seconds", "slowest_worker_seconds", "labels_changed")}
                           for h in km.history_]}


def exactness(client, cpu: bool, chain: bool = False) -> dict:
    """The distributed fit (CuPy blocks on the GPUs, and NumPy blocks) against the in-process fit of the same rows
    in this process: centres, inertia and labels must be the same bits. `chain`: also with chained steps."""
    import torch

    from flashkm_dist import KMeans
    from flashkm_dist.dask.cluster import DaskShards
    out = {}
    X = dataset(1 << 17, 32, 12, on_gpu=not cpu, host=False)
    rows = X.compute()
    rows = rows if isinstance(rows, np.ndarray) else rows.get()
    for init in ("k-means||", "k-means++"):
        params = dict(n_clusters=64, init=init, random_state=0, max_iter=30)
        ref = KMeans(**params, device="cuda" if torch.cuda.is_available() else "cpu").fit(rows)
        for kind, data in (("device_blocks", X), ("host_blocks", dataset(1 << 17, 32, 12, on_gpu=not cpu,
                                                                          host=True))):
            ways = [("dask", False), ("nccl", False)] if kind == "device_blocks" else [("dask", False)]
            for allreduce, chained in ways + ([("dask", True)] if chain else []):
                DaskShards.chained = chained
                try:
                    got = KMeans(**params, allreduce=allreduce).fit(data, client=client)
                finally:
                    DaskShards.chained = False
                labels = got.labels_.compute()
                labels = labels if isinstance(labels, np.ndarray) else labels.get()
                name = f"{init}/{kind}" + ("/nccl" if allreduce == "nccl" else "") + ("/chained" if chained else "")
                out[name] = {
                    "centers_equal": bool(np.array_equal(got.cluster_centers_, ref.cluster_centers_)),
                    "inertia_equal": got.inertia_ == ref.inertia_, "n_iter": [got.n_iter_, ref.n_iter_],
                    "labels_equal": bool(np.array_equal(labels, ref.labels_))}
    return out


def cluster(n_workers: int, cpu: bool):
    if cpu:
        from distributed import LocalCluster
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0")
    from dask_cuda import LocalCUDACluster
    # device_memory_limit=0: no spilling to host. The data is meant to stay resident; with the default limit the
    # 1e9-row set (64 GB of 141 per GPU) was spilled and reloading a block ran out of device memory
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(n_workers)), n_workers=n_workers,
                            threads_per_worker=2, dashboard_address=":0", device_memory_limit=0)


def flash_largeN(n: int, d: int, n_blocks: int, init: np.ndarray, iters: int) -> dict:
    """flash-kmeans' multi-GPU out-of-core loop on the same rows, pinned on the host, all visible GPUs."""
    import torch
    from flash_kmeans import kmeans_largeN
    rows = n // n_blocks
    x = torch.empty((rows * n_blocks, d), dtype=torch.float16, pin_memory=True)
    for b in range(n_blocks):
        x[b * rows:(b + 1) * rows] = torch.as_tensor(make_block((b, 0), rows=rows, d=d, seed=0, on_gpu=True,
                                                                host=True))
    c = torch.as_tensor(init, dtype=torch.float16)

    def run(n_iter):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kmeans_largeN(x, c.shape[0], max_iters=n_iter, init_centroids=c.clone(), device=None)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(1)  # compile
    one, more = run(1), run(1 + iters)
    return {"iteration_s": (more - one) / iters, "gpus": torch.cuda.device_count()}


def _captures_refused(dask_worker=None) -> list:
    """Why CUDA graph captures were refused in a worker (none expected: the update then runs op by op)."""
    from flashkm_dist import graphed
    refused = list(graphed.REFUSED)
    graphed.REFUSED.clear()  # (each fit reports its own)
    return refused


def _handoff_left(dask_worker=None) -> tuple:
    """Device buffers a worker still holds for the hand-off (all fits have ended: must be none)."""
    from flashkm_dist.dask import handoff
    return len(handoff._EXPORTED), sum(map(len, handoff._FREE.values())), len(handoff._OPENED)


SWITCH_S = 0.0002  # --switch-ab
AB_MODES = {  # flag -> (name in the results, reduction, what it times); `main` sets each up before its fits
    "batching-ab": ("resident_default_batching", "dask", "the Dask path with distributed's default message batching"),
    "reducers-ab": ("resident_reducer_per_worker", "dask",
                    "the Dask path with a reducer on every worker (default: one per host)"),
    "graphs-ab": ("resident_nccl_eager", "nccl", "allreduce='nccl' with its update op by op instead of one CUDA graph"),
    "handoff-ab": ("resident_socket", "dask",
                   "the Dask path with the partials sent over the socket (no CUDA IPC hand-off)"),
    "chain-ab": ("resident_chained", "dask", "the Dask path as chained steps (one task per worker and iteration)"),
    "unpushed-ab": ("resident_chained_unpushed", "dask",
                    "chained steps whose results wait to be fetched (default: pushed to the peers that need them)"),
    "unpushed-dask-ab": ("resident_unpushed", "dask",
                         "the Dask path with step and reduce results fetched instead of pushed"),
    "batched-ab": ("resident_chained_batched", "dask",
                   "chained steps with at most one message batch per 0.5 ms during the fit (default: none)"),
    "switch-ab": ("resident_chained_switch", "dask",
                  "chained steps with a 0.2 ms GIL switch interval in the cluster's processes (default: 5 ms)"),
    "anchor-ab": ("resident_chained_anchored", "dask",
                  "chained steps with an anchor every iteration (what one anchor costs; default: one a minute)"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--log2n", type=int, default=26)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--blocks-per-worker", type=int, default=8)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="rows (overrides --log2n), e.g. 1000000000")
    ap.add_argument("--weak", type=int, default=None, metavar="ROWS_PER_WORKER",
                    help="weak scaling: N = ROWS_PER_WORKER x workers (same blocks per worker)")
    ap.add_argument("--resident-only", action="store_true", help="skip host-resident blocks and flash-kmeans")
    ap.add_argument("--no-exactness", action="store_true", help="skip the bitwise check (series runs)")
    ap.add_argument("--task-stream", action="store_true",
                    help="break the Dask path's iteration down by task (transfers, computes, hand-offs)")
    for flag, (_, _, text) in AB_MODES.items():
        ap.add_argument(f"--{flag}", action="store_true", help=f"also time {text}")
    ap.add_argument("--no-dask-profiler", action="store_true",
                    help="clusters without Dask's statistical profiler (it samples every event loop every 10 ms)")
    ap.add_argument("--timeline", action="store_true",
                    help="the Dask path's critical path per iteration, from timestamps taken in the workers")
    args = ap.parse_args()
    from flashkm_dist.dask import driver, handoff, latency
    from flashkm_dist.dask.cluster import DaskShards
    from distributed import Client
    cpu = args.cpu_smoke
    anchor_every, batching, default_switch = driver.ANCHOR_EVERY_S, latency.INTERVAL_S, sys.getswitchinterval()
    n, d, k = (1 << 14, 16, 32) if cpu else (args.n or 1 << args.log2n, args.d, args.k)
    workers = [int(w) for w in args.workers.split(",")]
    n_blocks = max(workers) * args.blocks_per_worker
    init = make_block((10_000, 0), rows=k, d=d, seed=0, on_gpu=not cpu, host=True)
    import dask
    import distributed
    if args.no_dask_profiler:  # (the worker processes take the config of this process)
        dask.config.set({"distributed.worker.profile.enabled": False})
    result = {**provenance(), "n": n, "d": d, "k": k, "dtype": "float16", "n_blocks": n_blocks,
              "iters": args.iters,
              "weak_rows_per_worker": args.weak,
              "warmup_iters_excluded": WARMUP_ITERS, "python": sys.version.split()[0], "host": platform.node(),
              "dask": dask.__version__, "distributed": distributed.__version__,
              "dask_profiler": bool(dask.config.get("distributed.worker.profile.enabled")), "resident": {}}
    try:
        import torch
        result["torch"] = torch.__version__
        if torch.cuda.is_available():
            result["device"] = torch.cuda.get_device_name(0)
            result["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    modes = [("resident", "dask"), ("resident_nccl", "nccl")] + [  # (name in the results, reduction)
        (mode, allreduce) for flag, (mode, allreduce, _) in AB_MODES.items() if getattr(args, flag.replace("-", "_"))]
    for w in workers:  # strong scaling, data resident on the GPUs
        with cluster(w, cpu) as lc, Client(lc) as client:
            if args.timeline:  # (before any task: workers cache the functions they unpickle)
                dask_timeline.install(client)
            if w == workers[-1] and not args.no_exactness:
                result["exactness"] = exactness(client, cpu, args.chain_ab)
                print("exactness", result["exactness"], flush=True)
            result.setdefault("device_handoff", {})[w] = handoff.probe(client, sorted(client.nthreads()))
            n_w, blocks_w = (args.weak * w, w * args.blocks_per_worker) if args.weak else (n, n_blocks)
            X = balanced(client, n_w, d, blocks_w, on_gpu=not cpu, host=cpu)
            for mode, allreduce in modes:
                latency.ENABLED = mode != "resident_default_batching"
                DaskShards.reducers = w if mode == "resident_reducer_per_worker" else None
                DaskShards.device_handoff = mode != "resident_socket"
                DaskShards.chained = mode.startswith("resident_chained")
                latency.INTERVAL_S = 0.0005 if mode == "resident_chained_batched" else batching
                switch = SWITCH_S if mode == "resident_chained_switch" else default_switch
                client.run(sys.setswitchinterval, switch)
                client.run_on_scheduler(sys.setswitchinterval, switch)
                driver.PUSH = mode not in ("resident_chained_unpushed", "resident_unpushed")
                driver.ANCHOR_EVERY_S = 0.0 if mode == "resident_chained_anchored" else anchor_every
                client.run(use_graphs, mode != "resident_nccl_eager")  # (read in the worker processes)
                if args.timeline:
                    dask_timeline.install(client)
                result.setdefault(mode, {})[w] = {"n": n_w, **timed_fit(client, X, init, args.iters, allreduce,
                                                                        args.task_stream)}
                result[mode][w]["graph_captures_refused"] = sorted(
                    {e for errs in client.run(_captures_refused).values() for e in errs})
                if args.timeline:
                    result[mode][w]["timeline"] = (
                        dask_timeline.collective_segments(client) if allreduce == "nccl"
                        else dask_timeline.chained_segments(client) | {
                            "hops": dask_timeline.chained_hops(client)} if DaskShards.chained
                        else dask_timeline.segments(client))
                latency.ENABLED, DaskShards.reducers, DaskShards.device_handoff = True, None, True
                DaskShards.chained = False
                print(w, "workers", mode, {k_: v for k_, v in result[mode][w].items() if k_ != "iterations"},
                      flush=True)
            del X
            result.setdefault("handoff_buffers_left", {})[w] = sorted(set(client.run(_handoff_left).values()))
        save()
    for mode, _ in modes:
        base = result[mode][workers[0]]["iteration_s"]
        if args.weak:  # same work per GPU: growth of the iteration time from the first worker count
            result[f"weak_scaling_growth_{mode}"] = {w: r["iteration_s"] / base - 1 for w, r in result[mode].items()}
        else:
            result[f"strong_scaling_efficiency_{mode}"] = {w: base * workers[0] / (w * r["iteration_s"])
                                                           for w, r in result[mode].items()}
    if args.resident_only:
        save()
        return
    w = max(workers)
    for mode, cache in (("host_streamed", "0"), ("host_cached", "")):  # NumPy blocks in worker host memory
        os.environ["FLASHKM_CACHE_BYTES"] = cache
        with cluster(w, cpu) as lc, Client(lc) as client:
            X = balanced(client, n, d, n_blocks, on_gpu=not cpu, host=True)
            result[mode] = {"workers": w, **timed_fit(client, X, init, args.iters)}
            print(mode, {k_: v for k_, v in result[mode].items() if k_ != "iterations"}, flush=True)
        save()
    os.environ.pop("FLASHKM_CACHE_BYTES", None)
    if not cpu:
        try:
            result["flash_kmeans_largeN"] = flash_largeN(n, d, n_blocks, init, min(args.iters, 3))
        except Exception as err:  # noqa: BLE001 - the peer's failure is reported, not fatal
            result["flash_kmeans_largeN"] = {"error": repr(err)}
        print("flash largeN", result["flash_kmeans_largeN"], flush=True)
    save()
    print(json.dumps({k_: v for k_, v in result.items() if not k_.startswith("resident")}, indent=1,
                     default=str)[:3000])


if __name__ == "__main__":
    main()
