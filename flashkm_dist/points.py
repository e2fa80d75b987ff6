"""The data as seeding and per-fit statistics see it: passes over the rows and a gather of chosen rows.

Written against the engine, so the rows may be on the device or stream from the host; a Dask driver can offer the
same few operations across workers. Per-point vectors (weights, distances) live on the engine's device in block
order. Every per-point value is computed from its own row alone, so it does not depend on how rows are chunked.
"""
from __future__ import annotations

import torch

from flashkm_dist.engine import DataBounds, FitNumerics, column_moments, data_bounds, fit_numerics, moment_exponents
from flashkm_dist.kernels import reference
from flashkm_dist.streaming import Block, Engine, _as_tensor

_DIFF_ELEMENTS = 1 << 24  # float64 elements of one (rows x centres x D) difference tile


def exact_distances(x: torch.Tensor, centers: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, m) float64 distances from each row's own differences (no matmul, so no dependence on tiling)."""
    out = torch.empty((x.shape[0], centers.shape[0]), dtype=torch.float64, device=x.device)
    c = reference.unit_rows(centers) if metric == "cosine" else centers.to(torch.float64)
    step = max(1, _DIFF_ELEMENTS // max(1, centers.shape[0] * x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        if metric == "cosine":
            xr = reference.unit_rows(x[r0:r0 + step])
            out[r0:r0 + step] = (1.0 - (xr[:, None, :] * c[None]).sum(-1)).clamp(0.0, 2.0)
        else:
            diff = x[r0:r0 + step].to(torch.float64)[:, None, :] - c[None]
            out[r0:r0 + step] = (diff * diff).sum(-1)
    return out


class Points:
    """Rows of `blocks` as held by `engine`."""

    def __init__(self, engine: Engine, blocks: list[Block]):
        self.engine, self.blocks = engine, blocks
        self._moments = None
        sizes = [_as_tensor(b.data).shape[0] for b in blocks]
        self.n_samples = sum(sizes)
        self.n_features = _as_tensor(blocks[0].data).shape[1]
        dev = engine.device
        if all(b.weights is None for b in blocks):
            self.weights = None
        else:
            self.weights = torch.cat([torch.ones(n, dtype=torch.float64, device=dev) if b.weights is None
                                      else torch.as_tensor(b.weights, dtype=torch.float64).to(dev)
                                      for b, n in zip(blocks, sizes)])

    def mass(self) -> torch.Tensor:
        """Sample weights (ones when unweighted), float64 (N,)."""
        if self.weights is None:
            return torch.ones(self.n_samples, dtype=torch.float64, device=self.engine.device)
        return self.weights

    def rows(self, index) -> torch.Tensor:
        return self.engine.gather(self.blocks, index)

    def _cat(self, parts, empty_shape, dtype):
        return torch.cat(parts) if parts else torch.empty(empty_shape, dtype=dtype, device=self.engine.device)

    def nearest(self, centers: torch.Tensor, numerics: FitNumerics):
        """(labels int64 (N,), min distance float64 (N,)) of every row."""
        centers = centers.to(self.engine.device)
        parts = self.engine.map_chunks(self.blocks, lambda x, w: self.engine.backend.assign(
            x, centers, metric=numerics.metric, shift=numerics.shift))
        return (self._cat([p[0] for p in parts], (0,), torch.int64),
                self._cat([p[1].to(torch.float64) for p in parts], (0,), torch.float64))

    def distances(self, centers: torch.Tensor, metric: str) -> torch.Tensor:
        """(N, m) float64 distances to a few centres (k-means++ candidates)."""
        centers = centers.to(self.engine.device)
        parts = self.engine.map_chunks(self.blocks, lambda x, w: exact_distances(x, centers, metric))
        return self._cat(parts, (0, centers.shape[0]), torch.float64)

    def bounds(self) -> DataBounds:
        parts = self.engine.map_chunks(self.blocks, data_bounds)
        total = DataBounds(0, self.n_features, 0.0, 0.0 if self.weights is not None else 1.0)
        for p in parts:
            total = total + p
        return total

    def numerics(self, metric: str, *, centroid_max_abs: float = 0.0) -> FitNumerics:
        """Shift, fixed-point grids and tolerance base of these rows. The two passes (bounds, then the exact
        moments) run once; later calls only change the bound on the centroids."""
        if self._moments is None:
            bounds = self.bounds()
            exps = moment_exponents(bounds)
            parts = self.engine.map_chunks(self.blocks, lambda x, w: column_moments(x, exps))
            zeros = torch.zeros((2, self.n_features), dtype=torch.int64, device=self.engine.device)
            self._moments = (bounds, sum((p[0] for p in parts), zeros), sum((p[1] for p in parts), zeros))
        return fit_numerics(*self._moments, metric=metric, centroid_max_abs=centroid_max_abs)
