"""Fit k-means with Dask workers that dask-jobqueue submits as Slurm jobs (SLURMCluster), from a login node or a
notebook: the scheduler runs in this process, each job is one worker (one GPU with the 'flashkm-gpu' settings of
jobqueue.yaml beside this file).

    python cluster-configs/jobqueue_fit.py INPUT K MODEL.npz [--jobs 8] [--queue gpu] [--account A]
                                           [--walltime 02:00:00] [--cpu] [--random-state 0] [--labels OUT]

Needs `pip install 'flashkm-dist[slurm]'` (dask-jobqueue). INPUT is any format `flashkm fit` reads, on a filesystem
that the compute nodes share.
"""
from __future__ import annotations

import argparse
import os
import time

import dask.config
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(path: str = os.path.join(HERE, "jobqueue.yaml")) -> None:
    """Put the 'flashkm-gpu' and 'flashkm-cpu' jobqueue settings into Dask's configuration."""
    with open(path) as f:
        dask.config.update(dask.config.config, yaml.safe_load(f), priority="new")


def make_cluster(kind: str = "gpu", **overrides):
    """A SLURMCluster with the 'flashkm-<kind>' settings; keyword arguments override them (queue=, account=,
    walltime=, memory=, cores=, log_directory=, job_extra_directives=...)."""
    from dask_jobqueue import SLURMCluster
    load_config()
    return SLURMCluster(config_name=f"flashkm-{kind}", **overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("k", type=int)
    p.add_argument("model")
    p.add_argument("--jobs", type=int, default=2, help="Slurm jobs = Dask workers (default 2)")
    p.add_argument("--cpu", action="store_true", help="CPU workers ('flashkm-cpu') instead of one GPU per job")
    p.add_argument("--queue", help="partition (default: jobqueue.yaml)")
    p.add_argument("--account")
    p.add_argument("--walltime")
    p.add_argument("--memory", help="memory per job, e.g. 64GB")
    p.add_argument("--cores", type=int, help="CPU cores per job")
    p.add_argument("--log-directory", help="where the jobs' output goes")
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--init", default="k-means||")
    p.add_argument("--labels", help="also write the labels (.npy or .zarr)")
    args = p.parse_args(argv)

    from distributed import Client

    from flashkm_dist import KMeans
    from flashkm_dist.io import describe, open_array, write_array

    overrides = {k: v for k, v in dict(queue=args.queue, account=args.account, walltime=args.walltime,
                                       memory=args.memory, cores=args.cores,
                                       log_directory=args.log_directory).items() if v is not None}
    with make_cluster("cpu" if args.cpu else "gpu", **overrides) as cluster, Client(cluster) as client:
        print(cluster.job_script())
        cluster.scale(jobs=args.jobs)
        t0 = time.perf_counter()
        client.wait_for_workers(args.jobs, timeout=1800)
        jobs = sorted(cluster.workers)
        print(f"{args.jobs} workers up in {time.perf_counter() - t0:.1f} s, Slurm jobs "
              f"{', '.join(cluster.workers[j].job_id for j in jobs)}", flush=True)
        X = open_array(args.input, min_chunks=args.jobs)
        print(f"data: {args.input}: {describe(X)}", flush=True)
        km = KMeans(args.k, init=args.init, random_state=args.random_state).fit(X, client=client)
        km.save(args.model)
        print(f"fit: {km.n_iter_} iterations, inertia {km.inertia_:.6g}; model: {args.model}", flush=True)
        if args.labels:
            print(f"labels: {write_array(km.labels_, args.labels)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
