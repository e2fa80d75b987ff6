"""Seeding: greedy k-means++, k-means|| (Bahmani et al. 2012), random rows, a given array, or a callable.

Written against `Points` (passes over the rows, a gather of chosen rows) so the same code seeds device-resident
data, data streamed from the host and, through the same operations, data spread over workers. Rows are drawn by
inverse CDF on a cumulative mass, so weights behave exactly like repeated rows for k-means++ and k-means||: a row
of weight 3 owns the same stretch of the cumulative mass as three copies of it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from flashkm_dist.engine import FitNumerics
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import run_lloyd
from flashkm_dist.points import Points, local_points
from flashkm_dist.streaming import Block, Engine

N_PARALLEL_ROUNDS = 5  # Bahmani et al.: about five oversampled rounds suffice in practice
RECLUSTER_MAX_ITER = 100


def kmeans_plusplus(points: Points, n_clusters: int, rng, numerics: FitNumerics, *, n_local_trials=None):
    """scikit-learn's greedy k-means++: each new centre is the best of 2 + log(k) D^2-sampled candidates (best:
    the lowest exact potential, ties to the first candidate)."""
    trials = n_local_trials or 2 + int(math.log(n_clusters))
    chosen = [int(points.sample(rng, 1, "weight", numerics)[0])]
    points.start_closest(points.rows(chosen), numerics, "exact", reset=True)
    for _ in range(1, n_clusters):
        candidates = points.sample(rng, trials, "closest", numerics)
        best = int(torch.argmin(points.trial(points.rows(candidates), numerics)))
        chosen.append(int(candidates[best]))
        points.commit(best, numerics)
    return points.rows(chosen)


def random_rows(points: Points, n_clusters: int, rng):
    """scikit-learn's 'random': distinct rows, uniformly or with probability proportional to the weight."""
    if not points.weighted:
        idx = rng.permutation(points.n_samples)[:n_clusters]
    else:
        p = points.weight_vector().numpy()
        if np.count_nonzero(p) < n_clusters:
            raise ValueError(f"init='random' needs at least n_clusters={n_clusters} samples of positive weight, "
                             f"got {np.count_nonzero(p)}")
        idx = rng.choice(points.n_samples, size=n_clusters, replace=False, p=p / p.sum())
    return points.rows(torch.as_tensor(idx))


def kmeans_parallel(points: Points, n_clusters: int, rng, numerics: FitNumerics, *, oversampling_factor=2.0,
                    tol: float = 1e-4, n_rounds: int = N_PARALLEL_ROUNDS):
    """k-means||: a few rounds that each draw l = oversampling_factor * k rows by D^2 mass (inverse CDF, the
    expected count of Bahmani et al.'s Bernoulli rounds, and exact under weights = repetition), then the distinct
    candidates, weighted by the mass nearest to each, are re-clustered with weighted k-means++ and Lloyd where
    the shards compute (only candidates move)."""
    chosen = points.sample(rng, 1, "weight", numerics)
    points.start_closest(points.rows(chosen), numerics, "assign", reset=True)
    per_round = max(1, math.ceil(oversampling_factor * n_clusters))
    for _ in range(n_rounds):
        if points.closest_total(numerics) <= 0:
            break
        new = points.sample(rng, per_round, "closest", numerics)
        chosen = torch.cat([chosen, new])
        points.start_closest(points.rows(new), numerics, "assign")
    candidates = torch.unique(points.rows(chosen), dim=0)  # by value, sorted: independent of row order/copies
    if candidates.shape[0] < n_clusters:  # too few distinct rows: top up by weight (duplicates re-seed later)
        extra = points.rows(points.sample(rng, n_clusters - candidates.shape[0], "weight", numerics))
        candidates = torch.cat([candidates, extra])
    if candidates.shape[0] == n_clusters:
        return candidates
    weights = points.nearest_mass(candidates, numerics)
    centers, state = points.shards.run_here(recluster, candidates, weights, n_clusters, rng.get_state(),
                                            numerics.metric, tol)
    rng.set_state(state)
    return centers.to(candidates.device)


def recluster(candidates: torch.Tensor, weights: torch.Tensor, n_clusters: int, rng_state, metric: str,
              tol: float, *, device) -> tuple[torch.Tensor, tuple]:
    """k-means||'s last stage on one device: weighted k-means++ then Lloyd over the candidates. The random state
    travels in and out, so running it on a worker draws exactly what running it here would."""
    rng = np.random.RandomState()
    rng.set_state(rng_state)
    engine = Engine(device, dtype=candidates.dtype)
    local = local_points(engine, [Block(candidates.to(engine.device), weights.to(engine.device))])
    cand_numerics = local.numerics(metric)
    seeds = kmeans_plusplus(local, n_clusters, rng, cand_numerics)
    result = run_lloyd(engine, local.shards.blocks, seeds, cand_numerics, max_iter=RECLUSTER_MAX_ITER,
                       tol=tol * cand_numerics.mean_variance)
    return result.centers, rng.get_state()


def check_init_array(centers, n_clusters: int, n_features: int):
    """The init array as float64 (a tensor stays a tensor on its device: checked there, not copied to the host
    and back), or ValueError naming what is wrong."""
    if torch.is_tensor(centers):
        arr = centers.detach()
        real = not arr.is_complex()
    else:
        arr = np.asarray(centers)
        real = arr.dtype.kind in "fiub"
    if not real or arr.ndim != 2 or tuple(arr.shape) != (n_clusters, n_features):
        raise ValueError(f"init array must have shape (n_clusters={n_clusters}, n_features={n_features}) and a "
                         f"real dtype, got shape {tuple(arr.shape)} and dtype {arr.dtype}")
    arr = arr.to(torch.float64) if torch.is_tensor(arr) else arr.astype(np.float64)
    finite = bool(torch.isfinite(arr).all()) if torch.is_tensor(arr) else np.isfinite(arr).all()
    if not finite:
        raise ValueError("init array contains NaN or infinity")
    return arr


def initial_centers(init, points: Points, n_clusters: int, rng, numerics: FitNumerics, *,
                    oversampling_factor=2.0, tol=1e-4) -> torch.Tensor:
    """Centres in the compute dtype on the client's device (unit rows for cosine) for any supported `init`.
    A callable receives `points.as_array()` (in process: the rows as float64 NumPy; on Dask: the Dask array)."""
    if isinstance(init, str) and init == "k-means++":
        centers = kmeans_plusplus(points, n_clusters, rng, numerics)
    elif isinstance(init, str) and init == "k-means||":
        centers = kmeans_parallel(points, n_clusters, rng, numerics, oversampling_factor=oversampling_factor,
                                  tol=tol)
    elif isinstance(init, str) and init == "random":
        centers = random_rows(points, n_clusters, rng)
    else:
        if callable(init):
            init = init(points.as_array(), n_clusters, random_state=rng)
        centers = torch.as_tensor(check_init_array(init, n_clusters, points.n_features), device=points.shards.device)
    if numerics.metric == "cosine":
        centers = reference.unit_rows(centers)
    return centers.to(points.shards.dtype)
