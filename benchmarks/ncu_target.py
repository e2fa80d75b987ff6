"""A short program for Nsight Compute: a few FlashAssign and sort-inverse update launches on one shape.

    ncu --clock-control none -k regex:_cluster_sums_kernel -s 2 -c 1 python benchmarks/ncu_target.py --n 8388608 --k 1024
    ncu --clock-control none -k regex:_stream_kernel -c 1 python benchmarks/ncu_target.py --n 1048576 --k 8192 --reps 1
"""
from __future__ import annotations

import argparse

import torch

from flashkm_dist.engine import numerics_for
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels.update import sort_inverse_update


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 23)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--portable", action="store_true", help="the portable streaming kernel even on sm_90")
    args = ap.parse_args()
    A.SM90_STREAM = not args.portable
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.n, args.d, device="cuda", generator=g).to(torch.float16)
    c = x[torch.randperm(args.n, device="cuda", generator=g)[:args.k]].clone()
    nm = numerics_for(x, None, metric="euclidean")
    for _ in range(args.reps):
        labels, _ = A.flash_assign(x, c, shift=nm.shift)
        sort_inverse_update(x, labels, args.k, scale=nm.scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
