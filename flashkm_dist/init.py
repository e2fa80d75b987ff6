"""Seeding: greedy k-means++, k-means|| (Bahmani et al. 2012), random rows, a given array, or a callable.

Written against two operations, "distances to a few centres" and "sample rows by mass" (inverse CDF on a cumulative
sum), so that weights behave exactly like repeated rows for k-means++ and k-means||: a row of weight 3 owns the same
stretch of the cumulative mass as three copies of it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from flashkm_dist.engine import REFERENCE, Backend, FitNumerics, numerics_for
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import run_lloyd
from flashkm_dist.streaming import Block, Engine

N_PARALLEL_ROUNDS = 5  # Bahmani et al.: about five oversampled rounds suffice in practice
RECLUSTER_MAX_ITER = 100


def sample_by_mass(rng: np.random.RandomState, mass: torch.Tensor, n: int) -> torch.Tensor:
    """n row indices drawn with probability proportional to `mass` (float64, >= 0), by inverse CDF."""
    cum = torch.cumsum(mass.to(torch.float64), 0)
    u = torch.as_tensor(rng.uniform(size=n) * float(cum[-1]), dtype=torch.float64, device=mass.device)
    return torch.searchsorted(cum, u, right=True).clamp_(max=mass.shape[0] - 1)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)


def kmeans_plusplus(x, n_clusters: int, rng, numerics: FitNumerics, *, weights=None, n_local_trials=None):
    """scikit-learn's greedy k-means++: each new centre is the best of 2 + log(k) D^2-sampled candidates."""
    w = _ones(x) if weights is None else weights.to(torch.float64)
    trials = n_local_trials or 2 + int(math.log(n_clusters))
    dist = lambda centers: reference.distances(x, centers, metric=numerics.metric, shift=numerics.shift)
    chosen = [int(sample_by_mass(rng, w, 1)[0])]
    closest = dist(x[chosen])[:, 0]
    for _ in range(1, n_clusters):
        candidates = sample_by_mass(rng, w * closest, trials)
        d = torch.minimum(closest[:, None], dist(x[candidates]))
        best = int(torch.argmin((d * w[:, None]).sum(dim=0)))
        chosen.append(int(candidates[best]))
        closest = d[:, best]
    return x[chosen].clone()


def random_rows(x, n_clusters: int, rng, *, weights=None):
    """scikit-learn's 'random': distinct rows, uniformly or with probability proportional to the weight."""
    if weights is None:
        idx = rng.permutation(x.shape[0])[:n_clusters]
    else:
        p = weights.to(torch.float64).cpu().numpy()
        if np.count_nonzero(p) < n_clusters:
            raise ValueError(f"init='random' needs at least n_clusters={n_clusters} samples of positive weight, "
                             f"got {np.count_nonzero(p)}")
        idx = rng.choice(x.shape[0], size=n_clusters, replace=False, p=p / p.sum())
    return x[torch.as_tensor(idx, device=x.device)].clone()


def kmeans_parallel(x, n_clusters: int, rng, numerics: FitNumerics, *, weights=None, oversampling_factor=2.0,
                    tol: float = 1e-4, backend: Backend = REFERENCE, n_rounds: int = N_PARALLEL_ROUNDS):
    """k-means||: a few rounds that each draw l = oversampling_factor * k rows by D^2 mass (inverse CDF, the
    expected count of Bahmani et al.'s Bernoulli rounds, and exact under weights = repetition), then the distinct
    candidates, weighted by the mass nearest to each, are re-clustered with weighted k-means++ and Lloyd."""
    w = _ones(x) if weights is None else weights.to(torch.float64)
    assign = lambda centers: backend.assign(x, centers, metric=numerics.metric, shift=numerics.shift)
    chosen = sample_by_mass(rng, w, 1)
    closest = assign(x[chosen])[1].to(torch.float64)
    per_round = max(1, math.ceil(oversampling_factor * n_clusters))
    for _ in range(n_rounds):
        if float((w * closest).sum()) <= 0:
            break
        new = sample_by_mass(rng, w * closest, per_round)
        chosen = torch.cat([chosen, new])
        closest = torch.minimum(closest, assign(x[new])[1].to(torch.float64))
    candidates = torch.unique(x[chosen], dim=0)  # by value, in sorted order: independent of row order/copies
    if candidates.shape[0] < n_clusters:  # too few distinct rows: top up by weight (duplicates re-seed later)
        candidates = torch.cat([candidates, x[sample_by_mass(rng, w, n_clusters - candidates.shape[0])]])
    if candidates.shape[0] == n_clusters:
        return candidates
    labels = assign(candidates)[0]
    exp = numerics.scale.weight_exp
    mass = torch.zeros((2, candidates.shape[0]), dtype=torch.int64, device=x.device)
    cand_weights = fp.to_float(mass.index_add_(1, labels, fp.quantize(w, exp)), exp)
    cand_numerics = numerics_for(candidates, cand_weights, metric=numerics.metric)
    seeds = kmeans_plusplus(candidates, n_clusters, rng, cand_numerics, weights=cand_weights)
    engine = Engine(candidates.device, dtype=candidates.dtype, backend=backend)
    return run_lloyd(engine, [Block(candidates, cand_weights)], seeds, cand_numerics, max_iter=RECLUSTER_MAX_ITER,
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


def initial_centers(init, x, n_clusters: int, rng, numerics: FitNumerics, *, weights=None,
                    oversampling_factor=2.0, tol=1e-4, backend: Backend = REFERENCE) -> torch.Tensor:
    """Centres in x's dtype and device (unit rows for cosine) for any supported `init`."""
    if isinstance(init, str) and init == "k-means++":
        centers = kmeans_plusplus(x, n_clusters, rng, numerics, weights=weights)
    elif isinstance(init, str) and init == "k-means||":
        centers = kmeans_parallel(x, n_clusters, rng, numerics, weights=weights,
                                  oversampling_factor=oversampling_factor, tol=tol, backend=backend)
    elif isinstance(init, str) and init == "random":
        centers = random_rows(x, n_clusters, rng, weights=weights)
    else:
        given = init(x.detach().cpu().to(torch.float64).numpy(), n_clusters, random_state=rng) if callable(init) \
            else init
        centers = torch.as_tensor(check_init_array(given, n_clusters, x.shape[1]), device=x.device)
    if numerics.metric == "cosine":
        centers = reference.unit_rows(centers)
    return centers.to(x.dtype)
