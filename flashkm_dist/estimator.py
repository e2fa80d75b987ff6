"""KMeans: a scikit-learn estimator over the exact engine, in process, on the CPU or one GPU.

Thin by design (as scikit-learn's own): parameters and attributes here, numerics in `engine`, `lloyd` and `init`.
"""
from __future__ import annotations

import json
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from flashkm_dist import _validation as v
from flashkm_dist.dask import is_dask_array
from flashkm_dist.engine import backend_for, unit_rows_like
from flashkm_dist.init import initial_centers
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import run_lloyd
from flashkm_dist.points import local_points
from flashkm_dist.streaming import Block, Engine

INIT_METHODS = ("k-means++", "k-means||", "random")
ALGORITHMS = ("lloyd", "hamerly", "elkan")  # 'elkan' (scikit-learn's bounded variant) runs as 'hamerly'
SAVE_FORMAT = 1


class KMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """Exact k-means (Lloyd) with scikit-learn's semantics and bitwise order-free centroid updates.

    Parameters follow ``sklearn.cluster.KMeans``; in addition ``init='k-means||'`` (scalable seeding with
    ``oversampling_factor``), ``metric='cosine'`` (spherical k-means: unit rows, renormalised centres,
    distance 1 - cos), ``device`` ('auto', 'cpu', 'cuda', 'cuda:N') and ``dtype`` (compute dtype: float16,
    bfloat16, float32 or float64; default the input's float dtype, integers as float64).
    ``algorithm``: 'lloyd' (default) scores every row against every centre at each iteration; 'hamerly' (or
    scikit-learn's 'elkan') keeps a lower bound per row on its distance to the other centres and scores only the
    rows whose label the bounds cannot settle: the same centres and labels to the bit, and the same exact
    inertia, with far less work once a fit settles (euclidean only; each iteration then waits for the device once
    per four chunks of rows held on the device). Rows streamed from the host that the bounds settle are not even
    copied: the GPU reads only the others, in place; such an iteration's inertia in ``history_`` is NaN (it never
    saw the skipped rows), and a last full pass gives ``inertia_``.

    For Dask arrays (fitted on the Dask cluster, same bits as in process): ``checkpoint`` (a .npz path written
    each iteration), ``resume`` (continue from it) and ``allreduce`` ('dask': reduction tasks; 'chained': one task
    per worker and iteration that sums every worker's partials itself, one scheduler hop per iteration instead of
    two; 'auto', the default: chained on up to 4 workers of one host, else 'dask'; these survive a lost worker,
    recomputing at most the iterations since the last anchor of the centres, once a minute; 'nccl': the workers
    all-reduce among themselves with torch.distributed, NCCL on GPU workers and Gloo on CPU workers, for the
    lowest per-iteration overhead, but a lost worker fails the fit).

    Attributes: ``cluster_centers_`` (NumPy; float32 for bfloat16), ``labels_`` (NumPy int64), ``inertia_``,
    ``n_iter_``, ``n_features_in_`` and ``history_`` (per iteration of the kept run: inertia of the centres it
    started from, squared centre shift, labels changed, seconds).
    """

    def __init__(self, n_clusters=8, *, init="k-means++", n_init="auto", max_iter=300, tol=1e-4, verbose=0,
                 random_state=None, metric="euclidean", device="auto", dtype=None, oversampling_factor=2.0,
                 checkpoint=None, resume=False, allreduce="auto", algorithm="lloyd"):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.metric = metric
        self.device = device
        self.dtype = dtype
        self.oversampling_factor = oversampling_factor
        self.checkpoint = checkpoint
        self.resume = resume
        self.allreduce = allreduce
        self.algorithm = algorithm

    # ----------------------------------------------------------------------------------------------- checks
    def _check_params(self, n_samples: int) -> int:
        """Validate the parameters against the data; return the number of initialisations to run."""
        def is_int(value):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        if not is_int(self.n_clusters) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {self.n_clusters!r}")
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}.")
        if not is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not isinstance(self.tol, numbers.Real) or isinstance(self.tol, bool) or not self.tol >= 0:
            raise ValueError(f"tol must be a real number >= 0, got {self.tol!r}")
        if not isinstance(self.oversampling_factor, numbers.Real) or not self.oversampling_factor > 0:
            raise ValueError(f"oversampling_factor must be > 0, got {self.oversampling_factor!r}")
        reference.check_metric(self.metric)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.bounded and self.metric != "euclidean":
            raise ValueError(f"algorithm={self.algorithm!r} bounds euclidean distances; use algorithm='lloyd' "
                             f"with metric={self.metric!r}")
        v.parse_dtype(self.dtype)
        if isinstance(self.init, str):
            if self.init not in INIT_METHODS:
                raise ValueError(f"init must be one of {INIT_METHODS}, an array of shape (n_clusters, n_features) "
                                 f"or a callable; got {self.init!r}")
        elif not callable(self.init) and not hasattr(self.init, "__array__") and not isinstance(self.init, list):
            raise ValueError(f"init must be one of {INIT_METHODS}, an array or a callable; got {type(self.init)}")
        if self.n_init == "auto":
            return 10 if (isinstance(self.init, str) and self.init == "random") or callable(self.init) else 1
        if not is_int(self.n_init) or self.n_init < 1:
            raise ValueError(f"n_init must be 'auto' or an integer >= 1, got {self.n_init!r}")
        if not isinstance(self.init, str) and not callable(self.init) and self.n_init != 1:
            warnings.warn(f"Explicit initial center position passed: performing only one init in {type(self).__name__}"
                          f" instead of n_init={self.n_init}.", RuntimeWarning, stacklevel=3)
            return 1
        return self.n_init

    @property
    def bounded(self) -> bool:
        """Whether fits take bounded steps (`algorithm` 'hamerly' or 'elkan')."""
        return self.algorithm in ("hamerly", "elkan")

    def _tensor(self, X):
        """X for predict/transform/score: checked against the fit, on the compute device in the fit's dtype."""
        x, kind, _ = v.to_tensor(self, X, reset=False, device=self.device, dtype=self._compute_dtype)
        return (unit_rows_like(x) if self.metric == "cosine" else x), kind

    # ----------------------------------------------------------------------------------------------- fit
    def fit(self, X, y=None, sample_weight=None, *, client=None):
        """Compute the clustering. ``sample_weight`` acts exactly like repeating rows. Data on the host with a
        GPU device stays on the host and streams through the engine (cached on the GPU as far as it fits).

        A Dask array X is clustered on the Dask cluster (``client`` or the current ``distributed.Client``) with
        the same bits as in process; ``labels_`` is then a lazy Dask array and ``checkpoint``/``resume`` apply.
        """
        if is_dask_array(X):
            return self._fit_dask(X, sample_weight, client)
        if self.checkpoint is not None or self.resume:
            raise ValueError("checkpoint/resume apply to fits of Dask arrays (distributed fits) only")
        x, _, device = v.to_tensor(self, X, reset=True, device=self.device, dtype=self.dtype, keep_on_host=True)
        n_init = self._check_params(x.shape[0])
        weights = v.check_sample_weight(sample_weight, x.shape[0], x.device)
        streamed = x.device != device
        if self.metric == "cosine" and not streamed:
            x = unit_rows_like(x)
        engine = Engine(device, dtype=x.dtype, backend=backend_for(device),
                        unit_rows=self.metric == "cosine" and streamed, bounds=self.bounded,
                        skip_settled=self.bounded)
        points = local_points(engine, [Block(x, weights)])
        rng = check_random_state(self.random_state)
        seeding = points.numerics(self.metric)
        best = None
        for run in range(n_init):
            centers = initial_centers(self.init, points, self.n_clusters, rng, seeding,
                                      oversampling_factor=self.oversampling_factor, tol=self.tol)
            numerics = points.numerics(self.metric, centroid_max_abs=float(centers.abs().max()))
            engine.forget_labels()
            result = run_lloyd(engine, points.shards.blocks, centers, numerics, max_iter=self.max_iter,
                               tol=self.tol * numerics.mean_variance, verbose=bool(self.verbose),
                               desc=f"k-means run {run + 1}/{n_init}")
            if best is None or result.inertia < best.inertia:
                best = result
        self._keep_result(best, seeding, x.dtype)
        self.labels_ = best.labels.cpu().numpy()
        distinct = len(np.unique(self.labels_))
        if distinct < self.n_clusters:
            warnings.warn(f"Number of distinct clusters ({distinct}) found smaller than n_clusters "
                          f"({self.n_clusters}). Possibly due to duplicate points in X.", ConvergenceWarning,
                          stacklevel=2)
        return self

    def _fit_dask(self, X, sample_weight, client):
        from flashkm_dist.dask import driver, outputs
        best, seeding, dtype, X = driver.fit(self, X, sample_weight, client, self.allreduce)
        self._keep_result(best, seeding, dtype)
        self.labels_ = outputs.predict(self, X)
        return self

    def _keep_result(self, best, seeding, dtype: torch.dtype) -> None:
        """The fitted attributes every fit sets (labels_ differ: NumPy in process, lazy for Dask)."""
        self._compute_dtype = str(dtype).removeprefix("torch.")
        self._shift = None if seeding.shift is None else seeding.shift.cpu().numpy()
        self.cluster_centers_ = v.host_numpy(best.centers)
        self.inertia_, self.n_iter_, self.history_ = best.inertia, best.n_iter, best.history

    # ----------------------------------------------------------------------------------------------- use
    def _fitted_parts(self, X):
        check_is_fitted(self)
        x, kind = self._tensor(X)
        centers = torch.as_tensor(self.cluster_centers_).to(device=x.device, dtype=x.dtype)
        shift = None if self._shift is None else torch.as_tensor(self._shift, device=x.device)
        return x, kind, centers, shift

    def predict(self, X):
        """Index of the nearest centre (exact per the numerics contract); same array type as X (NumPy for
        array-likes, torch on X's device, CuPy)."""
        if is_dask_array(X):
            from flashkm_dist.dask import outputs
            check_is_fitted(self)
            return outputs.predict(self, X)
        x, kind, centers, shift = self._fitted_parts(X)
        labels, _ = backend_for(x.device).assign(x, centers, metric=self.metric, shift=shift)
        return _as_kind(labels, kind)

    def transform(self, X):
        """Distances to every centre: euclidean (not squared, as scikit-learn) or cosine distance 1 - cos.
        float64 for float64 data, float32 otherwise. Lazy for Dask arrays."""
        if is_dask_array(X):
            from flashkm_dist.dask import outputs
            check_is_fitted(self)
            return outputs.transform(self, X)
        x, kind, centers, shift = self._fitted_parts(X)
        d = reference.distances(x, centers, metric=self.metric, shift=shift)
        if self.metric == "euclidean":
            d = d.sqrt()
        return _as_kind(d.to(torch.float64 if x.dtype == torch.float64 else torch.float32), kind)

    def fit_transform(self, X, y=None, sample_weight=None, *, client=None):
        return self.fit(X, sample_weight=sample_weight, client=client).transform(X)

    def fit_predict(self, X, y=None, sample_weight=None, *, client=None):
        """Labels of X after fitting (lazy for Dask arrays)."""
        return self.fit(X, sample_weight=sample_weight, client=client).labels_

    def score(self, X, y=None, sample_weight=None):
        """Opposite of the (weighted) sum of squared distances to the nearest centre."""
        if is_dask_array(X):
            from flashkm_dist.dask import outputs
            check_is_fitted(self)
            return outputs.score(self, X, sample_weight)
        x, _, centers, shift = self._fitted_parts(X)
        _, min_dist = backend_for(x.device).assign(x, centers, metric=self.metric, shift=shift)
        weights = v.check_sample_weight(sample_weight, x.shape[0], x.device)
        min_dist = min_dist.to(torch.float64)
        return -float((min_dist if weights is None else min_dist * weights).sum())

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ----------------------------------------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write a portable .npz (no pickle): centres, centring shift, parameters and fit metadata."""
        check_is_fitted(self)
        params = self.get_params()
        init = params.pop("init")
        random_state = params.pop("random_state")
        meta = {
            "format": SAVE_FORMAT, "params": params,
            "init": init if isinstance(init, str) else None,
            "random_state": random_state if isinstance(random_state, (int, type(None))) else None,
            "n_iter": self.n_iter_, "inertia": self.inertia_, "n_features_in": self.n_features_in_,
            "compute_dtype": self._compute_dtype, "history": self.history_,
            "feature_names_in": list(getattr(self, "feature_names_in_", [])) or None,
        }
        arrays = {"cluster_centers": self.cluster_centers_, "meta": np.array(json.dumps(meta))}
        if self._shift is not None:
            arrays["shift"] = self._shift
        if not isinstance(init, str) and not callable(init):
            arrays["init"] = np.asarray(init)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "KMeans":
        """Read a model written by `save`; it predicts and transforms as the saved one did."""
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != SAVE_FORMAT:
                raise ValueError(f"{path}: unknown model format {meta.get('format')!r}")
            init = f["init"] if "init" in f.files else meta["init"] or "k-means++"
            model = cls(init=init, random_state=meta["random_state"], **meta["params"])
            model.cluster_centers_ = f["cluster_centers"]
            model._shift = f["shift"] if "shift" in f.files else None
        model.n_iter_, model.inertia_ = meta["n_iter"], meta["inertia"]
        model.n_features_in_, model._compute_dtype = meta["n_features_in"], meta["compute_dtype"]
        model.history_ = meta["history"]
        if meta["feature_names_in"]:
            model.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
        return model


def _as_kind(t: torch.Tensor, kind: str):
    if kind == "torch":
        return t
    if kind == "cupy":
        import cupy
        return cupy.from_dlpack(t)
    return t.cpu().numpy()
