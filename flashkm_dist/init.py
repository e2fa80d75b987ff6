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
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import run_lloyd
from flashkm_dist.points import Points
from flashkm_dist.streaming import Block, Engine

N_PARALLEL_ROUNDS = 5  # Bahmani et al.: about five oversampled rounds suffice in practice
RECLUSTER_MAX_ITER = 100


def sample_by_mass(rng: np.random.RandomState, mass: torch.Tensor, n: int) -> torch.Tensor:
    """n row indices drawn with probability proportional to `mass` (float64, >= 0), by inverse CDF."""
    cum = torch.cumsum(mass.to(torch.float64), 0)
    u = torch.as_tensor(rng.uniform(size=n) * float(cum[-1]), dtype=torch.float64, device=mass.device)
    return torch.searchsorted(cum, u, right=True).clamp_(max=mass.shape[0] - 1)


def kmeans_plusplus(points: Points, n_clusters: int, rng, numerics: FitNumerics, *, n_local_trials=None):
    """scikit-learn's greedy k-means++: each new centre is the best of 2 + log(k) D^2-sampled candidates."""
    w = points.mass()
    trials = n_local_trials or 2 + int(math.log(n_clusters))
    chosen = [int(sample_by_mass(rng, w, 1)[0])]
    closest = points.distances(points.rows(chosen), numerics.metric)[:, 0]
    for _ in range(1, n_clusters):
        candidates = sample_by_mass(rng, w * closest, trials)
        d = torch.minimum(closest[:, None], points.distances(points.rows(candidates), numerics.metric))
        best = int(torch.argmin((d * w[:, None]).sum(dim=0)))
        chosen.append(int(candidates[best]))
        closest = d[:, best]
    return points.rows(chosen)


def random_rows(points: Points, n_clusters: int, rng):
    """scikit-learn's 'random': distinct rows, uniformly or with probability proportional to the weight."""
    if points.weights is None:
        idx = rng.permutation(points.n_samples)[:n_clusters]
    else:
        p = points.weights.cpu().numpy()
        if np.count_nonzero(p) < n_clusters:
            raise ValueError(f"init='random' needs at least n_clusters={n_clusters} samples of positive weight, "
                             f"got {np.count_nonzero(p)}")
        idx = rng.choice(points.n_samples, size=n_clusters, replace=False, p=p / p.sum())
    return points.rows(torch.as_tensor(idx))


def kmeans_parallel(points: Points, n_clusters: int, rng, numerics: FitNumerics, *, oversampling_factor=2.0,
                    tol: float = 1e-4, n_rounds: int = N_PARALLEL_ROUNDS):
    """k-means||: a few rounds that each draw l = oversampling_factor * k rows by D^2 mass (inverse CDF, the
    expected count of Bahmani et al.'s Bernoulli rounds, and exact under weights = repetition), then the distinct
    candidates, weighted by the mass nearest to each, are re-clustered with weighted k-means++ and Lloyd."""
    w = points.mass()
    chosen = sample_by_mass(rng, w, 1)
    closest = points.nearest(points.rows(chosen), numerics)[1]
    per_round = max(1, math.ceil(oversampling_factor * n_clusters))
    for _ in range(n_rounds):
        if float((w * closest).sum()) <= 0:
            break
        new = sample_by_mass(rng, w * closest, per_round)
        chosen = torch.cat([chosen, new])
        closest = torch.minimum(closest, points.nearest(points.rows(new), numerics)[1])
    candidates = torch.unique(points.rows(chosen), dim=0)  # by value, sorted: independent of row order/copies
    if candidates.shape[0] < n_clusters:  # too few distinct rows: top up by weight (duplicates re-seed later)
        candidates = torch.cat([candidates, points.rows(sample_by_mass(rng, w, n_clusters - candidates.shape[0]))])
    if candidates.shape[0] == n_clusters:
        return candidates
    labels = points.nearest(candidates, numerics)[0]
    exp = numerics.scale.weight_exp
    mass = torch.zeros((2, candidates.shape[0]), dtype=torch.int64, device=w.device)
    cand_weights = fp.to_float(mass.index_add_(1, labels, fp.quantize(w, exp)), exp)
    engine = Engine(candidates.device, dtype=candidates.dtype, backend=points.engine.backend)
    local = Points(engine, [Block(candidates, cand_weights)])
    cand_numerics = local.numerics(numerics.metric)
    seeds = kmeans_plusplus(local, n_clusters, rng, cand_numerics)
    return run_lloyd(engine, local.blocks, seeds, cand_numerics, max_iter=RECLUSTER_MAX_ITER,
                     tol=tol * cand_numerics.mean_variance).centers


def check_init_array(centers, n_clusters: int, n_features: int) -> np.ndarray:
    arr = centers.detach().cpu().to(torch.float64).numpy() if torch.is_tensor(centers) else np.asarray(centers)
    if arr.dtype.kind not in "fiub" or arr.ndim != 2 or arr.shape != (n_clusters, n_features):
        raise ValueError(f"init array must have shape (n_clusters={n_clusters}, n_features={n_features}) and a "
                         f"real dtype, got shape {arr.shape} and dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("init array contains NaN or infinity")
    return arr


def initial_centers(init, points: Points, n_clusters: int, rng, numerics: FitNumerics, *,
                    oversampling_factor=2.0, tol=1e-4) -> torch.Tensor:
    """Centres in the engine's compute dtype and device (unit rows for cosine) for any supported `init`.
    A callable receives the rows as a float64 NumPy array (it runs on the client, like scikit-learn's)."""
    if isinstance(init, str) and init == "k-means++":
        centers = kmeans_plusplus(points, n_clusters, rng, numerics)
    elif isinstance(init, str) and init == "k-means||":
        centers = kmeans_parallel(points, n_clusters, rng, numerics, oversampling_factor=oversampling_factor,
                                  tol=tol)
    elif isinstance(init, str) and init == "random":
        centers = random_rows(points, n_clusters, rng)
    else:
        if callable(init):
            everything = points.rows(torch.arange(points.n_samples))
            init = init(everything.cpu().to(torch.float64).numpy(), n_clusters, random_state=rng)
        centers = torch.as_tensor(check_init_array(init, n_clusters, points.n_features), device=points.engine.device)
    if numerics.metric == "cosine":
        centers = reference.unit_rows(centers)
    return centers.to(points.engine.dtype)
