"""The fixed-point grid's GPU kernels (kernels/limbs.py, run here under Triton's interpreter) give the bits of
their torch twins in kernels/fixed_point.py, and the same range checks."""
from __future__ import annotations

import struct

import pytest
import torch

from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import limbs


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).view(torch.int64)


@pytest.mark.parametrize("exp", [-1000, -60, 0, 37, 1000])
def test_to_float_equals_the_torch_twin(exp):
    g = torch.Generator().manual_seed(1)
    hi = torch.randint(-(1 << 36), 1 << 36, (3, 700), generator=g)
    lo = torch.randint(-(1 << 36), 1 << 36, (3, 700), generator=g)  # (not normalised: carries both ways)
    hi[0, :5] = torch.tensor([0, 1, -1, 1 << 36, -(1 << 36)])
    lo[0, :5] = torch.tensor([0, 0, (1 << 26) - 1, 1 << 27, -1])
    raw = torch.stack([hi, lo])
    twin = fp._assemble(fp.normalize(raw), 2.0 ** -exp)
    assert torch.equal(bits(limbs.to_float(raw, exp)), bits(twin))
    assert limbs.to_float(raw[:, :, :0], exp).shape == (3, 0)


@pytest.mark.parametrize("weighted", [False, True])
def test_exact_sum_equals_the_torch_twin(weighted):
    g = torch.Generator().manual_seed(2)
    v = (torch.randn(5000, generator=g) * 1e3).float()
    v[:4] = torch.tensor([0.0, -0.0, 1.5, -2.5])  # (halves: rounding to even)
    w = torch.rand(5000, generator=g, dtype=torch.float64) * 3 if weighted else None
    exp = fp.exponent_for(float((v.double().abs() * (3 if weighted else 1)).max()) * 5000)
    for e in (exp, 1):  # (a coarse grid: many values round, ties included)
        sums, largest = limbs.exact_sum(v, e, w)
        ref = v.double() if w is None else v.double() * w
        q = torch.round(ref * 2.0 ** e)
        assert torch.equal(fp.normalize(sums), fp.normalize(fp.split(q.to(torch.int64)).sum(dim=1)))
        assert int(largest) == int(q.abs().max().view(torch.int64))
        assert torch.equal(fp.exact_sum(v, e, weights=w), fp.normalize(sums))  # (the CPU twin, same limbs)
    empty, top = limbs.exact_sum(v[:0], exp)
    assert empty.tolist() == [0, 0] and int(top) == 0


def test_exact_sum_range_check_sees_overflow_and_nan():
    v = torch.tensor([1.0, 2.0 ** 60, 3.0], dtype=torch.float64)
    _, largest = limbs.exact_sum(v, 0)
    (big,) = struct.unpack("<d", struct.pack("<q", int(largest)))
    assert big == 2.0 ** 60
    with pytest.raises(OverflowError):
        fp._defer_or_check(largest, 0, None)
    _, largest = limbs.exact_sum(torch.tensor([1.0, float("nan")], dtype=torch.float64), 0)
    (nan,) = struct.unpack("<d", struct.pack("<q", int(largest)))
    assert nan != nan
    with pytest.raises(OverflowError):
        fp._defer_or_check(largest, 0, None)


@pytest.mark.parametrize("case", ["randn", "squares", "tiny", "subnormal", "zeros", "empty", "one"])
def test_exact_total_equals_the_torch_twin(case):
    g = torch.Generator().manual_seed(3)
    v = {"randn": torch.randn(3000, generator=g, dtype=torch.float64) * 1e5,
         "squares": torch.randn(2000, generator=g, dtype=torch.float64) ** 2,
         "tiny": torch.randn(100, generator=g, dtype=torch.float64) * 1e-300,
         "subnormal": torch.tensor([5e-324, 1e-320, -3e-310], dtype=torch.float64),
         "zeros": torch.zeros(77, dtype=torch.float64),
         "empty": torch.zeros(0, dtype=torch.float64),
         "one": torch.tensor([0.1], dtype=torch.float64)}[case]
    assert torch.equal(bits(limbs.exact_total(v)), bits(fp.exact_total(v)))
