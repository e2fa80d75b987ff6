"""The fixed-point grid's GPU side: `fixed_point.to_float`, `exact_sum` and `exact_total` in one or a few launches
each, the same bits as their torch formulation (the twins, which the CPU runs).

Why: a Lloyd iteration made about 45 torch kernels over K x D arrays (carries, limb splits, float assembly) and a
dozen over N, each a full pass over memory: about 0.3 ms at K = 8192, D = 128, more in batched runs. Integer sums
are exact, so the order in which programs add (atomics) changes no bit; every float operation is the twin's
(one IEEE rounding in hi * 2**26 + lo, exact power-of-two scalings, round half to even).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import device_traits, launch
from .update import _power_of_two, _to_int64

BLOCK = 1024  # (the kernels write fixed_point's constants out: 26-bit limbs, |q| < 2**52; compiled kernels
#                read no module globals)


@triton.jit(do_not_specialize=["n", "exp"])
def _to_float_kernel(hi_ptr, lo_ptr, out_ptr, n, exp, BLOCK: tl.constexpr):
    """out = ((hi + carry) * 2**26 + (lo & mask)) * 2**-exp in float64: normalise, then one rounding."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    hi = tl.load(hi_ptr + offs, mask=m, other=0)
    lo = tl.load(lo_ptr + offs, mask=m, other=0)
    hi = hi + (lo >> 26)
    lo = lo & 67108863
    v = hi.to(tl.float64) * 67108864.0 + lo.to(tl.float64)
    tl.store(out_ptr + offs, v * _power_of_two(-exp), mask=m)


@triton.jit
def _quantised_sum(v, scale, m, out_ptr, RNI: tl.constexpr):
    """Add round(v * scale) (masked) to the limb sums out[0], out[1]; atomic max of |q| (float64 bits, NaN
    highest) into out[2]."""
    q = _to_int64(v * scale, RNI, True)
    q = tl.where(m, q, 0)
    mag = tl.where(v == v, tl.abs(q.to(tl.float64)), float("nan"))
    mag = tl.where(m, mag, 0.0)
    tl.atomic_add(out_ptr, tl.sum(q >> 26, 0), sem="relaxed")
    tl.atomic_add(out_ptr + 1, tl.sum(q & 67108863, 0), sem="relaxed")
    tl.atomic_max(out_ptr + 2, tl.max(mag.to(tl.int64, bitcast=True), 0), sem="relaxed")


@triton.jit(do_not_specialize=["n", "exp"])
def _exact_sum_kernel(v_ptr, w_ptr, out_ptr, n, exp, HAS_W: tl.constexpr, RNI: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Limb sums of round(v * w * 2**exp) (v, w as float64: one IEEE product) over this program's block."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float64)
    if HAS_W:
        v = v * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float64)
    _quantised_sum(v, _power_of_two(exp), m, out_ptr, RNI)


@triton.jit(do_not_specialize=["n"])
def _max_abs_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[0] = max |v| as float64 bits (atomic max into zero; NaN highest)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float64)
    mag = tl.where(v == v, tl.abs(v), float("nan"))
    tl.atomic_max(out_ptr, tl.max(mag.to(tl.int64, bitcast=True), 0), sem="relaxed")


@triton.jit
def _grid_exponent(big_ptr):
    """`fixed_point.exponent_of` of the float64 whose bits are at big_ptr: 51 - e with big = f 2**e, f in [0.5, 1)
    (frexp, subnormals included), clamped to +-1000; 0 when big is 0."""
    big = tl.load(big_ptr).to(tl.float64, bitcast=True)
    sub = big < 2.2250738585072014e-308
    scaled = tl.where(sub, big * 18446744073709551616.0, big)  # (2**64: a subnormal becomes normal)
    e = ((scaled.to(tl.int64, bitcast=True) >> 52) & 2047) - 1022 - tl.where(sub, 64, 0)
    exp = tl.minimum(tl.maximum(51 - e, -1000), 1000)  # (51: fixed_point.VALUE_BITS - 1)
    return tl.where(big > 0.0, exp, 0)


@triton.jit(do_not_specialize=["n"])
def _total_sum_kernel(v_ptr, big_ptr, out_ptr, n, RNI: tl.constexpr, BLOCK: tl.constexpr):
    """`_exact_sum_kernel` on the grid `_grid_exponent` derives from max |v| (no host in between)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float64)
    _quantised_sum(v, _power_of_two(_grid_exponent(big_ptr)), m, out_ptr, RNI)


@triton.jit
def _total_finish_kernel(big_ptr, sums_ptr, out_ptr):
    """The exact total: normalise the limb sums, one rounding, times 2**-exp."""
    hi = tl.load(sums_ptr)
    lo = tl.load(sums_ptr + 1)
    hi = hi + (lo >> 26)
    lo = lo & 67108863
    v = hi.to(tl.float64) * 67108864.0 + lo.to(tl.float64)
    tl.store(out_ptr, v * _power_of_two(-_grid_exponent(big_ptr)))


def _grid(n: int) -> tuple:
    return (max(1, triton.cdiv(n, BLOCK)),)


def _rni(t: torch.Tensor) -> bool:
    return not device_traits(t.device).interpreted


def to_float(limbs: torch.Tensor, exp: int) -> torch.Tensor:
    """`fixed_point.to_float`: limbs (2, ...) int64 -> float64 (...)."""
    hi, lo = limbs[0].contiguous(), limbs[1].contiguous()
    out = torch.empty(hi.shape, dtype=torch.float64, device=limbs.device)
    if out.numel():
        launch(_to_float_kernel, _grid(out.numel()), hi, lo, out, out.numel(), int(exp), BLOCK=BLOCK)
    return out


def exact_sum(values: torch.Tensor, exp: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """Limb sums (2,) int64 (not normalised) of round(values * weights * 2**exp), and the largest |q| as float64
    bits (int64, 0-d; NaN if a value was NaN) for `fixed_point`'s range check."""
    v = values.reshape(-1).contiguous()
    w = v if weights is None else weights.reshape(-1).contiguous()
    out = torch.zeros(3, dtype=torch.int64, device=v.device)
    if v.numel():
        launch(_exact_sum_kernel, _grid(v.numel()), v, w, out, v.numel(), int(exp), HAS_W=weights is not None,
               RNI=_rni(v), BLOCK=BLOCK)
    return out[:2], out[2]


def exact_total(values: torch.Tensor) -> torch.Tensor:
    """`fixed_point.exact_total`: the exact sum of values on the grid of their largest magnitude, rounded once
    (float64, 0-d), in three launches."""
    v = values.reshape(-1).contiguous()
    work = torch.zeros(4, dtype=torch.int64, device=v.device)  # max bits, limb sums (2), (their max |q|)
    out = torch.empty((), dtype=torch.float64, device=v.device)
    grid, n = _grid(v.numel()), v.numel()
    launch(_max_abs_kernel, grid, v, work, n, BLOCK=BLOCK)
    launch(_total_sum_kernel, grid, v, work, work[1:], n, RNI=_rni(v), BLOCK=BLOCK)
    launch(_total_finish_kernel, (1,), work, work[1:], out, num_warps=1)
    return out
