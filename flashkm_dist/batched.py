"""Many independent small k-means problems on one device, one kernel launch per step for all of them.

The video-generation case of the Flash-KMeans paper: x of shape (B, N, D). Every problem keeps the estimator's
rules (exact labels, exact sums, scikit-learn's convergence per problem; a finished problem's centres freeze) while
the assignment and the partial sums run batched: labels of problem b become b * K + label, so one sort-inverse
update serves all B.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from sklearn.utils import check_random_state

from flashkm_dist import _validation as v
from flashkm_dist.engine import (DataBounds, FitNumerics, backend_for, column_moments, fit_scale, moment_exponents,
                                 moment_statistics)
from flashkm_dist.graphed import Replay, resident
from flashkm_dist.init import check_init_array, initial_centers
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.kernels.checks import DeferredChecks
from flashkm_dist.lloyd import reseed_empty_clusters
from flashkm_dist.points import local_points
from flashkm_dist.streaming import Block, Engine


# share of an op-by-op iteration spent queuing launches above which its later iterations replay a CUDA graph
# (H100, B=32, N=75600, K=1000: half was not enough for the graph to repay its capture over 10 iterations)
LAUNCH_BOUND = 0.8


@dataclass
class BatchedResult:
    labels: torch.Tensor  # (B, N) int64
    centroids: torch.Tensor  # (B, K, D)
    n_iter: torch.Tensor  # (B,) int64
    inertia: torch.Tensor  # (B,) float64


_NOT_FINITE = "x must be a finite floating-point tensor (no NaN or infinity)"


def _problem_moments(x: torch.Tensor):
    """Bounds and exact per-problem moments (2, B, D) on one shared fixed-point grid (the batch's max |x|)."""
    b, n, d = x.shape
    # one pass for the finiteness check and max |x| = max(-min, max) (exact; NaN and inf show in the extremes)
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(_NOT_FINITE)
    bounds = DataBounds(n, d, max(-lo, hi), 1.0)
    problem = torch.arange(b, device=x.device).repeat_interleave(n)
    return bounds, *column_moments(x.reshape(b * n, d), moment_exponents(bounds), problem, b)


def _problem_numerics(moments, metric: str, centroid_max_abs: float) -> list[FitNumerics]:
    """Per-problem shift and tolerance base (all problems at once: one read-back, not one per problem)."""
    bounds, sums, squares = moments
    mean, variance = moment_statistics(bounds, sums, squares)
    scale = fit_scale(bounds, metric, centroid_max_abs)
    # (each problem's mean variance reduced exactly as the estimator's fit_numerics reduces its own)
    mean_variances = torch.stack([variance[i].mean() for i in range(variance.shape[0])]).tolist()
    return [FitNumerics(metric, None if metric == "cosine" else mean[i], scale, mean_variance)
            for i, mean_variance in enumerate(mean_variances)]


def batched_kmeans(x, n_clusters: int, *, init="k-means++", max_iter: int = 300, tol: float = 1e-4,
                   random_state=None, metric: str = "euclidean", oversampling_factor: float = 2.0,
                   device=None) -> BatchedResult:
    """k-means on each x[b] of a (B, N, D) tensor (or array). `init` as in KMeans; an array init has shape
    (B, K, D). Returns labels (B, N), centroids (B, K, D) in x's dtype, n_iter (B,) and inertia (B,)."""
    x = torch.as_tensor(x) if not torch.is_tensor(x) else x
    if x.dim() != 3 or 0 in x.shape:
        raise ValueError(f"x must have shape (B, N, D) with B, N, D >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():  # (finite: checked with the moments, in the same pass as max |x|)
        raise ValueError(_NOT_FINITE)
    if device is not None:
        x = x.to(v.parse_device(device, x.device))
    b, n, d = x.shape
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be an integer in [1, n_samples={n}], got {n_clusters!r}")
    if not isinstance(max_iter, int) or max_iter < 1 or not tol >= 0:
        raise ValueError(f"max_iter must be an integer >= 1 and tol >= 0, got {max_iter!r}, {tol!r}")
    reference.check_metric(metric)
    if metric == "cosine":
        x = reference.unit_rows(x).to(x.dtype)
    k, backend, rng = n_clusters, backend_for(x.device), check_random_state(random_state)

    moments = _problem_moments(x)
    if not isinstance(init, str) and not callable(init):
        init = torch.as_tensor(init)
        if init.shape != (b, k, d):
            raise ValueError(f"an init array for batched_kmeans must have shape (B, K, D) = {(b, k, d)}, "
                             f"got {tuple(init.shape)}")
    engine = Engine(x.device, dtype=x.dtype, backend=backend)
    if isinstance(init, str) or callable(init):  # (seeding numerics: what the seeding's distances need)
        seeding = _problem_numerics(moments, metric, 0.0)
        centers = torch.stack([initial_centers(init, local_points(engine, [Block(x[i])]), k, rng, seeding[i],
                                               oversampling_factor=oversampling_factor, tol=tol) for i in range(b)])
    else:  # all problems' arrays checked and moved at once, as initial_centers does for one
        centers = torch.as_tensor(check_init_array(init.reshape(b * k, d), b * k, d), device=x.device)
        centers = (reference.unit_rows(centers) if metric == "cosine" else centers).reshape(b, k, d).to(x.dtype)
    numerics = _problem_numerics(moments, metric, float(centers.abs().max()))
    shift = None if metric == "cosine" else torch.stack([nm.shift for nm in numerics])
    tols = torch.tensor([tol * nm.mean_variance for nm in numerics], dtype=torch.float64, device=x.device)
    scale, offsets = numerics[0].scale, (torch.arange(b, device=x.device) * k)[:, None]

    state = _Progress(centers, torch.ones(b, dtype=torch.bool, device=x.device),
                      torch.zeros(b, dtype=torch.int64, device=x.device))
    kept = backend.kept_rows(x)  # (the rows' prepared operands, made once for all iterations)
    assign = functools.partial(backend.assign, **({} if kept is None else {"rows": kept}))
    on_device = functools.partial(_iteration_on_device, assign, backend, x, offsets, k, scale, tols, metric,
                                  shift)
    # the device half as one CUDA graph, once an op-by-op iteration with previous labels (kernels compiled) showed
    # that queuing its launches takes nearly all of its time (small problems); a device-bound one gains nothing
    replay = Replay(lambda c, active, n_iter, prev, it: on_device(_Progress(c, active, n_iter), prev, it), x.device,
                    2 * x.numel() * x.element_size())
    replay.failed |= not resident(x.device, [x])
    prev, launch_bound = None, False
    for it in range(1, max_iter + 1):
        out, start = None, time.perf_counter()
        if launch_bound and not replay.failed:
            out = replay(state.centers, state.active, state.n_iter, prev,
                         torch.tensor(it, dtype=torch.int64).to(x.device, non_blocking=True))
        labels, partials, after, packed, checks = out or on_device(state, prev, it)
        queued = time.perf_counter()
        # one wait per iteration: empty clusters anywhere, problems still running, the kernels' checks
        any_empty, running, *found = packed.tolist()
        if out is None and prev is not None:
            launch_bound = queued - start > LAUNCH_BOUND * (time.perf_counter() - start)
        checks.verify(found)
        if any_empty:  # (rare) re-seed, then redo the update from the re-seeded sums
            partials = _relocate_per_problem(partials, engine, x, state.centers, numerics, k)
            after = _advance(state, partials, labels, prev, tols, it, metric)
            running = bool(after.active.any())
        # (a replay's outputs are overwritten by the next replay only after they were copied into its inputs)
        state, prev = after, labels
        if not running:
            break
    centers, n_iter = state.centers, state.n_iter
    labels, min_dist = assign(x, centers, metric=metric, shift=shift)
    inertia = fp.to_float(fp.quantize(min_dist.to(torch.float64), scale.dist_exp).sum(dim=2), scale.dist_exp)
    return BatchedResult(labels, centers, n_iter, inertia)


def _iteration_on_device(assign, backend, x, offsets, k: int, scale, tols, metric: str, shift, state: "_Progress",
                         prev, it):
    """The device half of a batched iteration, without waiting: labels, partials, the next state, and one int64
    vector to read back (any empty cluster, any problem still running, then the kernels' checks)."""
    b, n, d = x.shape
    labels, _ = assign(x, state.centers, metric=metric, shift=shift)
    checks = DeferredChecks()
    partials = backend.partial_sums(x.reshape(b * n, d), (labels + offsets).reshape(-1), b * k, scale=scale,
                                    deferred=checks)
    weights = fp.to_float(partials.weights, partials.scale.weight_exp)
    after = _advance(state, partials, labels, prev, tols, it, metric)
    flags = torch.stack([(weights == 0).any(), after.active.any()]).to(torch.int64)
    return labels, partials, after, torch.cat([flags, checks.values(x.device)]), checks


@dataclass
class _Progress:
    """Per-problem state of the batched loop, all on the device."""

    centers: torch.Tensor  # (B, K, D)
    active: torch.Tensor  # (B,) bool: still iterating
    n_iter: torch.Tensor  # (B,) int64


def _advance(state: _Progress, partials: reference.Partials, labels, prev, tols, it: int, metric: str) -> _Progress:
    """The update of every problem still running (a finished problem's centres freeze), without waiting."""
    b, k, d = state.centers.shape
    new, _ = reference.finalize(partials, dtype=state.centers.dtype, metric=metric,
                                previous=state.centers.reshape(b * k, d))
    new = new.reshape(b, k, d)
    moved = ((new.to(torch.float64) - state.centers.to(torch.float64)) ** 2).sum(dim=(1, 2))
    unchanged = torch.zeros_like(state.active) if prev is None else (labels == prev).all(dim=1)
    active = state.active
    return _Progress(torch.where(active[:, None, None], new, state.centers),
                     active & ~unchanged & (moved > tols),
                     torch.where(active, it, state.n_iter))  # (it: an int, or a 0-d tensor in a graph)


def _relocate_per_problem(partials: reference.Partials, engine: Engine, x, centers, numerics, k: int):
    """Re-seed empty clusters problem by problem (rare: only problems that have one pay for it)."""
    weights = fp.to_float(partials.weights, partials.scale.weight_exp).reshape(-1, k)
    for i in torch.nonzero((weights == 0).any(dim=1)).flatten().tolist():
        part = reference.Partials(partials.sums[:, i * k:(i + 1) * k], partials.weights[:, i * k:(i + 1) * k],
                                  partials.scale)
        moved = reseed_empty_clusters(engine, [Block(x[i])], centers[i], numerics[i], part)
        partials.sums[:, i * k:(i + 1) * k] = moved.sums
        partials.weights[:, i * k:(i + 1) * k] = moved.weights
    return partials
