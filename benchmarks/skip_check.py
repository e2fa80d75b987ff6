"""The estimator on a GPU over NumPy rows larger than its (here deliberately small) device cache: algorithm='hamerly'
leaves the host rows its bounds settle on the host (`Engine.skip_settled`); its fit must equal algorithm='lloyd'
to the bit (centres, labels, inertia, iterations), with and without sample weights.

    python benchmarks/skip_check.py --out skip.json [--n 4000000] [--k 512] [--d 32] [--cache-mib 256]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from provenance import provenance


def fit(x, w, algorithm, k, seed):
    from flashkm_dist import KMeans
    start = time.perf_counter()
    model = KMeans(k, init="random", n_init=1, max_iter=25, tol=0.0, random_state=seed, device="cuda",
                   algorithm=algorithm).fit(x, sample_weight=w)
    return model, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--cache-mib", type=int, default=256)
    args = ap.parse_args()
    os.environ["FLASHKM_CACHE_BYTES"] = str(args.cache_mib << 20)  # (read by every engine the fits make)
    import torch
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.k, args.d)).astype(np.float32) * 4
    x = centres[rng.integers(0, args.k, args.n)] + rng.normal(size=(args.n, args.d)).astype(np.float32)
    result = {**provenance(), "device": torch.cuda.get_device_name(), "n": args.n, "k": args.k, "d": args.d,
              "host_MiB": x.nbytes >> 20, "cache_MiB": args.cache_mib, "cases": []}
    for weighted in (False, True):
        w = rng.uniform(0, 2, args.n).astype(np.float64) if weighted else None
        if weighted:
            w[::13] = 0.0
        lloyd, t_lloyd = fit(x, w, "lloyd", args.k, 1)
        hamerly, t_hamerly = fit(x, w, "hamerly", args.k, 1)
        skipped = [h["iteration"] for h in hamerly.history_ if math.isnan(h["inertia"])]
        case = {"weighted": weighted, "n_iter": [lloyd.n_iter_, hamerly.n_iter_],
                "same_centres": bool(np.array_equal(lloyd.cluster_centers_, hamerly.cluster_centers_)),
                "same_labels": bool(np.array_equal(lloyd.labels_, hamerly.labels_)),
                "same_inertia": lloyd.inertia_ == hamerly.inertia_, "inertia": [lloyd.inertia_, hamerly.inertia_],
                "iterations_that_skipped": skipped, "fit_seconds": [t_lloyd, t_hamerly],
                "seconds_per_iteration": [[h["seconds"] for h in m.history_] for m in (lloyd, hamerly)]}
        result["cases"].append(case)
        print(json.dumps({k: v for k, v in case.items() if k != "seconds_per_iteration"}), flush=True)
    result["all_equal"] = all(c["same_centres"] and c["same_labels"] and c["same_inertia"] and c["n_iter"][0] ==
                              c["n_iter"][1] and c["iterations_that_skipped"] for c in result["cases"])
    result["command"] = "python benchmarks/skip_check.py --out F " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("all_equal", result["all_equal"])


if __name__ == "__main__":
    main()
