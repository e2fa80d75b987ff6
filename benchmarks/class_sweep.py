"""Launch shapes of FlashAssign's class pass (config.ClassConfig), in one process: same planes as the shipped
shape, then time (CUDA events, median after warm-up), with the sort that feeds it and without.

    python benchmarks/class_sweep.py --out F.json

Why: the pass gathers rows sorted by class, so it is bound by memory latency, not arithmetic; only the GPU can
rank its tile shapes, and the spread between processes is larger than the differences.
"""
from __future__ import annotations

import dataclasses

import torch

import gpu_check as G
from sweeps import measured, prepared, sweep_main
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import config

DEV = G.DEV
SHAPES = [(1 << 23, 1024, 128), (1 << 20, 8192, 128), (1 << 20, 4096, 64)]
VARIANTS = [(128, 64, 8, 2), (256, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (256, 32, 8, 1)]


def run_shape(n, k, d) -> dict:
    p = prepared(n, k, d)
    A._prepare_rows(p)
    top, tile_k, key_low = A._stream(p)
    row = {"n": n, "k": k, "d": d, "shipped": str(p.cfg.class_pass), "variants": []}
    base = top.clone()
    A._class_pass(p, base, tile_k, key_low)
    for v in VARIANTS:
        p.cfg = dataclasses.replace(p.cfg, class_pass=config.ClassConfig(*v))

        def measure(out):
            t = top.clone()
            A._class_pass(p, t, tile_k, key_low)
            out["same_bits"] = bool(torch.equal(t.view(torch.int32), base.view(torch.int32)))
            out["ms_with_sort"] = G.cuda_ms(lambda: A._class_pass(p, t, tile_k, key_low), reps=15)
        measured(row, {"variant": list(v)}, measure)
    labels = top[2].view(torch.int32).view(1, -1)
    row["sort_ms"] = G.cuda_ms(lambda: torch.sort(A.class_of(labels, tile_k, key_low).view(-1).to(torch.int16)),
                               reps=15)
    return row


def main():
    sweep_main(SHAPES, run_shape)


if __name__ == "__main__":
    main()
