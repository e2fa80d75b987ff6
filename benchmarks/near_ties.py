"""FlashAssign's tiers on the centres of a fit in progress (blobs, random rows as initial centres), where several
centres share a blob and many rows are near ties: how many rows each tier takes, and the assignment's time, with
the neighbour tier (`kernels.neighbours`; its table built anew per call, as in a Lloyd step) and without it, for
several resolve-pass candidate limits (`assign.MAX_CANDIDATES`; above it a row goes to float64 brute force).

    python benchmarks/near_ties.py --out F [--log2n 22] [--k 8192] [--iters 8] [--candidates 8]
"""
from __future__ import annotations

import argparse
import json

import torch

from flashkm_dist.engine import numerics_for
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import neighbours
from flashkm_dist.lloyd import lloyd_iteration
from flashkm_dist.streaming import Block, Engine
from profile_kernels import cuda_ms, kernel_table
from provenance import provenance

DEV = torch.device("cuda")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--log2n", type=int, default=22)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--candidates", default="8")
    args = ap.parse_args()
    n, k, d = 1 << args.log2n, args.k, args.d
    g = torch.Generator(device=DEV).manual_seed(0)
    centres = torch.randn(k, d, generator=g, device=DEV) * 4
    x = centres[torch.randint(0, k, (n,), generator=g, device=DEV)] + torch.randn(n, d, generator=g, device=DEV)
    centers = x[torch.randperm(n, generator=g, device=DEV)[:k]].clone()
    nm = numerics_for(x, None, metric="euclidean", centroid_max_abs=float(centers.abs().max()))
    engine = Engine(DEV)
    for _ in range(args.iters):
        centers = lloyd_iteration(engine, [Block(x)], centers, nm).centers
    result = {**provenance(), "device": torch.cuda.get_device_name(), "n": n, "k": k, "d": d, "dtype": "float32",
              "after_iterations": args.iters, "limits": []}
    default = A.MAX_CANDIDATES
    result["neighbour_table_ms"] = cuda_ms(lambda: neighbours.neighbour_table(centers))
    labels = None

    def assign():
        neighbours.forget()
        return A.flash_assign(x, centers, shift=nm.shift)
    try:
        for limit in (int(v) for v in args.candidates.split(",")):
            for tier in (True, False):
                A.MAX_CANDIDATES, A.NEIGHBOUR_TIER = limit, tier
                p = A._prepare(x[None], centers[None], "euclidean", nm.shift)
                fast = A._fast_pass(p)
                A._resolve(p, fast)
                labels = fast.labels[0] if labels is None else labels
                flagged, brute, wide, left = fast.counts[0].tolist()
                result["limits"].append({
                    "max_candidates": limit, "neighbour_tier": tier, "rows_flagged": flagged,
                    "rows_left_to_resolve": left if tier else flagged, "rows_brute_force": brute,
                    "rows_settled_through_a_wide_tile": wide, "same_labels": bool(torch.equal(fast.labels[0], labels)),
                    "assign_ms": cuda_ms(assign), "kernels": kernel_table(assign, top=8)})
                print(json.dumps(result["limits"][-1]))
    finally:
        A.MAX_CANDIDATES, A.NEIGHBOUR_TIER = default, True
    result["command"] = f"python benchmarks/near_ties.py --out F --log2n {args.log2n} --k {k} --d {d} " \
                        f"--iters {args.iters} --candidates {args.candidates}"
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
