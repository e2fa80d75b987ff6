"""Checkpoints of a distributed fit: enough to resume on a new client and reach the same bits.

Written after every iteration (atomically: a temporary file in the same folder, then a rename): the run and
iteration, the centres the next step starts from and those of the step before (to count changed labels), the
random state after the run's seeding, the fixed-point bound of the run, the history, and the best run so far.
A fingerprint of the parameters and of the data (shape, dtype, exact column means) guards against resuming a
different fit.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from flashkm_dist._validation import host_numpy

FORMAT = 1


def fingerprint(model, X, dtype: torch.dtype, seeding) -> dict:
    init = model.init if isinstance(model.init, str) else "array" if not callable(model.init) else "callable"
    rs = model.random_state
    mean = [] if seeding.shift is None else [float(v) for v in seeding.shift.cpu()]
    return {"n_clusters": model.n_clusters, "init": init, "n_init": str(model.n_init), "max_iter": model.max_iter,
            "tol": float(model.tol), "metric": model.metric, "random_state": rs if isinstance(rs, int) else None,
            "oversampling_factor": float(model.oversampling_factor), "shape": [int(n) for n in X.shape],
            "dtype": str(dtype), "mean": mean, "mean_variance": seeding.mean_variance}


@dataclass
class Best:
    centers: torch.Tensor
    inertia: float
    n_iter: int
    history: list


@dataclass
class Resume:
    run: int
    iteration: int  # iterations done in this run (0: the run has not started; seed it)
    centers: torch.Tensor | None
    previous: torch.Tensor | None
    centroid_max_abs: float
    rng_state: tuple
    history: list
    best: Best | None


def _write(path, meta: dict, arrays: dict) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".flashkm-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Writer:
    """The `on_iteration` callback of one run: gathers the two small centre arrays and writes the file."""

    def __init__(self, path, fp: dict, run: int, rng_state: tuple, max_abs: float, best):
        self.path, self.fp, self.run, self.rng_state, self.max_abs = path, fp, run, rng_state, max_abs
        self.best = best

    def _save(self, run: int, iteration: int, centers, previous, history, best) -> None:
        name, keys, pos, has_gauss, gauss = self.rng_state
        meta = {"format": FORMAT, "fingerprint": self.fp, "run": run, "iteration": iteration,
                "centroid_max_abs": self.max_abs, "history": history, "dtype": self.fp["dtype"],
                "rng": [name, int(pos), int(has_gauss), float(gauss)],
                "best": None if best is None else {"inertia": best.inertia, "n_iter": best.n_iter,
                                                   "history": best.history}}
        arrays = {"rng_keys": np.asarray(keys)}
        for key, t in (("centers", centers), ("previous", previous),
                       ("best_centers", None if best is None else best.centers)):
            if t is not None:
                arrays[key] = host_numpy(t)
        _write(self.path, meta, arrays)

    def __call__(self, iteration: int, centres, history) -> None:
        """After an iteration: the (new, current) centres (the next step's and this one's) as tensors, or a
        callable that fetches them (the Dask reduction keeps them on the workers until asked)."""
        new, current = centres() if callable(centres) else centres
        self._save(self.run, iteration, new, current, history, self.best)

    def run_done(self, best, n_init: int) -> None:
        self._save(self.run + 1, 0, None, None, [], best)


def read(path, fp: dict) -> Resume | None:
    """The saved state, or None when there is no file yet; an error when it belongs to another fit."""
    if path is None or not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        if meta["fingerprint"] != fp:
            changed = sorted(k for k in fp if meta["fingerprint"].get(k) != fp[k])
            raise ValueError(f"{path} is the checkpoint of a different fit (differs in: {', '.join(changed)}); "
                             "delete it or pass another checkpoint path")
        dtype = getattr(torch, meta["dtype"].removeprefix("torch."))

        def tensor(key):
            return torch.as_tensor(f[key]).to(dtype) if key in f.files else None

        name, pos, has_gauss, gauss = meta["rng"]
        b = meta["best"]
        best = None if b is None else Best(tensor("best_centers"), b["inertia"], b["n_iter"], b["history"])
        return Resume(meta["run"], meta["iteration"], tensor("centers"), tensor("previous"),
                      meta["centroid_max_abs"], (name, f["rng_keys"].copy(), pos, has_gauss, gauss),
                      meta["history"], best)
