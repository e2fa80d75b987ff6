"""Exact, order-free accumulation: floats quantised once to a fit-wide fixed-point grid, summed as int64 limbs.

Why: float sums depend on summation order, so centroids would change with chunking, worker count or a retried
task. Integers add associatively. Each value v is quantised to q = round(v * 2**exp) with |q| < 2**52 and split
into two 26-bit limbs (hi, lo); each limb array can absorb 2**37 terms before int64 overflows, and `normalize`
(carry lo into hi) restores that head-room at any time without changing the exact value. `exp` is fixed once per
fit from a bound on |v| (for example max |x| of the data), so every partial of a fit shares one grid.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch

from .checks import DeferredChecks

LIMB_BITS = 26
VALUE_BITS = 2 * LIMB_BITS  # |q| < 2**VALUE_BITS
_LIMB_MASK = (1 << LIMB_BITS) - 1
_MAX_EXP = 1000  # keeps 2.0**exp finite in float64


def exponent_for(bound: float) -> int:
    """Largest power-of-two scale that maps |v| <= bound onto |q| < 2**51 (one bit spare for rounding)."""
    bound = float(bound)
    if not math.isfinite(bound):
        raise ValueError(f"cannot build a fixed-point scale for a non-finite bound ({bound})")
    if bound <= 0.0:
        return 0
    _, e = math.frexp(bound)  # bound = m * 2**e, 0.5 <= m < 1
    return max(-_MAX_EXP, min(_MAX_EXP, VALUE_BITS - 1 - e))


@dataclass(frozen=True)
class FixedPointScale:
    """The grids of one fit: weighted coordinates, weights and weighted distances."""

    sum_exp: int
    weight_exp: int
    dist_exp: int

    @classmethod
    def from_bounds(cls, max_abs_weighted_x: float, max_weight: float, max_weighted_dist: float):
        return cls(exponent_for(max_abs_weighted_x), exponent_for(max_weight), exponent_for(max_weighted_dist))


def quantize(values: torch.Tensor, exp: int, deferred: DeferredChecks | None = None) -> torch.Tensor:
    """float tensor (...) -> int64 limbs (2, ...): exactly round(values * 2**exp) = hi * 2**26 + lo, 0 <= lo < 2**26.
    A value off the grid raises OverflowError, at once or at `deferred`'s verify."""
    q = torch.round(values.to(torch.float64) * (2.0 ** exp))
    if q.numel():
        # (float64 bits; NaN stays NaN and is off the grid too)
        _defer_or_check(q.abs().max().view(torch.int64), exp, deferred)
    return split(q.to(torch.int64))


def _defer_or_check(largest: torch.Tensor, exp: int, deferred: DeferredChecks | None) -> None:
    """The range check of quantised values whose largest |q| has the float64 bits `largest`: now, or queued."""
    check = functools.partial(_check_grid, exp=exp)
    if deferred is None:
        check(largest.reshape(1).tolist())
    else:
        deferred.add(largest, check)


def _check_grid(found: list, *, exp: int) -> None:
    (largest,) = struct.unpack("<d", struct.pack("<q", found[0]))
    if not largest < 2.0 ** VALUE_BITS:
        raise OverflowError(
            f"value {largest * 2.0 ** -exp} exceeds the fixed-point range chosen for this fit "
            f"(2**{VALUE_BITS - exp}); the scale must be built from a bound on every value summed")


def normalize(limbs: torch.Tensor) -> torch.Tensor:
    """Carry lo into hi so that 0 <= lo < 2**26 again; the represented integer is unchanged."""
    carry = limbs[1] >> LIMB_BITS
    return torch.stack([limbs[0] + carry, limbs[1] & _LIMB_MASK])


def to_float(limbs: torch.Tensor, exp: int) -> torch.Tensor:
    """Limbs (2, ...) -> float64 (...): a deterministic function of the exact integer, so bitwise order-free.
    (On a GPU one kernel, `limbs.to_float`, gives the same bits.)"""
    if limbs.is_cuda:
        from . import limbs as gpu
        return gpu.to_float(limbs, exp)
    return _assemble(normalize(limbs), 2.0 ** -exp)


def _assemble(limbs: torch.Tensor, unit) -> torch.Tensor:
    """hi * 2**26 + lo in float64 (one rounding), times `unit`, a power of two (exact)."""
    return (limbs[0].to(torch.float64) * float(1 << LIMB_BITS) + limbs[1].to(torch.float64)) * unit


def exact_sum(values: torch.Tensor, exp: int, deferred: DeferredChecks | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised limbs (2,) of the exact sum of quantised values (any shape; times `weights` in float64, one
    IEEE product each, if given): one canonical form per integer. (On a GPU one kernel, `limbs.exact_sum`.)"""
    if values.is_cuda:
        from . import limbs as gpu
        sums, largest = gpu.exact_sum(values, exp, weights)
        _defer_or_check(largest, exp, deferred)
        return normalize(sums)
    values = values.reshape(-1).to(torch.float64)
    if weights is not None:
        values = values * weights.reshape(-1).to(torch.float64)
    return normalize(quantize(values, exp, deferred).sum(dim=1))


def exponent_of(bound: torch.Tensor) -> torch.Tensor:
    """`exponent_for` of a finite 0-d tensor without leaving its device (no synchronisation): int64, 0-d."""
    _, e = torch.frexp(bound.to(torch.float64))
    exp = (VALUE_BITS - 1 - e.to(torch.int64)).clamp(-_MAX_EXP, _MAX_EXP)
    return torch.where(bound > 0, exp, torch.zeros_like(exp))


def power_of_two(exp: torch.Tensor) -> torch.Tensor:
    """2.0 ** exp, exactly, for an int64 tensor with |exp| <= 1000: the float64 built from its exponent bits."""
    return ((exp + 1023) << 52).view(torch.float64)


def exact_total(values: torch.Tensor) -> torch.Tensor:
    """float64 0-d tensor: the exact sum of `values` on the grid set by their largest magnitude, rounded once.
    The same bits as `to_float(exact_sum(values, exp), exp)` with `exp = exponent_for(max |values|)`, on any
    device, without synchronising with it (nothing is checked: the grid fits every value by construction)."""
    if values.is_cuda:
        from . import limbs as gpu
        return gpu.exact_total(values)
    values = values.reshape(-1).to(torch.float64)
    if not values.numel():
        return torch.zeros((), dtype=torch.float64, device=values.device)
    exp = exponent_of(values.abs().max())
    q = torch.round(values * power_of_two(exp)).to(torch.int64)
    return _assemble(normalize(split(q).sum(dim=1)), power_of_two(-exp))


def join(limbs: torch.Tensor) -> torch.Tensor | None:
    """Limbs (2, ...) -> the exact integers as one int64 array (half the bytes to send), or None when a value
    might not fit in int64."""
    joined, fits = join_unchecked(limbs)
    return joined if bool(fits) else None


def join_unchecked(limbs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`join` without its wait for the device: (the int64 values, a 0-d bool tensor: whether they are exact)."""
    limbs = normalize(limbs)
    return limbs[0] * (1 << LIMB_BITS) + limbs[1], (limbs[0].abs() < (1 << (62 - LIMB_BITS))).all()


def split(values: torch.Tensor) -> torch.Tensor:
    """The inverse of `join`: int64 integers -> normalised limbs (2, ...)."""
    return torch.stack([values >> LIMB_BITS, values & _LIMB_MASK])
