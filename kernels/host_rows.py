"""Rows of page-locked host memory gathered by the GPU itself (zero-copy reads over PCIe).

Why: a bounded Lloyd step over rows streamed from the host needs only the rows its bounds cannot settle, a
scattered minority of each chunk. Copying whole chunks moves every byte; here the kernel reads just those rows
through the host memory's device mapping (unified addressing), so PCIe carries only what is scored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import launch

BLOCK_N = 16
# At most this many programs, each looping over rows: reads wait on the PCIe link, not on the SMs, and a grid of
# one program per 16 rows filled every SM and held the kernels of the compute stream off them until the read
# ended (a skipping step's compute stream idled through each read: 6 gaps of about 30 ms in a step reading 22M
# rows). A few dozen programs keep enough reads in flight for the link (about 100 KB: 2 us at 50 GB/s): alone,
# 48-51 GB/s as before (results/zero_copy_probe_h100.json); H100, N=180M, same run: skipping fits 0.562 s per
# iteration after the first against 0.620 with the full grid and 0.591 with 128 programs
# (results/engine_fit_h100x1_n180m_read_grid.json). None: one program per BLOCK_N rows.
PROGRAMS = 32


@triton.jit(do_not_specialize=["n"])
def _gather_kernel(src_ptr, stride_s, index_ptr, dst_ptr, n, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[i] = src[index[i]] (converted to dst's dtype) for i < n; each row is one contiguous read. Program p
    takes the row blocks p, p + P, ... (P programs)."""
    for first in range(tl.program_id(0) * BLOCK_N, n, tl.num_programs(0) * BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        mask = rows < n
        src = tl.load(index_ptr + rows, mask=mask, other=0).to(tl.int64) * stride_s
        dst = rows.to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = mask[:, None] & (cols < D)[None, :]
            v = tl.load(src_ptr + src[:, None] + cols[None, :], mask=m)
            tl.store(dst_ptr + dst[:, None] + cols[None, :], v.to(dst_ptr.dtype.element_ty), mask=m)


def gather(host: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """host[index] on index's device in `dtype` (host: (N, D) rows, each row contiguous; index: int64). On a GPU
    the kernel reads page-locked rows in place; other host rows are gathered on the host and copied (one wait for
    the index). On the CPU, plain indexing."""
    if index.device.type == "cpu":
        return host[index].to(dtype)
    if not host.is_pinned():
        return host[index.cpu()].to(index.device, dtype)
    return read_in_place(host, index, dtype)


def read_in_place(host: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`gather` by the kernel (CUDA index: page-locked host rows; CPU index: under the interpreter, for tests)."""
    n, d = index.numel(), host.shape[1]
    out = torch.empty((n, d), dtype=dtype, device=index.device)
    if n == 0:
        return out
    if host.stride(1) != 1:
        raise ValueError("host rows must be contiguous within a row")
    block_d = min(triton.next_power_of_2(d), 256)
    blocks = triton.cdiv(n, BLOCK_N)
    args = ((blocks if PROGRAMS is None else min(blocks, PROGRAMS),), host, host.stride(0), index.contiguous(), out,
            n, d)
    if index.device.type == "cuda":  # (`launch` would take the host tensor for an interpreter call)
        _gather_kernel[args[0]](*args[1:], BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    else:
        launch(_gather_kernel, *args, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    return out
