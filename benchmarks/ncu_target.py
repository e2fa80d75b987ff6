"""A short program for Nsight Compute: a few FlashAssign and sort-inverse update launches on one shape.

    ncu --clock-control none -k regex:_cluster_sums_kernel -s 2 -c 1 python benchmarks/ncu_target.py --n 8388608 --k 1024
    ncu --clock-control none -k regex:_stream_kernel -c 1 python benchmarks/ncu_target.py --n 1048576 --k 8192 --reps 1

--blobs takes gpu_check's rows (blobs, centroids drawn from the rows); --batch B gpu_check's batched row (B
problems of standard normal rows, each problem's first K rows as its centroids). benchmarks/ncu_profile.py runs
it for gpu_check's rows and keeps the figures as JSON.
"""
from __future__ import annotations

import argparse

import torch

from flashkm_dist.engine import numerics_for
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels.update import sort_inverse_update


def rows_and_centroids(n: int, k: int, d: int, batch: int, blobs: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    if batch:
        x = torch.randn(batch, n, d, device="cuda", generator=g).to(torch.float16)
        return x, x[:, :k].clone()
    if blobs:
        from gpu_check import blobs as gpu_check_blobs
        x = gpu_check_blobs(n, d, min(k, 4096), torch.float16, seed=4)
    else:
        x = torch.randn(n, d, device="cuda", generator=g).to(torch.float16)
    return x, x[torch.randperm(n, device="cuda", generator=g)[:k]].clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 23)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="B problems in one batched call (0: one 2-D problem)")
    ap.add_argument("--blobs", action="store_true", help="gpu_check's blob rows instead of standard normal ones")
    ap.add_argument("--portable", action="store_true", help="the portable streaming kernel even on sm_90")
    args = ap.parse_args()
    A.SM90_STREAM = not args.portable
    x, c = rows_and_centroids(args.n, args.k, args.d, args.batch, args.blobs)
    flat = x.reshape(-1, args.d)
    nm = numerics_for(flat, None, metric="euclidean")
    for _ in range(args.reps):
        labels, _ = A.flash_assign(x, c, shift=nm.shift)
        sort_inverse_update(x, labels, args.k, scale=nm.scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
