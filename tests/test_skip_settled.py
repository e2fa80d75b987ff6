"""Bounded steps that skip settled host rows (`Engine.skip_settled`): the upper-bound test keeps only exact labels,
the device reads just the stale rows, and the sums, counts and labels stay those of plain steps, to the bit.

Only CUDA engines stream host rows, so these tests mark chunks as a CUDA engine's pass past its cache would
(`tail`, or skipped when the engine's bounds allow it)."""
import numpy as np
import pytest
import torch

from flashkm_dist.engine import REFERENCE, _triton_backend, numerics_for
from flashkm_dist.kernels import bounds, host_rows, reference
from flashkm_dist.lloyd import lloyd_iteration, run_lloyd
from flashkm_dist.streaming import Block, Engine, _Chunk
import flashkm_dist.streaming as S
from oracle import sq_dists


def blobs(n=1500, k=10, d=7, seed=0, offset=50.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    x = centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g) + offset
    return x, x[torch.randperm(n, generator=g)[:k]].clone()


def as_tail_chunks(self, blocks):
    """Every block in chunks of `chunk_rows` as a CUDA engine streams the rows past its cache: copied tail
    chunks, or, when the engine may skip the block, chunks whose rows stay on the host."""
    for index, block in enumerate(blocks):
        data = block.data
        weights = None if block.weights is None else torch.as_tensor(block.weights, dtype=torch.float64)
        skip = self._skippable(self._key(block, index), data, 0)
        for start in range(0, data.shape[0], self.chunk_rows):
            rows = data[start:start + self.chunk_rows]
            w = None if weights is None else weights[start:start + self.chunk_rows]
            if skip:
                yield _Chunk(index, start, None, w, streamed=True, tail=True, host=rows)
            else:
                yield _Chunk(index, start, rows.to(self.dtype), w, streamed=True, tail=True)


@pytest.fixture
def streamed(monkeypatch):
    """Chunks as a CUDA engine streams them; every step that may skip does (the share of stale rows aside)."""
    monkeypatch.setattr(S.Engine, "_chunks", as_tail_chunks)
    monkeypatch.setattr(S, "SKIP_MAX_STALE", 1.0)


def test_upper_test_keeps_only_rows_whose_label_is_the_exact_nearest():
    g = torch.Generator().manual_seed(1)
    x, old = torch.randn(4000, 5, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g) * 2
    new = old + torch.randn(12, 5, generator=g) * 0.05
    d_old = np.sqrt(sq_dists(x.numpy(), old.double().numpy()))
    labels = torch.as_tensor(d_old.argmin(1))
    own = d_old[np.arange(len(x)), labels.numpy()]
    others = d_old.copy()
    others[np.arange(len(x)), labels.numpy()] = np.inf
    lower = torch.as_tensor(others.min(1) * (1 - 1e-6), dtype=torch.float32)
    upper = bounds.upper_of(torch.as_tensor(own ** 2, dtype=torch.float32))
    assert (upper.double().numpy() >= own).all()
    drift = torch.linalg.vector_norm(new.double() - old.double(), dim=1) * (1 + 1e-12)
    dec = torch.stack([torch.cat([drift[:j], drift[j + 1:]]).max() for j in range(12)])
    labels[:7] = -1  # rows without a label are always stale
    lower[7:9] = float("nan")
    stale, new_lower, new_upper = bounds.upper_test(labels, lower, upper, drift, dec)
    assert stale[:9].all() and 0.3 < (~stale).double().mean() < 0.99
    d_new = np.sqrt(sq_dists(x.numpy(), new.double().numpy()))
    keep = ~stale.numpy()
    assert (d_new[keep].argmin(1) == labels.numpy()[keep]).all()
    own_new = d_new[np.arange(len(x)), labels.clamp(min=0).numpy()]
    assert (new_upper.double().numpy()[keep] >= own_new[keep]).all()
    others_new = d_new.copy()
    others_new[np.arange(len(x)), labels.clamp(min=0).numpy()] = np.inf
    assert (new_lower.double().numpy()[keep] <= others_new.min(1)[keep]).all()
    assert (new_lower[~keep] == 0).all()


def test_upper_test_with_a_neighbour_table_keeps_rows_far_from_a_jumping_centroid():
    from flashkm_dist.kernels.neighbours import neighbour_table

    g = torch.Generator().manual_seed(8)
    centres = torch.randn(64, 5, generator=g) * 20
    x = (centres[torch.randint(0, 64, (3000,), generator=g)] + torch.randn(3000, 5, generator=g)).double()
    old = x[torch.randperm(3000, generator=g)[:64]].clone()
    labels, dist, lower = reference.assign_lower(x, old)
    new = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.01
    new[3] += 40.0
    drift = torch.linalg.vector_norm(new - old, dim=1) * (1 + 1e-12)
    dec = torch.stack([torch.cat([drift[:j], drift[j + 1:]]).max() for j in range(64)])
    upper = bounds.upper_of(dist.float())
    table = neighbour_table(new)
    near = bounds.neighbour_moves(table.index[0], table.beyond[0], drift)
    plain = bounds.upper_test(labels, lower, upper, drift, dec)[0]
    stale, new_lower, new_upper = bounds.upper_test(labels, lower, upper, drift, dec, near)
    keep = ~stale.numpy()
    assert (~plain).sum() < 300 < 1500 < keep.sum()
    d_new = np.sqrt(sq_dists(x.numpy(), new.numpy()))
    assert (d_new[keep].argmin(1) == labels.numpy()[keep]).all()
    d_new[np.arange(len(x)), labels.numpy()] = np.inf
    assert (new_lower.double().numpy()[keep] <= d_new.min(1)[keep]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_host_rows_are_gathered_as_indexing_and_conversion_give_them(dtype, monkeypatch):
    monkeypatch.setattr(host_rows, "PROGRAMS", 3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 300, generator=g) * 100  # (D above one block of columns)
    index = torch.tensor([499, 0, 7, 7, 250])
    assert torch.equal(host_rows.read_in_place(x, index, dtype), x[index].to(dtype))
    assert torch.equal(host_rows.gather(x, index, dtype), x[index].to(dtype))
    assert host_rows.read_in_place(x, index[:0], dtype).shape == (0, 300)
    many = torch.randint(0, 500, (100,), generator=g)  # (more row blocks than programs: each program loops)
    assert torch.equal(host_rows.read_in_place(x, many, dtype), x[many].to(dtype))
    with pytest.raises(ValueError, match="contiguous"):
        host_rows.read_in_place(x.t(), index, dtype)


@pytest.mark.parametrize("weighted,backend", [(False, "reference"), (True, "reference"), (True, "triton")])
def test_skipping_steps_give_the_sums_counts_and_labels_of_plain_steps(streamed, weighted, backend):
    """Two blocks in chunks of 170 rows, 8 Lloyd iterations (interpreted kernels: 300 rows, 5 iterations): after
    the first two bounded steps (the second is the first with bounds) the engine skips its blocks, reads only stale rows, and every step's sums, counts and
    labels changed equal plain steps'; the inertia of a skipping step is marked incomplete, and a complete step
    gives plain's to the bit."""
    x, init = blobs(n=1500 if backend == "reference" else 1100)
    w = torch.rand(len(x), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 if weighted else None
    if weighted:
        w[::11] = 0.0
    nm = numerics_for(x, w, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    blocks = [Block(x[:900], None if w is None else w[:900], key="a"),
              Block(x[900:], None if w is None else w[900:], key="b")]
    be = REFERENCE if backend == "reference" else _triton_backend()
    rows = 170 if backend == "reference" else 300
    plain = Engine("cpu", chunk_rows=rows, backend=be)
    skipping = Engine("cpu", chunk_rows=rows, backend=be, bounds=True, skip_settled=True)
    centers, gathered, changed = init, [], []
    for i in range(8 if backend == "reference" else 5):
        a, b = plain.step(blocks, centers, nm), skipping.step(blocks, centers, nm)
        assert torch.equal(a.partials.sums, b.partials.sums) and torch.equal(a.partials.weights, b.partials.weights)
        assert a.n_changed == b.n_changed
        assert b.inertia_complete == (i <= 1)
        if b.inertia_complete:
            assert torch.equal(a.inertia, b.inertia)
        gathered.append(b.gathered)
        changed.append(b.n_changed)
        centers = reference.finalize(a.partials, dtype=torch.float32, previous=centers)[0]
    assert gathered[:2] == [0, 0] and 0 < max(gathered[2:]) and min(gathered[2:]) < len(x) // 2
    assert changed[2] > 0  # (rows moved while their blocks were skipped)
    assert all(torch.equal(p, q) for p, q in zip(plain.labels(blocks), skipping.labels(blocks)))
    full = skipping.step(blocks, centers, nm, complete=True)
    assert full.inertia_complete and full.gathered == 0
    assert torch.equal(full.inertia, plain.step(blocks, centers, nm).inertia)


def test_a_fit_that_skips_reports_nan_inertia_per_step_and_the_plain_final_inertia(streamed):
    x, init = blobs(n=1200, k=6, seed=4)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    plain = run_lloyd(Engine("cpu", chunk_rows=200), [Block(x)], init, nm, max_iter=30)
    skip = run_lloyd(Engine("cpu", chunk_rows=200, bounds=True, skip_settled=True), [Block(x)], init, nm,
                     max_iter=30)
    assert torch.equal(plain.centers, skip.centers) and torch.equal(plain.labels, skip.labels)
    assert plain.inertia == skip.inertia and plain.n_iter == skip.n_iter
    inertias = [h["inertia"] for h in skip.history]
    assert not np.isnan(inertias[:2]).any() and np.isnan(inertias[2:]).all()


def test_a_skipping_step_after_a_changed_cache_or_chunking_reads_every_row(streamed):
    """The tail partials belong to one set of rows: an engine whose chunks or bounds changed scores every row."""
    x, init = blobs(n=600)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    engine = Engine("cpu", chunk_rows=100, bounds=True, skip_settled=True)
    c = init
    for _ in range(3):
        it = lloyd_iteration(engine, [Block(x, key=0)], c, nm)
        c = it.centers
    assert it.step.gathered < 600 and not it.step.inertia_complete
    engine._tail_sums[0] = (100, *engine._tail_sums[0][1:])  # (as if the cache now ended at row 100)
    again = lloyd_iteration(engine, [Block(x, key=0)], c, nm)
    assert again.step.inertia_complete and again.step.rescored == 600


def test_a_step_copies_the_rows_when_most_rows_the_last_step_tested_were_stale(streamed, monkeypatch):
    """SKIP_MAX_STALE: after a step that found more than half the rows it tested stale, the next one reads its
    rows whole (no test, so the step after it may skip again); the first step with bounds never skips; the bits
    never change."""
    monkeypatch.setattr(S, "SKIP_MAX_STALE", 0.5)
    x, init = blobs(n=1200, seed=7)
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(init.abs().max()))
    plain, engine = Engine("cpu", chunk_rows=300), Engine("cpu", chunk_rows=300, bounds=True, skip_settled=True)
    centers, share, shares = init, None, []
    for i in range(8):
        a, b = plain.step([Block(x)], centers, nm), engine.step([Block(x)], centers, nm)
        assert torch.equal(a.partials.sums, b.partials.sums) and a.n_changed == b.n_changed
        assert b.inertia_complete == (i <= 1 or (share is not None and share > 0.5)), (i, share)
        share = engine._stale_share  # (of the rows it tested: those its bound alone did not keep)
        shares.append(share)
        centers = reference.finalize(a.partials, dtype=torch.float32, previous=centers)[0]
    known = [s for s in shares if s is not None]  # (None: nothing tested, the step after a high share)
    assert shares[0] is None and all(0 <= s <= 1 for s in known) and max(known) > 0.5 > min(known), shares
