"""Variants of the sm_90 streaming pass (config.StreamConfig fields), in one process: same bits as the shipped
config, then time (CUDA events; the variants take turns over rounds, medians).

    python benchmarks/stream_variants.py --out F.json [--variants '[{"block_n": 64}]']

Why: the pass's shape (rows per scorer, registers, ring depth, persistent programs) is a
choice that only the GPU can rank, and run-to-run spread between processes is ~10 %, so candidates
are compared against the shipped config in the same process, on the same prepared operands, taking turns. Each
variant's output planes (best key, second key, label) must equal the shipped config's bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import gpu_check as G
from provenance import gpu_run
from sweeps import measured, prepared, run_shapes, timed_in_turns
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import assign_sm90, config

DEV = G.DEV
SHAPES = [(1 << 20, 8192, 128), (1 << 23, 1024, 128), (1 << 20, 65536, 128), (1 << 20, 4096, 64),
          (1 << 20, 4096, 256), (32 * 75_600, 1000, 128), (1 << 20, 8192 + 128, 128)]
# (the last: an odd number of centroid tiles; the one before: the batched row's rows as one batch)
VARIANTS = [{}, {"programs": 0}]  # (shipped: persistent programs; 0: one program per row pair)
ROUNDS = 6


def variant_config(p, v: dict):
    """The shipped StreamConfig with v's fields; the ring as deep as shared memory allows unless v sets it."""
    sc = dataclasses.replace(p.cfg.stream, **v)
    if "stages" not in v:
        sc = dataclasses.replace(sc, stages=config.stream_ring_slots(
            config.device_traits(DEV), sc.block_n, p.c_fast.shape[-1], sc.block_k))
    return sc


def run_shape(n, k, d, variants, rounds=ROUNDS) -> dict:
    """Every variant's bits against the shipped config's, then its time: the variants take turns, `rounds`
    times, and each reports the median of its rounds (the GPU's speed drifts by up to 10 % over a run, so a
    variant timed after another is not comparable)."""
    p = prepared(n, k, d)
    A._prepare_rows(p)
    row = {"n": n, "k": k, "d": d, "shipped": str(p.cfg.stream), "variants": []}
    if p.cfg.stream is None:
        return row
    key_low = config.key_bits(p.c_fast.shape[1], p.cfg.stream.block_k)
    base = assign_sm90.stream(p.a_fast, p.rowstat, p.c_fast, p.cc, p.cfg.stream, key_low).view(torch.int32).clone()
    runs = []
    for v in variants:
        sc = variant_config(p, v)

        def check(out, sc=sc):
            if p.a_fast.shape[1] % sc.rows:
                raise ValueError(f"prepared rows {p.a_fast.shape[1]} are not a multiple of {sc.rows}")
            top = assign_sm90.stream(p.a_fast, p.rowstat, p.c_fast, p.cc, sc, key_low)
            out["same_bits"] = bool(torch.equal(top.view(torch.int32), base))
            runs.append((out, lambda: assign_sm90.stream(p.a_fast, p.rowstat, p.c_fast, p.cc, sc, key_low)))
        measured(row, {"variant": v, "config": str(sc)}, check)
    timed_in_turns(runs, rounds, reps=5)
    for out, _ in runs:
        out["tflops"] = 2 * n * k * d / out["ms"] / 1e9
        print(json.dumps({key: v for key, v in out.items() if key != "rounds_ms"}), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=None, help="JSON list of StreamConfig overrides ({} = shipped)")
    args = ap.parse_args()
    variants = json.loads(args.variants) if args.variants else VARIANTS
    result = {**gpu_run(DEV), "matmul_tflops_fp16": G.matmul_tflops(torch.float16)}
    run_shapes(result, SHAPES, lambda n, k, d: run_shape(n, k, d, variants), args.out)


if __name__ == "__main__":
    main()
