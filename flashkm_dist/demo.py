"""The demo: synthetic blobs with known centres, generated on the workers of a local Dask cluster, clustered there,
and a short report of what was found (agreement with the truth, centre error, and the same fit in process).

    python -m flashkm_dist.demo [--n-samples N] [--n-workers W] [--in-process] [--plot history.png] ...
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from flashkm_dist import KMeans


def make_blobs(n_samples: int, n_features: int, n_centers: int, seed: int, spread: float = 1.0):
    """Gaussian blobs around centres drawn in a box of side 20 * spread: data with a known answer."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10 * spread, 10 * spread, size=(n_centers, n_features)).astype(np.float32)
    truth = rng.integers(0, n_centers, size=n_samples)
    x = centers[truth] + rng.standard_normal((n_samples, n_features), dtype=np.float32) * 0.5 * spread
    return x, truth, centers


def blob_centers(n_features: int, n_centers: int, seed: int, spread: float = 1.0) -> np.ndarray:
    return np.random.default_rng([seed, 0]).uniform(-10 * spread, 10 * spread,
                                                    size=(n_centers, n_features)).astype(np.float32)


def _block_truth(n_rows: int, n_centers: int, seed: int, block: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, block]).integers(0, n_centers, size=n_rows)


def _block_points(centers, seed, spread, block_info=None):
    info = block_info[None]
    (lo, hi), _ = info["array-location"]
    block = info["chunk-location"][0]
    truth = _block_truth(hi - lo, len(centers), seed, block)
    noise = np.random.default_rng([seed, 2, block]).standard_normal((hi - lo, centers.shape[1]), dtype=np.float32)
    return centers[truth] + noise * np.float32(0.5 * spread)


def _block_labels(n_centers, seed, block_info=None):
    info = block_info[None]
    (lo, hi), = info["array-location"]
    return _block_truth(hi - lo, n_centers, seed, info["chunk-location"][0])


def make_blobs_dask(n_samples: int, n_features: int, n_centers: int, seed: int, chunk_rows: int,
                    spread: float = 1.0):
    """`make_blobs` as lazy Dask arrays (points, true labels) whose blocks are drawn where they are computed (each
    block from its own seed), so no data moves from the client; and the true centres."""
    import dask.array as da
    centers = blob_centers(n_features, n_centers, seed, spread)
    rows = da.core.normalize_chunks((chunk_rows,), (n_samples,))[0]
    x = da.map_blocks(_block_points, centers, seed, spread, chunks=(rows, (n_features,)), dtype=np.float32,
                      meta=np.empty((0, 0), np.float32), name=f"blobs-{seed}-{n_samples}-{n_features}-{n_centers}")
    truth = da.map_blocks(_block_labels, n_centers, seed, chunks=(rows,), dtype=np.int64,
                          meta=np.empty((0,), np.int64), name=f"truth-{seed}-{n_samples}-{n_centers}")
    return x, truth, centers


def _report(model, truth, true_centers, seconds: float, where: str) -> None:
    labels = model.labels_.compute() if hasattr(model.labels_, "compute") else model.labels_
    ari = adjusted_rand_score(truth, labels)
    gaps = np.linalg.norm(model.cluster_centers_[:, None, :] - true_centers[None], axis=2).min(axis=1)
    sizes = np.bincount(labels, minlength=model.n_clusters)
    print(f"fit: init={model.init}, {model.n_iter_} iterations in {seconds:.2f} s {where}")
    print(f"inertia: {model.inertia_:.6g}")
    print(f"agreement with the true blobs: adjusted Rand index {ari:.4f}")
    print(f"found centre to nearest true centre: median {np.median(gaps):.4f}, max {gaps.max():.4f}")
    print(f"cluster sizes: min {sizes.min():,}, max {sizes.max():,}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashkm demo",
                                     description="flashkm_dist demo: exact k-means on synthetic blobs, on a local "
                                                 "Dask cluster (or in process)")
    parser.add_argument("--n-samples", type=int, default=100_000)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--n-clusters", type=int, default=16)
    parser.add_argument("--init", default="k-means||")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-workers", type=int, default=2, help="workers of the local cluster (default 2)")
    parser.add_argument("--scheduler-address", metavar="ADDR", help="use this scheduler instead of a local cluster")
    parser.add_argument("--in-process", action="store_true", help="no Dask: fit in this process (CPU or one GPU)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the in-process fit of the same rows that checks the centres are the same bits")
    parser.add_argument("--plot", metavar="PNG", help="also plot the convergence history to this file")
    args = parser.parse_args(argv)
    params = dict(n_clusters=args.n_clusters, init=args.init, random_state=args.seed, device=args.device)

    if args.in_process:
        x, truth, true_centers = make_blobs(args.n_samples, args.n_features, args.n_clusters, args.seed)
        print(f"data: {x.shape[0]:,} points x {x.shape[1]} features (float32), {args.n_clusters} true blobs")
        t0 = time.perf_counter()
        model = KMeans(**params).fit(x)
        _report(model, truth, true_centers, time.perf_counter() - t0, f"in process on device '{args.device}'")
    else:
        from distributed import Client

        from flashkm_dist.cli import make_local_cluster
        t0 = time.perf_counter()
        if args.scheduler_address:
            cluster, client = None, Client(args.scheduler_address)
        else:
            logging.getLogger("distributed").setLevel(logging.ERROR)
            cluster = make_local_cluster(args.n_workers)
            client = Client(cluster)
        try:
            n_workers = len(client.nthreads())
            print(f"cluster: {type(cluster).__name__ if cluster else args.scheduler_address}, {n_workers} workers "
                  f"(started in {time.perf_counter() - t0:.1f} s); dashboard {client.dashboard_link}")
            chunk_rows = -(-args.n_samples // (4 * max(1, n_workers)))
            X, truth_da, true_centers = make_blobs_dask(args.n_samples, args.n_features, args.n_clusters, args.seed,
                                                        chunk_rows)
            print(f"data: {args.n_samples:,} points x {args.n_features} features (float32) in {X.numblocks[0]} "
                  f"chunks drawn on the workers, {args.n_clusters} true blobs")
            t0 = time.perf_counter()
            model = KMeans(**params).fit(X, client=client)
            seconds = time.perf_counter() - t0
            truth = truth_da.compute()
            _report(model, truth, true_centers, seconds, f"on {n_workers} Dask workers")
            if not args.no_compare:
                local = KMeans(**params).fit(X.compute())
                same = (np.array_equal(local.cluster_centers_, model.cluster_centers_)
                        and np.array_equal(local.labels_, model.labels_.compute()))
                print(f"in-process fit of the same rows: identical centres and labels: {'yes' if same else 'NO'}")
                if not same:
                    return 1
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    if args.plot:
        from flashkm_dist.plotting import plot_history
        plot_history(model.history_, args.plot)
        print(f"convergence plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
