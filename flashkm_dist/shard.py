"""The blocks one process holds, and the per-row state that seeding keeps beside them.

A `Shard` is what one process owns: the in-process fit's only shard, or one Dask worker's. It wraps that device's
`Engine` and, per block, the D^2 vectors k-means++ and k-means|| update between rounds, so those vectors never
leave the rows they belong to. Everything a shard returns is either exact (integer limbs, which add up the same
way whatever the split) or computed per row, so the client that combines shards cannot tell how rows were split.
"""
from __future__ import annotations

import threading

import torch

from flashkm_dist.engine import DataBounds, FitNumerics, column_moments, data_bounds
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.streaming import Block, Engine, EngineStep, Farthest, _as_tensor

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


def block_size(block: Block) -> int:
    return _as_tensor(block.data).shape[0]


class Shard:
    """One device's blocks (each `Block.key` is the block's global index) and their seeding state.

    Methods take the blocks to act on, because a Dask worker receives its blocks as task arguments every call;
    state is keyed by block index, so a block that moves to another worker simply starts without state there.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.RLock()  # a worker may run two tasks of one fit at once (a cancelled speculation)
        self.closest: dict = {}  # block key -> float64 (n,) distance to the nearest chosen seed
        self.trials: dict = {}  # block key -> float64 (n, m) closest after each k-means++ candidate
        self.version = None  # (centres, block keys) of the step whose labels the engine remembers

    # ------------------------------------------------------------------------------------------ statistics
    def bounds(self, blocks) -> DataBounds:
        parts = self.engine.map_chunks(blocks, data_bounds)
        total = DataBounds(0, _as_tensor(blocks[0].data).shape[1], 0.0, 0.0)
        for p in parts:
            total = total + p
        if all(b.weights is None for b in blocks):
            total.max_weight = 1.0
        return total

    def moments(self, blocks, exps) -> tuple[torch.Tensor, torch.Tensor]:
        d = _as_tensor(blocks[0].data).shape[1]
        sums = torch.zeros((2, d), dtype=torch.int64, device=self.engine.device)
        squares = torch.zeros_like(sums)
        for s, q in self.engine.map_chunks(blocks, lambda x, w: column_moments(x, exps)):
            sums, squares = sums + s, squares + q
        return sums, squares

    def weights(self, blocks) -> dict:
        """Block key -> float64 weights (ones when unweighted)."""
        return {b.key: self._mass(b, "weight") for b in blocks}

    def rows(self, blocks, local_index: list) -> list:
        """The rows at local_index[i] of blocks[i], in the compute dtype (unit rows for streamed cosine)."""
        return [self.engine.gather([b], idx) for b, idx in zip(blocks, local_index)]

    # ------------------------------------------------------------------------------------------ D^2 sampling
    def _mass(self, block: Block, by: str) -> torch.Tensor:
        n = block_size(block)
        w = torch.ones(n, dtype=torch.float64, device=self.engine.device) if block.weights is None \
            else torch.as_tensor(block.weights, dtype=torch.float64).to(self.engine.device)
        return w * self.closest[block.key] if by == "closest" else w

    def totals(self, blocks, by: str, exp: int) -> torch.Tensor:
        """Exact limbs (2, len(blocks)) of each block's sampling mass: weights, or weights x D^2 ('closest')."""
        if not blocks:
            return torch.zeros((2, 0), dtype=torch.int64)
        return torch.stack([fp.exact_sum(self._mass(b, by), exp) for b in blocks], dim=1)

    def draw(self, blocks, by: str, exp: int, offsets: torch.Tensor, targets: list) -> list:
        """Inverse-CDF draws inside blocks: for blocks[i], whose mass starts at the exact `offsets[:, i]`, the
        first row whose exact cumulative mass (as float64) exceeds each target. Exact cumulative sums make the
        choice independent of how rows are split into blocks."""
        out = []
        for i, (block, t) in enumerate(zip(blocks, targets)):
            cum = fp.quantize(self._mass(block, by), exp).cumsum(dim=1) + offsets[:, i:i + 1].to(self.engine.device)
            t = torch.as_tensor(t, dtype=torch.float64, device=self.engine.device)
            local = torch.searchsorted(fp.to_float(cum, exp), t, right=True)
            out.append(local.clamp_(max=block_size(block) - 1).cpu())
        return out

    def _per_row(self, block: Block, fn, width: int | None = None) -> torch.Tensor:
        """fn(x, w) over the block's chunks, concatenated in row order; a float64 empty tensor for an empty block."""
        parts = self.engine.map_chunks([block], fn)
        if parts:
            return torch.cat(parts)
        return torch.empty((0,) if width is None else (0, width), dtype=torch.float64, device=self.engine.device)

    def _nearest(self, block: Block, centers: torch.Tensor, numerics: FitNumerics):
        """(labels, float64 distance) of every row of the block to its nearest centre, by the assign kernel."""
        parts = self.engine.map_chunks([block], lambda x, w: self.engine.backend.assign(
            x, centers, metric=numerics.metric, shift=numerics.shift))
        if not parts:
            dev = self.engine.device
            return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float64, device=dev)
        return torch.cat([lab for lab, _ in parts]), torch.cat([d.to(torch.float64) for _, d in parts])

    def start_closest(self, blocks, centers: torch.Tensor, numerics: FitNumerics, how: str, by_exp: int):
        """closest := distance to the nearest of `centers` ('exact': from differences; 'assign': the kernel),
        replacing the old state when there is none; returns the new totals of weights x closest."""
        centers, numerics = centers.to(self.engine.device), self.engine.local(numerics)
        for b in blocks:
            if how == "exact":
                d = self._per_row(b, lambda x, w: exact_distances(x, centers, numerics.metric).min(dim=1).values)
            else:
                d = self._nearest(b, centers, numerics)[1]
            old = self.closest.get(b.key)
            self.closest[b.key] = d if old is None else torch.minimum(old, d)
        return self.totals(blocks, "closest", by_exp)

    def forget_closest(self, blocks) -> None:
        self.closest.clear()
        self.trials.clear()

    def trial(self, blocks, candidates: torch.Tensor, metric: str, exp: int) -> torch.Tensor:
        """Greedy k-means++: exact limbs (2, m) of sum(w * min(closest, d(x, candidate_j))) for every candidate;
        the per-row minima wait here for `commit`."""
        candidates = candidates.to(self.engine.device)
        total = torch.zeros((2, candidates.shape[0]), dtype=torch.int64, device=self.engine.device)
        for b in blocks:
            d = self._per_row(b, lambda x, w: exact_distances(x, candidates, metric), width=candidates.shape[0])
            d = torch.minimum(self.closest[b.key][:, None], d)
            self.trials[b.key] = d
            total += fp.quantize(self._mass(b, "weight")[:, None] * d, exp).sum(dim=1)
        return fp.normalize(total)

    def commit(self, blocks, choice: int, exp: int) -> torch.Tensor:
        """Keep candidate `choice` of the last trial; returns the new totals of weights x closest."""
        for b in blocks:
            self.closest[b.key] = self.trials[b.key][:, choice]
        self.trials.clear()
        return self.totals(blocks, "closest", exp)

    def nearest_mass(self, blocks, centers: torch.Tensor, numerics: FitNumerics, exp: int) -> torch.Tensor:
        """Exact limbs (2, m) of the weight of the rows nearest to each of `centers` (k-means|| candidates)."""
        centers, numerics = centers.to(self.engine.device), self.engine.local(numerics)
        mass = torch.zeros((2, centers.shape[0]), dtype=torch.int64, device=self.engine.device)
        for b in blocks:
            labels = self._nearest(b, centers, numerics)[0]
            mass.index_add_(1, labels.to(mass.device), fp.quantize(self._mass(b, "weight"), exp))
        return fp.normalize(mass)

    # ------------------------------------------------------------------------------------------ Lloyd
    def step(self, blocks, centers: torch.Tensor, numerics: FitNumerics, version, previous=None,
             previous_centers: torch.Tensor | None = None, *, wait: bool = True) -> EngineStep:
        """One Lloyd step. Labels changed are counted against the step at `previous` (None: a new run, all
        changed); if this shard does not remember those labels (new worker, moved block, lost state) it
        recomputes them from `previous_centers` first: that costs time, never a different count. The labels it
        remembers count only for the blocks of its step at `previous`: a block that left and came back (workers
        lost or joined) still has labels, but from an older step. `wait`: as `Engine.step`."""
        keys = [b.key for b in blocks]
        if previous is None or self.version != (previous, keys) or not self.engine.has_labels(blocks):
            self.engine.forget_labels()
            if previous is not None and previous_centers is not None:
                self.engine.step(blocks, previous_centers, numerics)
        result = self.engine.step(blocks, centers, numerics, wait=wait)
        self.version = (version, keys)
        return result

    def farthest(self, blocks, centers: torch.Tensor, numerics: FitNumerics, n: int, starts: list) -> Farthest:
        return self.engine.farthest(blocks, centers, numerics, n, offsets=starts)

