"""FlashAssign as it is against an earlier copy of the kernels, in one process on the same tensors: the share of
rows the margin test flags, the fast pass (row pass, streaming pass, class pass, margin test), the resolve pass
and the whole assign, the variants taking turns (CUDA events, medians of rounds). Both are exact, so they must
give the same labels and distances; the first rows are also checked against the float64 argmin.

    mkdir -p DIR && git archive REV kernels | tar -x -C DIR --strip-components=1
    python benchmarks/assign_ab.py --old DIR [--old DIR2 ...] --out F.json [--shapes N:K:D,...]

Why: a change of the error bound moves work between the fast pass and the resolve pass, so only the sum tells,
and the flag rate depends on D and on the data (blobs here, as in gpu_check).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

import gpu_check as G
from provenance import gpu_run
from sweeps import measured, run_shapes, timed_in_turns
from flashkm_dist.engine import numerics_for
from flashkm_dist.kernels import assign as A

SHAPES = [(1 << 20, 4096, 1024), (1 << 20, 4096, 512), (1 << 20, 4096, 320), (1 << 20, 4096, 256),
          (1 << 23, 1024, 128)]
ROUNDS = 5
CHECK_ROWS = 1 << 16  # rows checked against the float64 argmin (reference.assign)


def _package(path: str, name: str):
    """The kernels copy in folder `path` as package `name` (its modules import each other relatively)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(name + ".assign")


def run_shape(n, k, d, olds) -> dict:
    x = G.blobs(n, d, min(k, 4096), torch.float16, seed=4)
    c = x[torch.randperm(n, device=G.DEV)[:k]].clone()
    shift = numerics_for(x, None, metric="euclidean").shift
    row = {"n": n, "k": k, "d": d, "variants": []}
    first = {}
    groups = {"assign_ms": [], "fast_pass_ms": [], "resolve_ms": []}
    for name, mod in olds + [("new", A)]:
        def check(out, mod=mod):
            labels, dist = mod.flash_assign(x, c, shift=shift)
            p = mod._prepare(x[None], c[None], "euclidean", shift)
            fast = mod._fast_pass(p)
            saved = fast.counts.clone()
            out["flagged_fraction"] = int(saved[0, 0]) / n
            if not first:
                first.update(labels=labels, dist=dist, flag=fast.flag)
                out["contract_violations"], out["labels_differing_from_float64"] = G.contract_violations(
                    x[:CHECK_ROWS], c, labels[:CHECK_ROWS])
            out["same_labels_and_distances"] = bool(torch.equal(labels, first["labels"])
                                                    and torch.equal(dist, first["dist"]))
            out["same_flags"] = bool(torch.equal(fast.flag, first["flag"]))

            def resolve():
                fast.counts.copy_(saved)
                mod._resolve(p, fast)
            groups["assign_ms"].append((out, lambda: mod.flash_assign(x, c, shift=shift)))
            groups["fast_pass_ms"].append((out, lambda: mod._fast_pass(p)))
            groups["resolve_ms"].append((out, resolve))
        measured(row, {"variant": name}, check)
    for key, runs in groups.items():
        timed_in_turns(runs, ROUNDS, reps=5, key=key)
        for out, _ in runs:
            out[key.replace("_ms", "_rounds_ms")] = out.pop("rounds_ms")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--old", action="append", default=[], help="a copy of an earlier kernels/ folder")
    ap.add_argument("--shapes", help="N:K:D,... (default: SHAPES)")
    args = ap.parse_args()
    olds = [(os.path.basename(os.path.normpath(path)), _package(path, f"old_kernels_{i}"))
            for i, path in enumerate(args.old)]
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    run_shapes(gpu_run(G.DEV), shapes, lambda n, k, d: run_shape(n, k, d, olds), args.out)


if __name__ == "__main__":
    main()
