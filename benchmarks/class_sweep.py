"""Variants of FlashAssign's class pass, in one process: its launch shape (config.ClassConfig) and the segments of
its sort (assign.CLASS_SEGMENT_ROWS), each giving the same planes as the shipped pass, timed with the sort that
feeds it (CUDA events), the variants taking turns over several rounds (medians).

    python benchmarks/class_sweep.py --out F.json [--streamed]

--streamed: launch shapes at D = 512 and 1024, where D is streamed through the product in chunks (the shipped
shape was chosen at D <= 128).

Why: the pass gathers rows sorted by class, so it is bound by memory traffic, not arithmetic; only the GPU can
rank its variants, and the GPU's speed drifts over a run by more than their differences, hence the turns.
"""
from __future__ import annotations

import dataclasses

import torch

import gpu_check as G
from sweeps import measured, prepared, sweep_main, timed_in_turns
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import config

DEV = G.DEV
SHAPES = [(1 << 23, 1024, 128), (1 << 22, 8192, 128), (1 << 20, 8192, 128), (1 << 20, 4096, 64)]
# (launch shape or None for the shipped one, (rows per class in a segment, least rows in a segment); the shipped
# segments first; (1 << 40, 0): one segment per batch)
SHIPPED_SEGMENTS = (A.CLASS_SEGMENT_ROWS, A.CLASS_SEGMENT_MIN_ROWS)
VARIANTS = [(None, SHIPPED_SEGMENTS), (None, (1 << 40, 0)), (None, (2048, 0)), (None, (8192, 1 << 20)),
            (None, (32768, 0))]
STREAMED_SHAPES = [(1 << 20, 4096, 1024), (1 << 20, 4096, 512)]
STREAMED_VARIANTS = [(shape, SHIPPED_SEGMENTS) for shape in
                     (None, (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
                      (128, 32, 4, 3), (64, 32, 4, 3))]
ROUNDS = 5


def run_shape(n, k, d, variants=VARIANTS) -> dict:
    p = prepared(n, k, d)
    A._prepare_rows(p)
    top, tile_k, key_low = A._stream(p)
    row = {"n": n, "k": k, "d": d, "shipped": [str(p.cfg.class_pass), SHIPPED_SEGMENTS], "variants": []}
    base = top.clone()
    A._class_pass(p, base, tile_k, key_low)
    shipped, runs = p.cfg, []
    for shape, seg in variants:
        cfg = shipped if shape is None else dataclasses.replace(shipped, class_pass=config.ClassConfig(*shape))

        def run(t, cfg=cfg, seg=seg):
            p.cfg, (A.CLASS_SEGMENT_ROWS, A.CLASS_SEGMENT_MIN_ROWS) = cfg, seg
            A._class_pass(p, t, tile_k, key_low)

        def check(out, run=run):
            t = top.clone()
            run(t)
            out["same_bits"] = bool(torch.equal(t.view(torch.int32), base.view(torch.int32)))
            runs.append((out, lambda: run(t)))
        measured(row, {"variant": [shape, seg]}, check)
    try:
        timed_in_turns(runs, ROUNDS, reps=9, key="ms_with_sort")
    finally:
        p.cfg, (A.CLASS_SEGMENT_ROWS, A.CLASS_SEGMENT_MIN_ROWS) = shipped, SHIPPED_SEGMENTS
    return row


def main():
    sweep_main(SHAPES, run_shape, streamed=(STREAMED_SHAPES, lambda n, k, d: run_shape(n, k, d, STREAMED_VARIANTS)))


if __name__ == "__main__":
    main()
