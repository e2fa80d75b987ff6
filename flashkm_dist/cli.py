"""The `flashkm` command: fit and predict on files with a Dask cluster, and the demo.

    flashkm fit INPUT -k K -o MODEL.npz [--labels OUT.npy|OUT.zarr] [estimator options] [cluster options]
    flashkm predict MODEL.npz INPUT -o OUT.npy|OUT.zarr [cluster options]
    flashkm demo [demo options]
    flashkm shutdown --scheduler-file F | --scheduler-address A

INPUT is anything `flashkm_dist.io.open_array` reads: data.npy, a folder of .npy shards, a zarr store
(store.zarr, store.zarr:/array) or an HDF5 dataset (file.h5:/dataset). The cluster is the scheduler named by
--scheduler-file / --scheduler-address, else a local one: `dask_cuda.LocalCUDACluster` (one worker per GPU) when
GPUs are visible and dask-cuda is installed, else `distributed.LocalCluster` (one single-threaded worker per core).

Exit status: 0 success, 2 a usage or input error (message only; FLASHKM_DEBUG=1 shows the traceback),
130 interrupted, 1 anything else (with its traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

import numpy as np

from flashkm_dist.io import InputError, check_target, describe, open_array

INIT_CHOICES = ("k-means++", "k-means||", "random")
DTYPES = ("float16", "bfloat16", "float32", "float64")


class UsageError(InputError):
    """A bad combination of options."""


# ------------------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _n_init(text: str):
    return text if text == "auto" else _positive_int(text)


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a local cluster on this machine)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--scheduler-file", metavar="FILE",
                       help="connect to the scheduler that wrote FILE (dask scheduler --scheduler-file FILE)")
    where.add_argument("--scheduler-address", metavar="ADDR", help="connect to the scheduler at ADDR (tcp://host:8786)")
    g.add_argument("--n-workers", type=_positive_int, metavar="N",
                   help="local cluster: workers (default: one per GPU, or one per CPU core without GPUs)")
    g.add_argument("--cluster-config", metavar="YAML",
                   help="local cluster: keyword arguments from a YAML file, under 'local-cuda-cluster:' "
                        "(LocalCUDACluster) or 'local-cluster:' (LocalCluster); see cluster-configs/local-cuda.yaml")
    g.add_argument("--wait-workers", type=_positive_int, metavar="N",
                   help="wait until the scheduler file exists and N workers are connected (batch jobs)")
    g.add_argument("--wait-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the scheduler and for --wait-workers (default 60)")
    g.add_argument("--chunk-rows", type=_positive_int, metavar="ROWS",
                   help="rows per Dask chunk (default: about 128 MiB, at least one chunk per worker)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashkm", description="Exact k-means on GPUs and Dask clusters.",
                                     epilog="Run 'flashkm COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    fit = sub.add_parser("fit", help="fit k-means to a dataset and save the model",
                         description="Fit k-means to INPUT on a Dask cluster and save the model (.npz).")
    fit.add_argument("input", metavar="INPUT", help="data.npy, a folder of .npy files, store.zarr[:/array], "
                                                    "file.h5:/dataset")
    fit.add_argument("-k", "--n-clusters", type=_positive_int, required=True, metavar="K", help="number of clusters")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL.npz", help="where to save the fitted model")
    fit.add_argument("--labels", metavar="OUT", help="also write the labels of INPUT (.npy, .zarr or .zarr:/name)")
    e = fit.add_argument_group("estimator (as flashkm_dist.KMeans)")
    e.add_argument("--init", default="k-means||", metavar="METHOD",
                   help="k-means++, k-means|| (default), random, or a .npy file of initial centres (K x features)")
    e.add_argument("--n-init", type=_n_init, default="auto", metavar="N", help="runs with different seeds ('auto')")
    e.add_argument("--max-iter", type=_positive_int, default=300, metavar="N", help="iterations per run (300)")
    e.add_argument("--tol", type=float, default=1e-4, help="relative tolerance on the centre shift (1e-4)")
    e.add_argument("--random-state", type=int, default=None, metavar="SEED", help="seed (default: unseeded)")
    e.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
    e.add_argument("--device", default="auto", help="auto (workers' GPU, else CPU), cpu, cuda")
    e.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the data's float dtype)")
    e.add_argument("--oversampling-factor", type=float, default=2.0, metavar="L", help="k-means|| candidates (2.0)")
    e.add_argument("--allreduce", choices=("auto", "dask", "chained", "nccl"), default="auto",
                   help="dask: reduction tasks; chained: one task per worker and iteration (one scheduler hop "
                        "instead of two); auto (default): chained on up to 4 workers of one host, else dask; "
                        "nccl: workers all-reduce directly (a lost worker fails the fit)")
    e.add_argument("--algorithm", choices=("lloyd", "hamerly"), default="lloyd",
                   help="lloyd (default): score every row every iteration; hamerly: per-row bounds skip the rows "
                        "whose label cannot change (same result, less work once the fit settles; euclidean)")
    e.add_argument("--sample-weight", metavar="WEIGHTS", help="per-row weights, 1-D, in any INPUT format")
    e.add_argument("--checkpoint", metavar="FILE.npz", help="write a checkpoint after every iteration")
    e.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _cluster_options(fit)

    pred = sub.add_parser("predict", help="label a dataset with a saved model",
                          description="Label every row of INPUT with the nearest centre of MODEL.")
    pred.add_argument("model", metavar="MODEL", help="a model saved by 'flashkm fit' (or KMeans.save)")
    pred.add_argument("input", metavar="INPUT", help="data in any format that 'flashkm fit' reads")
    pred.add_argument("-o", "--output", required=True, metavar="OUT", help="labels: .npy, .zarr or .zarr:/name")
    pred.add_argument("--distances", metavar="OUT", help="also write the distances to every centre (.npy/.zarr)")
    _cluster_options(pred)

    demo = sub.add_parser("demo", add_help=False, help="fit synthetic blobs on a local cluster and report",
                          description="The demo; 'flashkm demo --help' lists its options.")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)

    stop = sub.add_parser("shutdown", help="shut down a scheduler and its workers (end of a batch job)")
    where = stop.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler-file", metavar="FILE")
    where.add_argument("--scheduler-address", metavar="ADDR")
    stop.add_argument("--wait-timeout", type=float, default=30.0, metavar="SECONDS")
    return parser


# ------------------------------------------------------------------------------------------------- cluster
def _read_cluster_config(path: str) -> tuple[str, dict]:
    import yaml
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    sections = [k for k in ("local-cuda-cluster", "local-cluster") if k in (config if isinstance(config, dict) else {})]
    if len(sections) != 1 or not isinstance(config[sections[0]], dict):
        raise InputError(f"{path}: expected one mapping under 'local-cuda-cluster:' or 'local-cluster:'")
    return sections[0], dict(config[sections[0]])


def _gpus_usable() -> bool:
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def make_local_cluster(n_workers: int | None = None, config_path: str | None = None):
    """LocalCUDACluster when GPUs are visible and dask-cuda imports (or the config asks for it), else LocalCluster
    with one single-threaded worker process per usable core."""
    kind, kwargs = _read_cluster_config(config_path) if config_path else (None, {})
    if n_workers is not None:
        kwargs["n_workers"] = n_workers
    kwargs.setdefault("dashboard_address", ":0")
    kwargs.setdefault("silence_logs", logging.ERROR)
    if kind == "local-cuda-cluster" or (kind is None and _gpus_usable()):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise InputError("a LocalCUDACluster needs dask-cuda (pip install 'flashkm-dist[gpu]')") from None
        return LocalCUDACluster(**kwargs)
    from distributed import LocalCluster
    kwargs.setdefault("n_workers", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                      os.cpu_count() or 1)
    kwargs.setdefault("threads_per_worker", 1)
    kwargs.setdefault("processes", True)
    return LocalCluster(**kwargs)


def _wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise InputError(f"scheduler file {path} does not exist"
                             + (f" (waited {timeout:g} s)" if timeout > 0 else ""))
        time.sleep(0.25)


@contextlib.contextmanager
def connect(args):
    """A distributed.Client for the command's cluster options; a local cluster is closed afterwards."""
    from distributed import Client
    cluster = None
    timeout = max(float(args.wait_timeout), 1.0)
    if args.scheduler_file:
        where = f"the scheduler of {args.scheduler_file}"
    elif args.scheduler_address:
        where = f"the scheduler at {args.scheduler_address}"
    else:
        where = "the local cluster"
    try:
        if args.scheduler_file:
            _wait_for_file(args.scheduler_file, args.wait_timeout if getattr(args, "wait_workers", None) else 0)
            client = Client(scheduler_file=args.scheduler_file, timeout=timeout)
        elif args.scheduler_address:
            client = Client(args.scheduler_address, timeout=timeout)
        else:
            cluster = make_local_cluster(args.n_workers, args.cluster_config)
            client = Client(cluster)
    except (OSError, TimeoutError) as err:
        if cluster is not None:
            cluster.close()
        raise InputError(f"cannot connect to {where}: {err}") from None
    try:
        if getattr(args, "wait_workers", None):
            try:
                client.wait_for_workers(args.wait_workers, timeout=args.wait_timeout)
            except TimeoutError:
                have = len(client.nthreads())
                raise InputError(f"only {have} of {args.wait_workers} workers connected within "
                                 f"{args.wait_timeout:g} s") from None
        else:
            client.wait_for_workers(1, timeout=max(args.wait_timeout, 30.0))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _n_workers(client) -> int:
    return len(client.nthreads())


def _open(source: str, args, n_workers: int = 1):
    return open_array(source, chunk_rows=args.chunk_rows, min_chunks=n_workers)


# ------------------------------------------------------------------------------------------------- commands
def _model_path(path: str) -> str:
    path = path if path.endswith(".npz") else path + ".npz"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: folder {folder} is not writable")
    return path


def _init(value: str):
    if value in INIT_CHOICES:
        return value
    if os.path.exists(value):
        try:
            return np.load(value, allow_pickle=False)
        except ValueError as err:
            raise InputError(f"--init {value}: not a .npy array of centres ({err})") from None
    raise UsageError(f"--init must be one of {', '.join(INIT_CHOICES)} or a .npy file of centres; got {value!r}")


def _fit(args) -> int:
    from flashkm_dist import KMeans
    model_path = _model_path(args.output)
    if args.labels:
        check_target(args.labels)
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint FILE (the checkpoint to continue from)")
    if args.checkpoint:
        _model_path(args.checkpoint)
    init = _init(args.init)
    x = _open(args.input, args)  # fail on a bad path before starting a cluster
    if x.ndim != 2:
        raise InputError(f"{args.input}: k-means needs a 2-D array (rows x features), got shape {x.shape}")
    if args.sample_weight:
        w = open_array(args.sample_weight)
        if w.ndim != 1 or w.shape[0] != x.shape[0]:
            raise InputError(f"{args.sample_weight}: expected {x.shape[0]} weights (1-D), got shape {w.shape}")
    if x.shape[0] < args.n_clusters:
        raise InputError(f"{args.input} has {x.shape[0]} rows, fewer than the {args.n_clusters} clusters asked for")
    model = KMeans(args.n_clusters, init=init, n_init=args.n_init, max_iter=args.max_iter, tol=args.tol,
                   verbose=0 if args.quiet else 1, random_state=args.random_state, metric=args.metric,
                   device=args.device, dtype=args.dtype, oversampling_factor=args.oversampling_factor,
                   checkpoint=args.checkpoint, resume=args.resume, allreduce=args.allreduce,
                   algorithm=args.algorithm)
    with connect(args) as client:
        n_workers = _n_workers(client)
        if args.chunk_rows is None and x.numblocks[0] < n_workers:
            x = _open(args.input, args, n_workers)
        weights = None
        if args.sample_weight:
            weights = open_array(args.sample_weight, chunk_rows=args.chunk_rows).rechunk((x.chunks[0],))
        print(f"data: {args.input}: {describe(x)}; {n_workers} worker{'s' if n_workers != 1 else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            model.fit(x, sample_weight=weights, client=client)
        except KeyboardInterrupt:
            if args.checkpoint:
                print(f"interrupted; continue with --checkpoint {args.checkpoint} --resume", file=sys.stderr)
            raise
        seconds = time.perf_counter() - t0
        model.save(model_path)
        print(f"fit: {args.n_clusters} clusters, {model.n_iter_} iterations, inertia {model.inertia_:.6g}, "
              f"{seconds:.1f} s", flush=True)
        print(f"model: {model_path}")
        if args.labels:
            where = _write(model.labels_, args.labels)
            print(f"labels: {where}")
    return 0


def _write(x, target: str) -> str:
    from flashkm_dist.io import write_array
    return write_array(x, target)


def _load_model(path: str):
    from flashkm_dist import KMeans
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        return KMeans.load(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a model saved by flashkm ({err})") from None


def _predict(args) -> int:
    model = _load_model(args.model)
    check_target(args.output)
    if args.distances:
        check_target(args.distances)
    x = _open(args.input, args)
    if x.ndim != 2 or x.shape[1] != model.n_features_in_:
        got = f"{x.shape[1]} features" if x.ndim == 2 else f"shape {x.shape}"
        raise InputError(f"{args.input} has {got}, but the model {args.model} was fitted on "
                         f"{model.n_features_in_} features")
    with connect(args) as client:
        n_workers = _n_workers(client)
        if args.chunk_rows is None and x.numblocks[0] < n_workers:
            x = _open(args.input, args, n_workers)
        print(f"data: {args.input}: {describe(x)}; {n_workers} worker{'s' if n_workers != 1 else ''}", flush=True)
        t0 = time.perf_counter()
        where = _write(model.predict(x), args.output)
        print(f"labels: {where} ({time.perf_counter() - t0:.1f} s)")
        if args.distances:
            print(f"distances: {_write(model.transform(x), args.distances)}")
    return 0


def _shutdown(args) -> int:
    from distributed import Client
    if args.scheduler_file:
        _wait_for_file(args.scheduler_file, args.wait_timeout)
    try:
        client = (Client(scheduler_file=args.scheduler_file, timeout=args.wait_timeout) if args.scheduler_file
                  else Client(args.scheduler_address, timeout=args.wait_timeout))
    except (OSError, TimeoutError) as err:
        raise InputError(f"cannot connect to the scheduler: {err}") from None
    client.shutdown()
    print("scheduler and workers shut down")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        from flashkm_dist import demo
        return demo.main(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"fit": _fit, "predict": _predict, "shutdown": _shutdown}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("flashkm: interrupted", file=sys.stderr)
        return 130
    except (InputError, ValueError, FileNotFoundError, PermissionError) as err:
        if os.environ.get("FLASHKM_DEBUG"):
            raise
        print(f"flashkm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
