"""Variants of FlashAssign's finishing kernel (margin test and float64 distance of the label), in one process:
its launch shape and whether x's batch offset is known to keep 16-byte loads (`assign._xb16`); each must give the
shipped kernel's outputs, then the variants take turns over several rounds (CUDA events, medians).

    python benchmarks/finish_sweep.py --out F.json

Why: at large N and small K the pass is a visible share of the iteration (0.83 ms at N=8M, K=1024), though it
reads each row once; its float64 work per element (two conversions, a subtraction, a product) is what the shapes
trade against memory latency.
"""
from __future__ import annotations


import torch

import gpu_check as G
from sweeps import measured, prepared, sweep_main, timed_in_turns
from flashkm_dist.kernels import assign as A

DEV = G.DEV
SHAPES = [(1 << 23, 1024, 128), (1 << 20, 8192, 128)]
# (rows per program, float64 chunk, warps) or None for the shipped shape; 16-byte loads of x (False: the
# compiler is told nothing about x's batch stride, as before `_xb16`)
VARIANTS = [(None, True), (None, False), ((64, 32, 4), True), ((64, 64, 4), True), ((32, 16, 4), True)]
ROUNDS = 5


def run_shape(n, k, d) -> dict:
    p = prepared(n, k, d)
    base = A._fast_pass(p)
    top, tile_k, key_low = A._stream(p)
    A._class_pass(p, top, tile_k, key_low)
    row = {"n": n, "k": k, "d": d, "shipped": p.cfg.finish, "variants": []}
    runs, xb16 = [], A._xb16
    for shape, wide in VARIANTS:
        def run(fast, shape=shape, wide=wide):
            A._xb16 = xb16 if wide else (lambda x: False)
            fast.counts.zero_()  # (the list of flagged rows restarts: its count only grows)
            A._finish_launch(p, top, key_low, fast, shape)

        def check(out, run=run):
            fast = A._fast_pass(p)  # (fresh outputs: the kernel appends flagged rows to the list)
            run(fast)
            out["same_outputs"] = all(torch.equal(getattr(fast, f), getattr(base, f))
                                      for f in ("labels", "min_dist", "flag", "threshold", "counts"))
            runs.append((out, lambda: run(fast)))
        measured(row, {"variant": [shape, wide]}, check)
    try:
        timed_in_turns(runs, ROUNDS, reps=9)
    finally:
        A._xb16 = xb16
    return row


def main():
    sweep_main(SHAPES, run_shape)


if __name__ == "__main__":
    main()
