"""Lloyd's loop with scikit-learn's semantics, over the exact steps of `engine`.

Convergence as in scikit-learn: stop on a strict "no label changed", or when the summed squared centre shift is
<= tol (already scaled by the mean feature variance); without a strict stop a last assignment makes the labels match
the returned centres. Empty clusters take the points farthest from their centres (ties: lowest index), moved
inside the exact sums, so re-seeding is deterministic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from flashkm_dist.engine import FitNumerics
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference


@dataclass
class LloydResult:
    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    history: list = field(default_factory=list)


def reseed_empty_clusters(engine, blocks, centers: torch.Tensor, numerics: FitNumerics,
                          partials: reference.Partials) -> reference.Partials:
    """Empty clusters take the rows farthest from their centres (an extra pass over the rows, unless the step
    kept candidates: `Engine.farthest`)."""
    empty = empty_clusters(partials)
    if empty.numel() == 0:
        return partials
    return move_to_empty(partials, engine.farthest(blocks, centers, numerics, empty.numel()))


def empty_clusters(partials: reference.Partials) -> torch.Tensor:
    return torch.nonzero(fp.to_float(partials.weights, partials.scale.weight_exp) == 0).flatten()


def move_to_empty(partials: reference.Partials, far) -> reference.Partials:
    """The farthest rows (a `streaming.Farthest`) become the empty clusters, in order, inside the exact sums."""
    empty = empty_clusters(partials)
    n = min(empty.numel(), far.rows.shape[0])
    if n == 0:
        return partials
    dev = partials.sums.device
    return reference.move_points(partials, far.rows[:n].to(dev), far.weights[:n].to(dev), far.labels[:n].to(dev),
                                 empty[:n])


def next_centers(partials: reference.Partials, centers: torch.Tensor, metric: str) -> tuple[torch.Tensor, float]:
    """The Lloyd update (empty clusters already re-seeded) and the summed squared shift from `centers`."""
    new, shift = update_on_device(partials, centers, metric)
    return new, float(shift)


def update_on_device(partials: reference.Partials, centers: torch.Tensor, metric: str):
    """`next_centers` without waiting: the new centres and their shift (0-d float64) on the partials' device.
    Both are elementwise or exact sums, so any device gives the same bits."""
    return update_with_weights(partials, centers, metric)[:2]


def update_with_weights(partials: reference.Partials, centers: torch.Tensor, metric: str):
    """`update_on_device` and the clusters' weights (float64, K), which the update computes anyway."""
    new, weights = reference.finalize(partials, dtype=centers.dtype, metric=metric,
                                      previous=centers.to(partials.sums.device))
    return new, shift_tensor(new, centers), weights


@dataclass
class Iteration:
    """One Lloyd iteration's outcome on the host side."""

    step: object  # the settled `streaming.EngineStep`
    centers: torch.Tensor  # the next centres
    inertia: float  # of the labels this iteration found (NaN when the step skipped settled host rows)
    shift: float  # summed squared move to the next centres


def lloyd_iteration(engine, blocks, centers: torch.Tensor, numerics: FitNumerics) -> Iteration:
    """Step, update and the scalars of one iteration with one wait for the device: the update is made as if no
    cluster were empty, and redone (after re-seeding) only when one is, which the same read-back tells."""
    return finish_iteration(engine, blocks, centers, numerics, *iteration_on_device(engine, blocks, centers,
                                                                                    numerics))


def iteration_on_device(engine, blocks, centers: torch.Tensor, numerics: FitNumerics):
    """The device half of `lloyd_iteration`, queued without waiting: (step, next centres, packed), where packed
    is one int64 vector: the step's pending values, the number of empty clusters, then inertia and shift as
    float64 bits (what the host half reads back in one transfer)."""
    step = engine.step(blocks, centers, numerics, wait=False)
    new, shift, weights = update_with_weights(step.partials, centers, numerics.metric)
    floats = torch.stack([fp.to_float(step.inertia, numerics.scale.dist_exp), shift])
    return step, new, torch.cat([step.pending(), (weights == 0).sum().reshape(1), floats.view(torch.int64)])


def finish_iteration(engine, blocks, centers: torch.Tensor, numerics: FitNumerics, step, new: torch.Tensor,
                     packed: torch.Tensor) -> Iteration:
    """The host half: read `packed` back (the one wait), raise what the kernels found, re-seed if needed."""
    host = packed.cpu()
    ints, (inertia, shift) = host[:-2].tolist(), host[-2:].view(torch.float64).tolist()
    step.settle(ints[:-1])
    if not step.inertia_complete:
        inertia = float("nan")
    if ints[-1]:  # empty clusters
        partials = reseed_empty_clusters(engine, blocks, centers, numerics, step.partials)
        new, shift = next_centers(partials, centers, numerics.metric)
    return Iteration(step, new, inertia, shift)


def center_shift(new: torch.Tensor, centers: torch.Tensor) -> float:
    return float(shift_tensor(new, centers))


def shift_tensor(new: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Summed squared move of the centres (float64, 0-d, on new's device, not waited for), as an exact sum:
    the same bits on any device."""
    return fp.exact_total((new.to(torch.float64) - centers.to(new.device, torch.float64)) ** 2)


def _joined(labels: list) -> torch.Tensor:
    return labels[0] if len(labels) == 1 else torch.cat([l.to(labels[0].device) for l in labels])


def run_lloyd(engine, blocks, centers: torch.Tensor, numerics: FitNumerics, *, max_iter: int = 300,
              tol: float = 0.0, verbose: bool = False, desc: str = "k-means") -> LloydResult:
    """Lloyd iterations of `engine` over `blocks` from `centers` (compute dtype) until convergence or max_iter.
    Rows resident on one GPU iterate as a replayed CUDA graph (`graphed`) once the kernels are compiled."""
    from flashkm_dist.graphed import GraphedIteration  # (it builds on this module's iteration halves)
    iterate = GraphedIteration(engine, blocks, numerics)
    history, strict = [], False
    bar = tqdm(total=max_iter, desc=desc, disable=not verbose, leave=False)
    for i in range(max_iter):
        t0 = time.perf_counter()
        it = iterate(centers)
        history.append({"iteration": i + 1, "inertia": it.inertia, "center_shift": it.shift,
                        "labels_changed": it.step.n_changed, "seconds": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(inertia=f"{it.inertia:.6g}", shift=f"{it.shift:.3g}")
        converged_centers, centers = centers, it.centers
        if it.step.n_changed == 0:
            strict = True
            break
        if it.shift <= tol:
            break
    bar.close()
    inertia = it.inertia
    if not (strict and torch.equal(converged_centers, centers)) or it.inertia != it.inertia:
        # labels (and inertia: of every row) of the returned centres
        step = engine.step(blocks, centers, numerics, complete=True)
        inertia = float(fp.to_float(step.inertia, numerics.scale.dist_exp))
    return LloydResult(centers, _joined(engine.labels(blocks)), inertia, i + 1, history)
