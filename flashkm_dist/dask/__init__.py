"""The distributed fit and lazy outputs for Dask arrays (used by `flashkm_dist.KMeans` when X is one)."""
from __future__ import annotations


def is_dask_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "dask" and hasattr(x, "map_blocks")
