"""The estimator and batched API on the Triton path (interpreter, FLASHKM_TRITON=1) give the reference's answer."""
import numpy as np
import pytest
import torch

from flashkm_dist import KMeans, batched_kmeans
from flashkm_dist.engine import backend_for


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHKM_TRITON", "1")
    assert backend_for("cpu").name == "triton"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fit_on_triton_path_equals_reference_fit(triton_on_cpu, dtype, monkeypatch):
    rng = np.random.RandomState(0)
    X = (np.repeat(rng.uniform(-5, 5, (5, 6)), 40, axis=0) + rng.standard_normal((200, 6)) + 300).astype(dtype)
    init = X[:5]
    fast = KMeans(5, init=init).fit(X)
    monkeypatch.setenv("FLASHKM_TRITON", "0")
    ref = KMeans(5, init=init).fit(X)
    np.testing.assert_array_equal(fast.labels_, ref.labels_)
    np.testing.assert_array_equal(fast.cluster_centers_, ref.cluster_centers_)
    assert fast.n_iter_ == ref.n_iter_
    assert fast.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


def test_batched_on_triton_path(triton_on_cpu, monkeypatch):
    x = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(1))
    fast = batched_kmeans(x, 4, init=x[:, :4].clone())
    monkeypatch.setenv("FLASHKM_TRITON", "0")
    slow_labels = []
    for i in range(2):
        slow_labels.append(KMeans(4, init=x[i, :4].numpy()).fit(x[i].numpy()).labels_)
    np.testing.assert_array_equal(fast.labels.numpy(), np.stack(slow_labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_column_moments_on_triton_path_are_the_exact_float64_moments(triton_on_cpu, dtype):
    """The moments behind shift and tolerance come from the update kernel on the Triton path: the same integers
    as quantising float64 x and x * x, per column and per group of rows."""
    from flashkm_dist.engine import column_moments
    from flashkm_dist.kernels import fixed_point as fp
    x = (torch.randn(90, 7, generator=torch.Generator().manual_seed(2)) * 9 - 4).to(dtype)
    x64 = x.to(torch.float64)
    exps = (fp.exponent_for(float(x64.abs().max())), fp.exponent_for(float(x64.abs().max()) ** 2))
    sums, squares = column_moments(x, exps)
    assert torch.equal(sums, fp.normalize(fp.quantize(x64, exps[0]).sum(dim=1)))
    assert torch.equal(squares, fp.normalize(fp.quantize(x64 * x64, exps[1]).sum(dim=1)))
    groups = torch.arange(90) % 4
    sums, squares = column_moments(x, exps, groups, 4)
    assert sums.shape == (2, 4, 7)
    for j in range(4):
        assert torch.equal(squares[:, j], fp.normalize(fp.quantize(x64[groups == j] ** 2, exps[1]).sum(dim=1)))


def test_engine_keeps_prepared_rows_across_steps_with_the_same_bits(triton_on_cpu):
    """A torch block on the engine's device keeps FlashAssign's prepared rows from step to step: every step
    equals a fresh engine's, also after the centroids' scale changes and after a write into the block."""
    from flashkm_dist.engine import numerics_for
    from flashkm_dist.kernels.assign import PreparedRows
    from flashkm_dist.streaming import Block, Engine

    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 9, generator=g) + 20
    nm = numerics_for(x, None, metric="euclidean")
    engine, blocks = Engine("cpu"), [Block(x)]
    # (the write comes before centroids made before it: the same shift and scale, only x changed)
    for c in (x[:7].clone(), 3.0 * x[:7], x[7:14].clone(), None, x[7:14].clone()):
        if c is None:  # a write into the block: the kept rows must not be trusted
            x[::3] *= 0.5
            continue
        got = engine.step(blocks, c, nm)
        want = Engine("cpu").step([Block(x.clone())], c, nm)
        assert torch.equal(got.partials.sums, want.partials.sums) and torch.equal(got.inertia, want.inertia)
        fresh = Engine("cpu")
        fresh.step([Block(x)], c, nm)
        assert torch.equal(engine.labels(blocks)[0], fresh.labels([Block(x)])[0])
    assert [type(v) for v in engine._kept.values()] == [PreparedRows]
