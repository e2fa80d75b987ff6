"""The kernels' backends and the per-fit numerics every Lloyd step shares, on every device.

`FitNumerics` fixes, once per fit, what must be identical on every device: the centring shift (translation
invariance of the distances) and the fixed-point grids (order-free sums), so partials from any device, chunk or
worker add to the same bits. The per-device engine that runs the steps is `streaming.Engine`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.kernels.checks import DeferredChecks


@dataclass(frozen=True)
class Backend:
    """The two kernels of a Lloyd step: reference twins on the CPU, Triton kernels on CUDA."""

    name: str
    assign: Callable
    partial_sums: Callable
    prepared_rows: Callable | None = None  # makes what `assign(rows=...)` keeps across calls (None: no such thing)
    assign_lower: Callable | None = None  # assign plus lower bounds on the other centroids (bounded steps)
    bounded_rows: Callable | None = None  # which rows a bounded step must score again (`kernels.bounds`)
    prepare_centroids: Callable | None = None  # (centroids, rows) before a euclidean step's assignments: work on
    #                                            the centroids all of them share (FlashAssign's neighbour table)
    settle_rows: Callable | None = None  # bounded_rows, and the rows it leaves settled from a neighbour table

    def kept_rows(self, x: torch.Tensor):
        """A fresh `prepared_rows()` for repeated assignments of the rows x when the backend keeps rows and, on a
        GPU, they take at most a quarter of the device memory free now; None otherwise. (On the CPU only the
        interpreted Triton backend of the tests keeps rows.)"""
        if self.prepared_rows is None:
            return None
        if x.device.type == "cuda":
            if x.numel() // x.shape[-1] * prepared_row_bytes(x.shape[-1]) > torch.cuda.mem_get_info(x.device)[0] // 4:
                return None
        return self.prepared_rows()


def prepared_row_bytes(d: int) -> int:
    """Device memory a row's kept `PreparedRows` take (fp16 operands, norms, padding), a bound."""
    return 2 * max(16, d) + 64


REFERENCE = Backend("reference", reference.assign, reference.partial_sums,
                    assign_lower=reference.assign_lower, bounded_rows=reference.bounded_rows,
                    settle_rows=reference.settle_rows)


def _triton_backend():
    try:
        from flashkm_dist.kernels.assign import PreparedRows, flash_assign
        from flashkm_dist.kernels.bounds import bounded_rows, settle_rows
        from flashkm_dist.kernels.neighbours import prepare
        from flashkm_dist.kernels.update import sort_inverse_update
    except ImportError:
        return None
    return Backend("triton", flash_assign, sort_inverse_update, PreparedRows,
                   partial(flash_assign, lower_bound=True), bounded_rows, prepare, settle_rows)


def backend_for(device: torch.device) -> Backend:
    """Triton kernels on CUDA devices; the reference on the CPU unless FLASHKM_TRITON=1 (with TRITON_INTERPRET=1,
    the documented way to run the Triton path on CPU tensors in tests)."""
    wants_triton = torch.device(device).type == "cuda" or os.environ.get("FLASHKM_TRITON") == "1"
    return (_triton_backend() or REFERENCE) if wants_triton else REFERENCE


@dataclass(frozen=True)
class FitNumerics:
    """Per-fit constants shared by every step and every device."""

    metric: str
    shift: torch.Tensor | None  # float64 (D,): data mean for euclidean, None for cosine
    scale: fp.FixedPointScale
    mean_variance: float  # mean per-feature variance (scikit-learn's tolerance base)

    def __reduce__(self):
        """Pickled with the shift as bytes (on the host): every Dask task of a fit carries these constants, and
        the scheduler pickles each task it sends, on the hop between iterations; a pickled tensor costs some
        thirty times as much to pickle and to load."""
        shift = None if self.shift is None else (self.shift.detach().cpu().numpy().tobytes(), _name(self.shift))
        return _numerics, (self.metric, shift, self.scale, self.mean_variance)


def _name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _numerics(metric: str, shift: tuple | None, scale: fp.FixedPointScale, mean_variance: float) -> FitNumerics:
    if shift is not None:
        shift = torch.frombuffer(bytearray(shift[0]), dtype=getattr(torch, shift[1]))
    return FitNumerics(metric, shift, scale, mean_variance)


@dataclass
class DataBounds:
    """Order-free facts of the data (maxima), gathered in one pass before the exact moments."""

    n_samples: int
    n_features: int
    max_abs: float
    max_weight: float

    def __add__(self, other: "DataBounds") -> "DataBounds":
        return DataBounds(self.n_samples + other.n_samples, self.n_features, _max(self.max_abs, other.max_abs),
                          _max(self.max_weight, other.max_weight))


def _max(a: float, b: float) -> float:
    """max that keeps a NaN (Python's max(0.0, nan) is 0.0), so bad data is reported instead of hidden."""
    return a if a != a or a >= b else b


def data_bounds(x: torch.Tensor, weights: torch.Tensor | None) -> DataBounds:
    max_abs = float(x.abs().max()) if x.numel() else 0.0
    max_w = 1.0 if weights is None else (float(weights.max()) if weights.numel() else 0.0)
    return DataBounds(x.shape[0], x.shape[1], max_abs, max_w)


def moment_exponents(bounds: DataBounds) -> tuple[int, int]:
    return fp.exponent_for(bounds.max_abs), fp.exponent_for(bounds.max_abs ** 2)


def column_moments(x: torch.Tensor, exps: tuple[int, int], groups: torch.Tensor | None = None,
                   n_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact limbs (2, D) of the per-feature sums of x and x^2 (unweighted, as scikit-learn's tolerance), or
    (2, n_groups, D) per group of rows. The update kernel's exact sums (reference twin on the CPU): one pass over
    x per moment instead of several float64 copies of it."""
    partial_sums = backend_for(x.device).partial_sums
    labels = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device) if groups is None else groups
    checks = DeferredChecks()  # (both passes' range checks in one read-back: one wait, not two)
    sums, squares = (partial_sums(x, labels, n_groups, scale=fp.FixedPointScale(e, 0, 0), square=square,
                                  deferred=checks).sums
                     for e, square in ((exps[0], False), (exps[1], True)))
    checks.verify()
    return (sums[:, 0], squares[:, 0]) if groups is None else (sums, squares)


def fit_numerics(bounds: DataBounds, sums: torch.Tensor, squares: torch.Tensor, *, metric: str,
                 centroid_max_abs: float) -> FitNumerics:
    """Shift, grids and tolerance base from the exact moments. `centroid_max_abs` bounds the initial centroids:
    Lloyd means and re-seeded points stay inside the data's box, so |x - c|^2 <= D * (2 * M)^2 for the whole fit."""
    mean, variance = moment_statistics(bounds, sums, squares)
    return FitNumerics(metric, None if metric == "cosine" else mean, fit_scale(bounds, metric, centroid_max_abs),
                       float(variance.mean()) if variance.numel() else 0.0)


def moment_statistics(bounds: DataBounds, sums: torch.Tensor, squares: torch.Tensor):
    """float64 per-feature mean and variance from exact moment limbs (2, ..., D), any leading shape."""
    n = max(bounds.n_samples, 1)
    exps = moment_exponents(bounds)
    mean = fp.to_float(sums, exps[0]) / n
    return mean, (fp.to_float(squares, exps[1]) / n - mean * mean).clamp_min(0.0)


def fit_scale(bounds: DataBounds, metric: str, centroid_max_abs: float) -> fp.FixedPointScale:
    m = max(bounds.max_abs, centroid_max_abs)
    max_dist = 2.0 if metric == "cosine" else bounds.n_features * (2.0 * m) ** 2
    return fp.FixedPointScale.from_bounds(bounds.max_abs * bounds.max_weight, bounds.max_weight,
                                          2.0 * max_dist * bounds.max_weight)


def exact_inertia(min_dist: torch.Tensor, weights: torch.Tensor | None, numerics: FitNumerics,
                  deferred=None) -> torch.Tensor:
    """Fixed-point limbs (2,) of sum(w * min_dist): inertia that is the same bits for any split of the rows.
    `deferred`: a `DeferredChecks` that takes the range check (else it waits for the device)."""
    return fp.exact_sum(min_dist, numerics.scale.dist_exp, deferred, weights=weights)


def unit_rows_like(x: torch.Tensor) -> torch.Tensor:
    """Unit rows in x's own dtype: what spherical k-means clusters and sums."""
    return reference.unit_rows(x).to(x.dtype)


def numerics_for(x: torch.Tensor, weights: torch.Tensor | None, *, metric: str,
                 centroid_max_abs: float = 0.0) -> FitNumerics:
    """All per-fit numerics of data held in one place (the in-process fit, k-means|| candidates)."""
    bounds = data_bounds(x, weights)
    sums, squares = column_moments(x, moment_exponents(bounds))
    return fit_numerics(bounds, sums, squares, metric=metric, centroid_max_abs=centroid_max_abs)
