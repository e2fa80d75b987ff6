"""The data as seeding and per-fit statistics see it, over one or many shards.

`Points` is the client's side: it sends the few operations seeding needs (statistics, D^2 updates, inverse-CDF
draws, gathers) to the shards holding the rows and combines their exact answers. The in-process fit has one local
shard (`local_points`); the Dask driver has one shard per worker and the same `Points`. Because every combination
is an integer add or a per-row result, both see the same bits for the same rows, however they are split.
"""
from __future__ import annotations

import numpy as np
import torch

from flashkm_dist.engine import DataBounds, FitNumerics, fit_numerics, moment_exponents
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.shard import Shard, block_size
from flashkm_dist.streaming import Block, Engine, _as_tensor


class LocalShards:
    """Every block in one shard of this process, called directly (the in-process fit)."""

    def __init__(self, engine: Engine, blocks: list[Block]):
        self.shard = Shard(engine)
        self.blocks = [Block(b.data, b.weights, key=i) for i, b in enumerate(blocks)]
        self.sizes = [block_size(b) for b in self.blocks]
        self.n_features = _as_tensor(blocks[0].data).shape[1]
        self.weighted = any(b.weights is not None for b in blocks)
        self.device, self.dtype = engine.device, engine.dtype
        self.shard_ids = [0]

    def blocks_of(self, shard: int) -> list[int]:
        return list(range(len(self.blocks)))

    def run(self, method: str, calls: dict) -> dict:
        return {s: getattr(self.shard, method)([self.blocks[i] for i in ids], *args) for s, (ids, args) in calls.items()}

    def run_here(self, fn, *args):
        """Run fn(*args, device=...) where the shards compute (k-means|| re-clustering)."""
        return fn(*args, device=self.device)

    def as_array(self):
        """What a callable `init` receives: the rows as float64 NumPy (it runs on the client, as scikit-learn's)."""
        rows = torch.cat([self.shard.engine.gather([b], torch.arange(n)) for b, n in zip(self.blocks, self.sizes)])
        return rows.cpu().to(torch.float64).numpy()


def local_points(engine: Engine, blocks: list[Block]) -> "Points":
    return Points(LocalShards(engine, blocks))


class Points:
    """Rows spread over `shards` (a `LocalShards` or the Dask driver's), addressed by global position."""

    def __init__(self, shards):
        self.shards = shards
        self.n_samples = sum(shards.sizes)
        self.n_features = shards.n_features
        self.weighted = shards.weighted
        self.starts = np.concatenate([[0], np.cumsum(shards.sizes)]).astype(np.int64)
        self._moments = None
        self._closest_totals = None

    # ------------------------------------------------------------------------------------------ plumbing
    def _everywhere(self, method: str, *args) -> dict:
        return self.shards.run(method, {s: (self.shards.blocks_of(s), args) for s in self.shards.shard_ids})

    def _per_block(self, method: str, *args) -> torch.Tensor:
        """Exact limbs (2, n_blocks) gathered from every shard into global block order."""
        out = torch.zeros((2, len(self.shards.sizes)), dtype=torch.int64)
        for s, limbs in self._everywhere(method, *args).items():
            out[:, self.shards.blocks_of(s)] = limbs.cpu()
        return out

    def _by_block(self, index) -> dict:
        """Global row positions -> {block: (local positions, places in `index`)}."""
        index = torch.as_tensor(index, dtype=torch.int64).cpu().numpy()
        block = np.searchsorted(self.starts, index, side="right") - 1
        return {int(b): (index[block == b] - self.starts[b], np.nonzero(block == b)[0]) for b in np.unique(block)}

    def _calls(self, per_block: dict, *args_of_block) -> dict:
        """{shard: ([blocks], (args...))} for per-block arguments given as {block: (arg, ...)}."""
        calls = {}
        owner = {b: s for s in self.shards.shard_ids for b in self.shards.blocks_of(s)}
        for b in sorted(per_block):
            ids, args = calls.setdefault(owner[b], ([], [[] for _ in per_block[b]]))
            ids.append(b)
            for column, value in zip(args, per_block[b]):
                column.append(value)
        return calls

    # ------------------------------------------------------------------------------------------ statistics
    def numerics(self, metric: str, *, centroid_max_abs: float = 0.0) -> FitNumerics:
        """Shift, fixed-point grids and tolerance base of these rows. The two passes (bounds, then the exact
        moments) run once; later calls only change the bound on the centroids."""
        if self._moments is None:
            bounds = DataBounds(0, self.n_features, 0.0, 0.0)
            for part in self._everywhere("bounds").values():
                bounds = bounds + part
            if not np.isfinite(bounds.max_abs):
                raise ValueError("Input X contains NaN or infinity.")
            exps = moment_exponents(bounds)
            sums = torch.zeros((2, self.n_features), dtype=torch.int64)
            squares = torch.zeros_like(sums)
            for s, q in self._everywhere("moments", exps).values():
                sums, squares = sums + s.cpu(), squares + q.cpu()
            self._moments = (bounds, sums, squares)
        return fit_numerics(*self._moments, metric=metric, centroid_max_abs=centroid_max_abs)

    def rows(self, index) -> torch.Tensor:
        """The rows at global positions, in order, on the client's device in the compute dtype."""
        wanted = self._by_block(index)
        rows = torch.empty((len(np.atleast_1d(np.asarray(index))), self.n_features), dtype=self.shards.dtype,
                           device=self.shards.device)
        calls = self._calls({b: (torch.as_tensor(local),) for b, (local, _) in wanted.items()})
        for s, found in self.shards.run("rows", calls).items():
            for b, got in zip(calls[s][0], found):
                rows[torch.as_tensor(wanted[b][1], device=rows.device)] = got.to(rows.device)
        return rows

    def weight_vector(self) -> torch.Tensor:
        """Every sample weight, float64 (N,), in row order (only weighted 'random' seeding needs them)."""
        parts = {}
        for found in self._everywhere("weights").values():
            parts.update({k: v.cpu() for k, v in found.items()})
        return torch.cat([parts[b] for b in range(len(self.shards.sizes))])

    def as_array(self):
        return self.shards.as_array()

    # ------------------------------------------------------------------------------------------ D^2 seeding
    def sample(self, rng: np.random.RandomState, n: int, by: str, numerics: FitNumerics) -> torch.Tensor:
        """n global row positions drawn with probability proportional to the weight ('weight') or to weight x
        distance to the nearest seed ('closest'), by inverse CDF on exact cumulative masses: a row of weight 3
        owns the stretch of three copies, and no split of the rows into blocks changes a draw."""
        exp = self._exp(by, numerics)
        totals = self._closest_totals if by == "closest" else self._per_block("totals", "weight", exp)
        ends = fp.normalize(totals.cumsum(dim=1))
        total = float(fp.to_float(ends[:, -1], exp))
        if total <= 0.0:  # every row sits on a seed: any row will do
            return self.sample(rng, n, "weight", numerics)
        targets = np.minimum(rng.uniform(size=n) * total, np.nextafter(total, 0.0))
        block = np.searchsorted(fp.to_float(ends, exp).numpy(), targets, side="right")
        starts = torch.cat([torch.zeros((2, 1), dtype=torch.int64), ends[:, :-1]], dim=1)
        chosen = {int(b): (starts[:, b], targets[block == b], np.nonzero(block == b)[0]) for b in np.unique(block)}
        calls = self._calls({b: v[:2] for b, v in chosen.items()})
        out = torch.empty(n, dtype=torch.int64)
        calls = {s: (ids, (by, exp, torch.stack(offsets, dim=1), t)) for s, (ids, (offsets, t)) in calls.items()}
        for s, found in self.shards.run("draw", calls).items():
            for b, local in zip(calls[s][0], found):
                out[torch.as_tensor(chosen[b][2])] = local.cpu() + int(self.starts[b])
        return out

    @staticmethod
    def _exp(by: str, numerics: FitNumerics) -> int:
        return numerics.scale.dist_exp if by == "closest" else numerics.scale.weight_exp

    def start_closest(self, centers: torch.Tensor, numerics: FitNumerics, how: str, *, reset: bool = False):
        """Distances to the nearest seed := min(old, nearest of `centers`) on every shard ('exact' from
        differences as greedy k-means++, 'assign' through the kernel as k-means||)."""
        if reset:
            self._everywhere("forget_closest")
        self._closest_totals = self._per_block("start_closest", centers.cpu(), numerics, how,
                                               numerics.scale.dist_exp)

    def closest_total(self, numerics: FitNumerics) -> float:
        return float(fp.to_float(fp.normalize(self._closest_totals.sum(dim=1)), numerics.scale.dist_exp))

    def trial(self, candidates: torch.Tensor, numerics: FitNumerics) -> torch.Tensor:
        """float64 (m,): the exact potential sum(w * min(closest, d(x, c_j))) if candidate j were chosen."""
        exp = numerics.scale.dist_exp
        total = sum(p.cpu() for p in self._everywhere("trial", candidates.cpu(), numerics.metric, exp).values())
        return fp.to_float(total, exp)

    def commit(self, choice: int, numerics: FitNumerics) -> None:
        self._closest_totals = self._per_block("commit", choice, numerics.scale.dist_exp)

    def nearest_mass(self, centers: torch.Tensor, numerics: FitNumerics) -> torch.Tensor:
        """float64 (m,): exact weight of the rows nearest to each centre."""
        exp = numerics.scale.weight_exp
        total = sum(p.cpu() for p in self._everywhere("nearest_mass", centers.cpu(), numerics, exp).values())
        return fp.to_float(total, exp)
