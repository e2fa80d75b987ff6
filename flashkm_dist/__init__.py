"""flashkm_dist: exact k-means from one GPU to a Dask cluster of GPU nodes."""
from flashkm_dist.batched import batched_kmeans
from flashkm_dist.estimator import KMeans

__version__ = "0.1.0"
__all__ = ["KMeans", "batched_kmeans", "__version__"]
