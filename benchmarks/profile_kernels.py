"""Where the kernel time goes: per-kernel CUDA times of one assign and one Lloyd step, the share of rows the
margin test flags (and how the resolve pass's tiers split them), the time of each piece of FlashAssign, a sweep
of the resolve pass's launch configuration, and optionally of the streaming kernel's (--sweep-main).

    python benchmarks/profile_kernels.py --out profile.json [--cases A,B] [--old kernels/_old_assign.py] [--sweep-main]

--old names a previous version of kernels/assign.py placed inside kernels/ (e.g. `git show REV:kernels/assign.py
> kernels/_old_assign.py`): its flash_assign is timed on the same tensors, in the same process; --old-update
does the same for kernels/update.py (and checks that both give the same bits).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import re
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

from flashkm_dist.engine import backend_for, numerics_for
from flashkm_dist.streaming import Block, Engine
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


def kernel_times(fn):
    """(name, device ms, count) of every kernel and copy of one call of fn, longest first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return device_rows(prof)


def device_rows(prof, digits: int = 4) -> list:
    """(name, device ms, count) of every kernel and copy a finished profiler saw, longest first."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith("aten::") and not e.key.startswith("cuda"):
            rows.append((e.key[:80], round(t / 1e3, digits), e.count))
    rows.sort(key=lambda r: -r[1])
    return rows


def kernel_table(fn, top=12):
    return kernel_times(fn)[:top]


def pieces(x, c, nm):
    """CUDA time of each piece of one flash_assign (run one after the other, each repeated)."""
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    fast = A._fast_pass(p)
    saved = fast.counts.clone()

    def resolve_only():
        fast.counts.copy_(saved)
        A._resolve_launch(p, fast)

    def resolve():
        fast.counts.copy_(saved)
        A._resolve(p, fast)

    def brute(rows):  # the last tier on `rows` rows forced into its list (it usually has none)
        fast.counts.copy_(saved)
        fast.counts[:, 1] = rows
        fast.lists[1, 0, :rows] = torch.arange(rows, device=x.device, dtype=torch.int32)
        A._brute_launch(p, fast)

    return {"brute_1_row_ms": cuda_ms(lambda: brute(1)), "brute_64_rows_ms": cuda_ms(lambda: brute(64)),
            "prepare_ms": cuda_ms(lambda: A._prepare(x[None], c[None], "euclidean", nm.shift)),
            "row_pass_ms": cuda_ms(lambda: A._prepare_rows(p)),
            "row_and_main_ms": cuda_ms(lambda: A._fast_pass(p)),
            "resolve_pass_ms": cuda_ms(resolve_only),
            "resolve_and_brute_ms": cuda_ms(resolve)}


def tiers(x, c, nm):
    """How many rows each path of the resolve pass sees."""
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    fast = A._fast_pass(p)
    A._resolve(p, fast)
    flagged, brute, widened, _ = fast.counts.sum(0).tolist()
    return {"flagged_fraction": flagged / x.shape[0], "wide_tile_rows": widened, "brute_rows": brute}


def resolve_sweep(x, c, nm, combos):
    """Resolve pass time against its launch configuration (the flagged rows of this case)."""
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    fast = A._fast_pass(p)
    saved = fast.counts.clone()
    base = p.cfg
    sms = C.device_traits(DEV).sm_count
    results = []
    for bn, bk, w, s, per_sm, quick in combos:
        p.cfg = dataclasses.replace(base, resolve=C.ResolveConfig(bn, bk, w, s, per_sm * sms, quick))

        def run():
            fast.counts.copy_(saved)
            A._resolve_launch(p, fast)
        row = {"block_n": bn, "block_k": bk, "warps": w, "stages": s, "programs_per_sm": per_sm, "quick": quick}
        try:
            row["ms"] = cuda_ms(run, 2, 7)
        except Exception as err:
            row["error"] = repr(err)[:200]
        results.append(row)
    p.cfg = base
    ok = sorted([r for r in results if "ms" in r], key=lambda r: r["ms"])
    return {"derived": dataclasses.asdict(base.resolve), "best": ok[:5], "all": results}


def rows_sweep(x, c, nm):
    """Row pass time against its launch configuration."""
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    base = p.cfg
    results = []
    for bn, bd, w, s in itertools.product((32, 64, 128), (64, 128), (2, 4, 8), (1, 2)):
        p.cfg = dataclasses.replace(base, rows_block_n=bn, rows_block_d=bd, rows_warps=w, rows_stages=s)
        row = {"block_n": bn, "block_d": bd, "warps": w, "stages": s}
        try:
            row["ms"] = cuda_ms(lambda: A._prepare_rows(p), 1, 5)
        except Exception as err:
            row["error"] = repr(err)[:200]
        results.append(row)
    p.cfg = base
    ok = sorted([r for r in results if "ms" in r], key=lambda r: r["ms"])
    return {"derived": [base.rows_block_n or base.block_n, base.row_block_d, base.rows_warps or base.num_warps,
                        base.rows_stages], "best": ok[:6], "all": results}


# (block_n, block_k, warps, stages, programs per SM, quick); the first is repeated last to show the noise
RESOLVE_COMBOS = [(64, 128, 4, 2, 2, True), (64, 128, 4, 2, 2, False), (64, 128, 4, 2, 4, True),
                  (128, 128, 4, 2, 2, True), (128, 128, 8, 2, 1, True), (64, 64, 4, 3, 4, True),
                  (64, 128, 8, 2, 2, True), (64, 64, 4, 3, 2, True), (64, 64, 4, 2, 4, True),
                  (64, 64, 8, 3, 2, True), (32, 64, 4, 3, 4, True), (64, 128, 4, 2, 2, True)]


# (N, K, D, dtype); blobs, or standard normal rows (the Dask benchmarks' data) for names ending in "normal"
CASES = {"1M_8192_fp16": (1 << 20, 8192, 128, torch.float16), "8M_1024_fp16": (1 << 23, 1024, 128, torch.float16),
         "1M_8192_fp32": (1 << 20, 8192, 128, torch.float32), "1M_65536_fp16": (1 << 20, 65536, 128, torch.float16),
         "16M_32768_fp16_normal": (1 << 24, 32768, 128, torch.float16),
         "1M_4096_d1024_fp16": (1 << 20, 4096, 1024, torch.float16),
         "1M_4096_d512_fp16": (1 << 20, 4096, 512, torch.float16)}


def case(n, k, d, dtype, old=None, old_update=None, normal=False):
    x = torch.randn(n, d, device=DEV).to(dtype) if normal else blobs(n, d, min(k, 4096), dtype)
    c = x[torch.randperm(n, device=DEV)[:k]].clone()
    nm = numerics_for(x, None, metric="euclidean")
    out = {"shape": [n, k, d, str(dtype)]}
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    out["config"] = dataclasses.asdict(p.cfg)
    labels, dist = A.flash_assign(x, c, shift=nm.shift)
    if old is not None:
        old_labels, old_dist = old.flash_assign(x, c, shift=nm.shift)
        out["same_as_old"] = bool(torch.equal(labels, old_labels) and torch.equal(dist, old_dist))
        out["old_assign_ms"] = cuda_ms(lambda: old.flash_assign(x, c, shift=nm.shift))
    out["assign_ms"] = cuda_ms(lambda: A.flash_assign(x, c, shift=nm.shift))
    out.update(tiers(x, c, nm))
    out.update(pieces(x, c, nm))
    out["update_ms"] = cuda_ms(lambda: sort_inverse_update(x, labels, k, scale=nm.scale))
    if old_update is not None:
        new, prev = (f(x, labels, k, scale=nm.scale) for f in (sort_inverse_update, old_update.sort_inverse_update))
        out["update_same_as_old"] = bool(torch.equal(new.sums, prev.sums) and torch.equal(new.weights, prev.weights))
        out["old_update_ms"] = cuda_ms(lambda: old_update.sort_inverse_update(x, labels, k, scale=nm.scale))
    engine = Engine(DEV, dtype=x.dtype, backend=backend_for(DEV))
    out["step_ms"] = cuda_ms(lambda: engine.step([Block(x)], c, nm))
    out["assign_kernels"] = kernel_table(lambda: A.flash_assign(x, c, shift=nm.shift))
    out["step_kernels"] = kernel_table(lambda: engine.step([Block(x)], c, nm))
    out["update_kernels"] = kernel_table(lambda: sort_inverse_update(x, labels, k, scale=nm.scale))
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
    """Sort-inverse update time against the tile height and width, the warps and the chunk length, on long runs
    (N=8M, K=1024: 8192 rows a cluster), short ones (N=1M, K=8192; gpu_check's batched row: B * K = 32000 runs
    of about 75 rows) and at D=256. The range checks are deferred, as a Lloyd step defers them: no wait inside
    the timing."""
    from flashkm_dist.kernels import update as U
    from flashkm_dist.kernels.checks import DeferredChecks
    out = []
    for n, k, d in ((1 << 23, 1024, 128), (32 * 75_600, 32 * 1000, 128), (1 << 20, 8192, 128), (1 << 20, 4096, 256)):
        x = blobs(n, d, 1024, torch.float16)
        labels = torch.randint(0, k, (n,), device=DEV)
        nm = numerics_for(x, None, metric="euclidean")
        base = C.update_config(DEV, d, x.dtype)
        run = lambda: sort_inverse_update(x, labels, k, scale=nm.scale, deferred=DeferredChecks())  # noqa: E731
        for tiles, block_n, block_d, warps in itertools.product((16, 64), (8, 16, 32), (64, 128), (1, 2, 4)):
            cfg = dataclasses.replace(base, tiles_per_chunk=tiles, block_n=block_n, block_d=block_d,
                                      num_warps=warps)
            U.update_config = lambda *a, _cfg=cfg, **kw: _cfg
            try:
                ms = cuda_ms(run, 1, 5)
            except Exception as err:
                ms = repr(err)[:100]
            out.append({"n": n, "k": k, "d": d, "tiles": tiles, "block_n": block_n, "block_d": block_d,
                        "warps": warps, "ms": ms})
        U.update_config = C.update_config
        out.append({"n": n, "k": k, "d": d, "derived": dataclasses.asdict(base), "ms": cuda_ms(run, 1, 5)})
    return out


def batched_phases(x, c, k):
    """CUDA ms of the pieces of a batched fit, each timed alone: the set-up (moments and per-problem numerics),
    the kept rows, one assign with them, one update of all B * N rows, and fits of 1, 2 and 10 iterations (their
    differences are the cost of an iteration with everything around it)."""
    from flashkm_dist import batched, batched_kmeans
    b, n, d = x.shape
    backend = backend_for(DEV)
    out = {"moments_ms": cuda_ms(lambda: batched._problem_moments(x), 1, 3)}
    moments = batched._problem_moments(x)
    out["numerics_ms"] = cuda_ms(lambda: batched._problem_numerics(moments, "euclidean", 0.0), 1, 3)
    nm = batched._problem_numerics(moments, "euclidean", 0.0)
    shift = torch.stack([m.shift for m in nm])
    out["kept_rows_ms"] = cuda_ms(lambda: backend.kept_rows(x), 1, 3)
    kept = backend.kept_rows(x)
    out["assign_kept_ms"] = cuda_ms(lambda: backend.assign(x, c, shift=shift, rows=kept), 1, 5)
    out["assign_fresh_ms"] = cuda_ms(lambda: backend.assign(x, c, shift=shift), 1, 5)
    labels, _ = backend.assign(x, c, shift=shift, rows=kept)
    flat = (labels + (torch.arange(b, device=DEV) * k)[:, None]).reshape(-1)
    out["update_ms"] = cuda_ms(lambda: backend.partial_sums(x.reshape(b * n, d), flat, b * k, scale=nm[0].scale),
                               1, 5)
    for iters in (1, 2, 10):
        out[f"fit_{iters}_iters_ms"] = cuda_ms(lambda: batched_kmeans(x, k, init=c, max_iter=iters, tol=0.0), 1, 3)
    out["loop"] = batched_loop_times(x, c, k, nm, shift, kept)
    launch_bound = batched.LAUNCH_BOUND
    try:  # every iteration after the first replayed as a graph, whatever its launches took
        batched.LAUNCH_BOUND = 0.0
        out["fit_10_iters_graphed_ms"] = cuda_ms(lambda: batched_kmeans(x, k, init=c, max_iter=10, tol=0.0), 1, 3)
    finally:
        batched.LAUNCH_BOUND = launch_bound
    return out


def batched_loop_times(x, c, k, nm, shift, kept, iters=6):
    """Host ms of each batched iteration op by op: queuing its launches, then waiting for its one read-back
    (a device-bound iteration waits; a launch-bound one hardly does)."""
    import functools
    import time

    from flashkm_dist import batched
    b = x.shape[0]
    backend = backend_for(DEV)
    tols = torch.zeros(b, dtype=torch.float64, device=DEV)
    offsets = (torch.arange(b, device=DEV) * k)[:, None]
    assign = functools.partial(backend.assign, rows=kept)
    state = batched._Progress(c.clone(), torch.ones(b, dtype=torch.bool, device=DEV),
                              torch.zeros(b, dtype=torch.int64, device=DEV))
    prev, rows = None, []
    torch.cuda.synchronize()
    for it in range(1, iters + 1):
        t0 = time.perf_counter()
        labels, _, after, packed, _ = batched._iteration_on_device(assign, backend, x, offsets, k, nm[0].scale, tols,
                                                                   "euclidean", shift, state, prev, it)
        t1 = time.perf_counter()
        packed.tolist()
        t2 = time.perf_counter()
        rows.append({"queue_ms": (t1 - t0) * 1e3, "wait_ms": (t2 - t1) * 1e3})
        state, prev = after, labels
    return rows


def batched_profile():
    """Where gpu_check's batched row (B=32, N=75600, K=1000, fp16, 10 iterations) spends its time: per-kernel CUDA
    times, the Python functions by cumulative time, and how often empty clusters were re-seeded."""
    import cProfile
    import io
    import pstats

    from flashkm_dist import batched, batched_kmeans
    b, n, k, d = 32, 75_600, 1000, 128
    x = torch.randn(b, n, d, device=DEV, dtype=torch.float16)
    c = x[:, :k].clone()
    run = lambda: batched_kmeans(x, k, init=c, max_iter=10, tol=0.0)  # noqa: E731
    out = {"ms": cuda_ms(run, 1, 3), "kernels": kernel_table(run, top=20), "phases": batched_phases(x, c, k)}
    small = torch.randn(8, 10_000, 64, device=DEV, dtype=torch.float16)  # (gpu_check's small batched row)
    out["small_phases"] = batched_phases(small, small[:, :64].clone(), 64)
    reseeds = []
    original = batched.reseed_empty_clusters
    batched.reseed_empty_clusters = lambda *a, **kw: reseeds.append(1) or original(*a, **kw)
    prof = cProfile.Profile()
    prof.enable()
    run()
    torch.cuda.synchronize()
    prof.disable()
    batched.reseed_empty_clusters = original
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(25)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    out["python"] = [re.sub(r"\S*site-packages/", "", line.replace(root, ""))  # paths relative to the packages
                     for line in text.getvalue().splitlines()[:60]]
    out["problems_reseeded"] = len(reseeds)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--update-sweep", action="store_true", help="only sweep the update kernel's launch")
    ap.add_argument("--sweep-main", action="store_true", help="also sweep the streaming kernel's launch")
    ap.add_argument("--no-resolve-sweep", action="store_true")
    ap.add_argument("--rows-sweep", action="store_true", help="sweep the row pass's launch (on N=8M)")
    ap.add_argument("--old", help="a previous assign.py inside kernels/, timed on the same tensors")
    ap.add_argument("--old-update", help="a previous update.py inside kernels/, timed on the same tensors")
    ap.add_argument("--batched", action="store_true", help="only profile the batched API (gpu_check's row)")
    ap.add_argument("--cases", default="1M_8192_fp16,8M_1024_fp16,1M_8192_fp32",
                    help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    old, old_update = (importlib.import_module("flashkm_dist.kernels." + os.path.splitext(os.path.basename(p))[0])
                       if p else None for p in (args.old, args.old_update))
    if args.batched:
        res = batched_profile()
        print(json.dumps(res, indent=1))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if args.update_sweep:
        res = update_sweep()
        for r in res:
            print(json.dumps(r))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    result = {}
    for name in args.cases.split(","):
        shape = CASES[name]
        try:
            out, x, c, nm = case(*shape, old=old, old_update=old_update, normal=name.endswith("normal"))
            if name == "1M_8192_fp16" and args.sweep_main:
                out["sweep"] = sweep(x, c, nm)
            if not args.no_resolve_sweep:
                out["resolve_sweep"] = resolve_sweep(x, c, nm, RESOLVE_COMBOS)
            if name == "8M_1024_fp16" and args.rows_sweep:
                out["rows_sweep"] = rows_sweep(x, c, nm)
            result[name] = out
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        print(name, json.dumps(result[name])[:6000], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
