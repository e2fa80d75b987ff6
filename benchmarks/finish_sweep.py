"""Launch shapes of FlashAssign's finishing kernel (margin test and float64 distance of the label), in one
process: same outputs as the shipped shape, then time (CUDA events, median after warm-up).

    python benchmarks/finish_sweep.py --out F.json

Why: at large N and small K the pass is a visible share of the iteration (1.33 ms at N=8M, K=1024), though it
reads each row once; its float64 work per element (two conversions, a subtraction, a product) is what the shapes
trade against memory latency.
"""
from __future__ import annotations


import torch

import gpu_check as G
from sweeps import measured, prepared, sweep_main
from flashkm_dist.kernels import assign as A

DEV = G.DEV
SHAPES = [(1 << 23, 1024, 128), (1 << 20, 8192, 128)]
VARIANTS = [(128, 32, 8), (64, 32, 4), (128, 64, 4), (64, 64, 4), (32, 32, 2), (128, 128, 8), (64, 16, 4),
            (128, 32, 4)]  # (rows per program, float64 chunk, warps); the shipped shape first


def run_shape(n, k, d) -> dict:
    p = prepared(n, k, d)
    base = A._fast_pass(p)
    top, tile_k, key_low = A._stream(p)
    A._class_pass(p, top, tile_k, key_low)
    row = {"n": n, "k": k, "d": d, "shipped": [p.cfg.block_n, p.cfg.epilogue_d, p.cfg.num_warps], "variants": []}
    counts = base.counts.clone()
    measured(row, {"variant": "zeroing the count alone"},
             lambda out: out.update(ms=G.cuda_ms(lambda: counts.zero_(), reps=15)))
    for v in VARIANTS:

        def measure(out):
            fast = A._fast_pass(p)  # (fresh outputs: the kernel appends flagged rows to the list)
            fast.counts.zero_()
            A._finish_launch(p, top, key_low, fast, v)
            out["same_outputs"] = all(torch.equal(getattr(fast, f), getattr(base, f))
                                      for f in ("labels", "min_dist", "flag", "threshold")) \
                and torch.equal(fast.counts, base.counts)
            # (the list of flagged rows restarts every time: its count only grows, and would run past its end)
            out["ms"] = G.cuda_ms(lambda: (fast.counts.zero_(), A._finish_launch(p, top, key_low, fast, v)),
                                  reps=15)
        measured(row, {"variant": list(v)}, measure)
    return row


def main():
    sweep_main(SHAPES, run_shape)


if __name__ == "__main__":
    main()
