"""Where the kernel time goes: per-kernel CUDA times of one assign and one Lloyd step, the share of rows the
margin test flags, and a sweep of FlashAssign launch configurations (to check the derived choice).

    python benchmarks/profile_kernels.py --out profile.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

from flashkm_dist.engine import REFERENCE, backend_for, lloyd_step, numerics_for
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import config as C
from flashkm_dist.kernels.update import sort_inverse_update

DEV = torch.device("cuda")


def cuda_ms(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def blobs(n, d, k, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    centers = torch.randn(k, d, device=DEV, generator=g) * 4
    return (centers[torch.randint(0, k, (n,), device=DEV, generator=g)]
            + torch.randn(n, d, device=DEV, generator=g)).to(dtype)


def kernel_table(fn, top=12):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith("aten::") and not e.key.startswith("cuda"):
            rows.append((e.key[:80], round(t / 1e3, 4), e.count))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def case(n, k, d, dtype):
    x = blobs(n, d, min(k, 4096), dtype)
    c = x[torch.randperm(n, device=DEV)[:k]].clone()
    nm = numerics_for(x, None, metric="euclidean")
    out = {"shape": [n, k, d, str(dtype)]}
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    fast = A._fast_pass(p)
    out["flagged_fraction"] = float(fast.flagged.float().mean())
    out["config"] = dataclasses.asdict(p.cfg)
    out["assign_ms"] = cuda_ms(lambda: A.flash_assign(x, c, shift=nm.shift))
    out["fast_pass_ms"] = cuda_ms(lambda: A._fast_pass(A._prepare(x[None], c[None], "euclidean", nm.shift)))
    out["prepare_ms"] = cuda_ms(lambda: A._prepare(x[None], c[None], "euclidean", nm.shift))
    out["row_pass_ms"] = cuda_ms(lambda: A._prepare_rows(p))
    labels = fast.labels[0]
    out["update_ms"] = cuda_ms(lambda: sort_inverse_update(x, labels, k, scale=nm.scale))
    out["sort_ms"] = cuda_ms(lambda: torch.sort(labels.to(torch.int32)))
    out["step_ms"] = cuda_ms(lambda: lloyd_step(x, c, nm, backend=backend_for(DEV)))
    out["assign_kernels"] = kernel_table(lambda: A.flash_assign(x, c, shift=nm.shift))
    out["step_kernels"] = kernel_table(lambda: lloyd_step(x, c, nm, backend=backend_for(DEV)))
    return out, x, c, nm


def sweep(x, c, nm):
    base = C.assign_config(DEV, c.shape[0], x.shape[1], x.dtype)
    results = []
    for block_n, block_k, stages, warps in itertools.product((64, 128, 256), (64, 128), (2, 3, 4), (4, 8)):
        cfg = dataclasses.replace(base, block_n=block_n, block_k=block_k, num_stages=stages, num_warps=warps)
        A.assign_config = lambda *a, _cfg=cfg, **k: _cfg
        try:
            ms = cuda_ms(lambda: A._fast_pass(A._prepare(x[None], c[None], "euclidean", nm.shift)), 1, 3)
            results.append({"block_n": block_n, "block_k": block_k, "stages": stages, "warps": warps, "ms": ms})
        except Exception as err:
            results.append({"block_n": block_n, "block_k": block_k, "stages": stages, "warps": warps,
                            "error": repr(err)[:200]})
    A.assign_config = C.assign_config
    ok = sorted([r for r in results if "ms" in r], key=lambda r: r["ms"])
    return {"derived": dataclasses.asdict(base), "best": ok[:6], "all": results}


def update_sweep():
    """Sort-inverse update time against the number of programs and the tile height."""
    from flashkm_dist.kernels import update as U
    out = []
    for n, k in ((1 << 20, 8192), (1 << 23, 1024)):
        x = blobs(n, 128, 1024, torch.float16)
        labels = torch.randint(0, k, (n,), device=DEV)
        nm = numerics_for(x, None, metric="euclidean")
        base = C.update_config(DEV, 128, x.dtype)
        for tiles, block_n, block_d, warps in itertools.product((1, 4, 16), (64, 128, 256), (64, 128), (4, 8)):
            cfg = dataclasses.replace(base, tiles_per_chunk=tiles, block_n=block_n, block_d=block_d,
                                      num_warps=warps)
            U.update_config = lambda *a, _cfg=cfg, **kw: _cfg
            try:
                ms = cuda_ms(lambda: sort_inverse_update(x, labels, k, scale=nm.scale), 1, 3)
            except Exception as err:
                ms = repr(err)[:100]
            out.append({"n": n, "k": k, "tiles": tiles, "block_n": block_n, "block_d": block_d, "warps": warps,
                        "ms": ms})
        U.update_config = C.update_config
        out.append({"n": n, "k": k, "derived": dataclasses.asdict(base),
                    "ms": cuda_ms(lambda: sort_inverse_update(x, labels, k, scale=nm.scale), 1, 3)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--update-sweep", action="store_true", help="only sweep the update kernel's launch")
    args = ap.parse_args()
    if args.update_sweep:
        res = update_sweep()
        for r in res:
            print(json.dumps(r))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    result = {}
    for name, shape in [("1M_8192_fp16", (1 << 20, 8192, 128, torch.float16)),
                        ("8M_1024_fp16", (1 << 23, 1024, 128, torch.float16)),
                        ("1M_8192_fp32", (1 << 20, 8192, 128, torch.float32))]:
        try:
            out, x, c, nm = case(*shape)
            if name == "1M_8192_fp16":
                out["sweep"] = sweep(x, c, nm)
            result[name] = out
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        print(name, json.dumps(result[name])[:6000], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
