"""Fit a .npy file on a local Dask cluster: the file is memory-mapped and read chunk by chunk by the workers, the
labels are written back in the same chunks, and the result is checked against the in-process fit of the same rows.

    python examples/fit_local_cluster.py [--n-samples 200000] [--n-features 16] [-k 32] [--n-workers 2] [--dir DIR]

On a machine with GPUs and dask-cuda the cluster is a LocalCUDACluster (one worker per GPU).
"""
import argparse
import os
import tempfile
import time

import numpy as np
from distributed import Client

from flashkm_dist import KMeans
from flashkm_dist.cli import make_local_cluster
from flashkm_dist.demo import make_blobs
from flashkm_dist.io import describe, open_array, write_array


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-samples", type=int, default=200_000)
    p.add_argument("--n-features", type=int, default=16)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--n-workers", type=int, default=2)
    p.add_argument("--dir", help="where to write data.npy and labels.npy (default: a temporary folder)")
    args = p.parse_args(argv)

    folder = args.dir or tempfile.mkdtemp(prefix="flashkm-example-")
    os.makedirs(folder, exist_ok=True)
    x, _, _ = make_blobs(args.n_samples, args.n_features, args.k, seed=1)
    np.save(os.path.join(folder, "data.npy"), x)

    with make_local_cluster(args.n_workers) as cluster, Client(cluster) as client:
        X = open_array(os.path.join(folder, "data.npy"), min_chunks=2 * args.n_workers)  # lazy, memory-mapped
        print(f"{type(cluster).__name__} with {args.n_workers} workers; data {describe(X)}")
        t0 = time.perf_counter()
        km = KMeans(args.k, init="k-means||", random_state=0).fit(X)   # runs on the current client
        print(f"fit: {km.n_iter_} iterations in {time.perf_counter() - t0:.2f} s, inertia {km.inertia_:.6g}")
        labels_path = write_array(km.labels_, os.path.join(folder, "labels.npy"))   # computed on the workers
        print(f"labels: {labels_path}")

    local = KMeans(args.k, init="k-means||", random_state=0).fit(x)
    same = np.array_equal(local.cluster_centers_, km.cluster_centers_) and np.array_equal(
        local.labels_, np.load(labels_path))
    print(f"same centres and labels as the in-process fit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
