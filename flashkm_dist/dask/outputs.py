"""Lazy outputs on Dask arrays: labels, distances and score, computed per chunk where the chunk lives."""
from __future__ import annotations

import numpy as np

from flashkm_dist.dask import worker


def _checked(model, X):
    if X.ndim != 2 or X.shape[1] != model.n_features_in_:
        raise ValueError(f"X has {X.shape[1] if X.ndim == 2 else X.shape} features, but {type(model).__name__} "
                         f"is expecting {model.n_features_in_} features as input.")
    if X.numblocks[1] != 1:
        X = X.rechunk({1: -1})
    return X, (model.cluster_centers_, model._shift, model.metric, model._compute_dtype, _device(model))


def _device(model) -> str:
    return model.device if model.device in ("auto", "cpu") else "auto"


def _meta(X, dtype, ndim: int = 1):
    """An empty chunk of the output's array type (CuPy for CuPy-backed X) for Dask's bookkeeping."""
    meta = getattr(X, "_meta", None)
    if meta is not None and type(meta).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy.empty((0,) * ndim, dtype=dtype)
    return np.empty((0,) * ndim, dtype=dtype)


def predict(model, X):
    """Lazy int64 labels with X's row chunks."""
    X, args = _checked(model, X)
    return X.map_blocks(worker.predict_block, *args, drop_axis=1, dtype=np.int64, meta=_meta(X, np.int64),
                        name="flashkm-predict")


def transform(model, X):
    """Lazy distances to every centre, chunks (X's rows, K)."""
    X, args = _checked(model, X)
    dtype = np.float64 if model._compute_dtype == "float64" else np.float32
    return X.map_blocks(worker.transform_block, *args, chunks=(X.chunks[0], (model.n_clusters,)), dtype=dtype,
                        meta=_meta(X, dtype, 2), name="flashkm-transform")


def score(model, X, sample_weight=None) -> float:
    """Opposite of the (weighted) sum of distances to the nearest centre, computed on the cluster."""
    import dask.array as da
    X, args = _checked(model, X)
    d = X.map_blocks(worker.min_dist_block, *args, drop_axis=1, dtype=np.float64, name="flashkm-score")
    if sample_weight is not None:
        w = sample_weight if isinstance(sample_weight, da.Array) else da.from_array(np.asarray(sample_weight))
        d = d * w.astype(np.float64).rechunk((X.chunks[0],))
    return -float(d.sum().compute())
