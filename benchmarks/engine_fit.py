"""Lloyd iterations of a real fit on one GPU over host-pinned rows (the engine, its cache), plain against bounded
(Hamerly) steps, with flash-kmeans' `kmeans_largeN` timed on the same data in the same process.

    python benchmarks/engine_fit.py --out fit.json [--log2n 24 | --n 180000000] [--k 8192] [--iters 12]

The fits (plain; bounded; bounded skipping the settled host rows past the cache, `Engine.skip_settled`; variants
of it with other engine settings, FITS) start
from the same random rows and run `lloyd.lloyd_iteration` (step, exact update, re-seeding) the same number of
times; the centres and the labels changed must agree after every iteration, the inertia wherever a step knows it
(a skipping step does not), and a last complete step of each fit must give plain's inertia (--tier-ab: also a
plain fit without FlashAssign's neighbour tier, checked the same way). Each iteration's seconds, rows scored
(bounded), labels changed and Triton compiles started are reported, with the means over all iterations and over
the later half, against flash-kmeans' seconds per iteration and the PCIe time of the rows the cache does not hold.
--profile-at N profiles iteration N of each fit: its longest kernels and its streams' timeline (`stream_timeline`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from engine_check import DEV, flash_largeN_iter_s, h2d_gbps, host_blobs, host_numerics, quarters
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import host_rows
from flashkm_dist.lloyd import lloyd_iteration
from flashkm_dist import streaming as S
from flashkm_dist.streaming import Engine
from profile_kernels import device_rows
from provenance import provenance
import stream_timeline


def profiled(fn, top: int = 14) -> dict:
    """One call of fn under the profiler (it must not be repeated: a Lloyd iteration moves the centres): its
    wall seconds, summed device time and the longest kernels and copies (name, ms, count)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    rows = device_rows(prof, digits=3)
    return {"wall_s": wall, "device_ms": round(sum(r[1] for r in rows), 3), "kernels": rows[:top],
            "timeline": stream_timeline.gaps(stream_timeline.device_ops(prof)),
            "host_waits": stream_timeline.host_waits(prof)[:8]}


def profiled_iteration(engine, blocks, centers, nm, top: int = 14):
    """(the Lloyd iteration, `profiled`'s record of it)."""
    out = {}
    prof = profiled(lambda: out.update(it=lloyd_iteration(engine, blocks, centers, nm)), top=top)
    return out["it"], prof


def compiled_kernels() -> int:
    """Entries in Triton's on-disk kernel cache (a first iteration's time includes the compiles it starts)."""
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")
    return len(os.listdir(root)) if os.path.isdir(root) else 0


def run(x, init, nm, iters: int, bounds: bool, profile: bool = False, skip: bool = False,
        cache_bytes="auto", profile_at: int = 0, chunk_rows: int | None = None) -> dict:
    engine = Engine(DEV, chunk_rows=chunk_rows, bounds=bounds, skip_settled=skip, cache_bytes=cache_bytes)
    blocks = quarters(x)
    centers, rows = init, []
    for i in range(iters):
        torch.cuda.synchronize()
        compiled = compiled_kernels()
        start = time.perf_counter()
        if i + 1 == profile_at:  # (this iteration under the profiler: its seconds include the profiler's cost)
            it, at = profiled_iteration(engine, blocks, centers, nm, top=24)
        else:
            it = lloyd_iteration(engine, blocks, centers, nm)
        rows.append({"iteration": i + 1, "seconds": time.perf_counter() - start, "rescored": it.step.rescored,
                     "host_rows_read_in_place": it.step.gathered, "stale_share": engine._stale_share,
                     "labels_changed": it.step.n_changed,
                     "inertia": it.inertia, "kernels_compiled": compiled_kernels() - compiled})
        centers = it.centers
        rows[-1]["centers"] = centers.cpu()
    if profile:  # (one more iteration, after the timed ones)
        it, prof = profiled_iteration(engine, blocks, centers, nm)
        prof["rescored"], prof["host_rows_read_in_place"] = it.step.rescored, it.step.gathered
        centers = it.centers
    final = engine.step(blocks, centers, nm, complete=True)  # (every row: the inertia of the last centres)
    cached = sum(t.numel() * t.element_size() for t in engine._cache.values())
    engine.release()
    return {"iterations": rows, "cache_bytes": cached, "final_inertia": float(fp.to_float(final.inertia,
                                                                                     nm.scale.dist_exp)),
            **({"profile": prof} if profile else {}), **({"profile_at": at} if 0 < profile_at <= iters else {})}


def lower_bound_check(x: torch.Tensor, centers: torch.Tensor) -> dict:
    """On the GPU: FlashAssign's lower bounds never exceed the float64 distance to the nearest other centre, and
    how tight they are (median ratio; rows without a bound, 0, counted apart), per input dtype."""
    from flashkm_dist.kernels.assign import flash_assign
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd, cd = x.to(dtype), centers.to(dtype)
        labels, _, lower = flash_assign(xd, cd, lower_bound=True)
        d = torch.cdist(xd.double(), cd.double())
        d.scatter_(1, labels[:, None], float("inf"))
        second = d.min(dim=1).values
        low = lower.double()
        has = low > 0
        out[str(dtype).removeprefix("torch.")] = {
            "violations": int((low > second).sum()), "rows_without_bound": int((~has).sum()),
            "median_ratio": float((low[has] / second[has]).median()) if bool(has.any()) else None}
    return out


def settle_check(x: torch.Tensor, init: torch.Tensor, timed_rows: int = 1 << 21) -> dict:
    """On the GPU, after one Lloyd update from `init` on rows x (the big moves of a fit's start): the bound test
    with table settling (`kernels.bounds.settle_rows`) against its twin, bit for bit; settled labels against the
    float64 argmin and their distances against `bounded_rows` for those labels (another launch); lower bounds
    against the float64 second distance; how many rows each way; and its time on timed_rows rows against
    FlashAssign (with lower bounds) on the rows it leaves."""
    from flashkm_dist.kernels import bounds, reference
    from flashkm_dist.kernels.assign import flash_assign
    from flashkm_dist.kernels.neighbours import neighbour_table
    from profile_kernels import cuda_ms

    labels, _, lower = flash_assign(x, init, lower_bound=True)
    k = init.shape[0]
    counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=DEV).index_add_(0, labels, x.double())
    moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], init.double()).float()
    drift, dec = bounds.centroid_moves(init, moved)
    table = neighbour_table(moved)
    near = bounds.neighbour_moves(table.index[0], table.beyond[0], drift)
    n = min(x.shape[0], 100_000)
    args = (x[:n], moved, labels[:n], lower[:n], dec, near, table)
    got, want = bounds.settle_rows(*args), reference.settle_rows(*args)
    new_labels, dist, new_lower, code = got
    done = code < 2
    truth = reference.assign(x[:n], moved)
    again = bounds.bounded_rows(x[:n], moved, new_labels, torch.zeros_like(new_lower), torch.zeros_like(dec))[0]
    d = torch.cdist(x[:n].double(), moved.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.scatter_(1, truth[0][:, None], float("inf"))
    second = d.min(dim=1).values
    out = {"rows": n, "same_as_twin": all(torch.equal(a, b) for a, b in zip(got, want)),
           "settled_labels_exact": bool(torch.equal(new_labels[done], truth[0][done])),
           "settled_dist_same_bits": bool(torch.equal(dist[done], again[done])),
           "lower_bound_violations": int((new_lower.double()[done] > second[done]).sum()),
           "kept": int((code == 0).sum()), "settled_from_table": int((code == 1).sum()),
           "stale": int((code == 2).sum())}
    m = min(x.shape[0], timed_rows)
    xs, ls, lows = x[:m], labels[:m], lower[:m]
    code = bounds.settle_rows(xs, moved, ls, lows, dec, near, table)[3]
    left = xs[code == 2]
    out.update(timed_rows=m, timed_stale=int(left.shape[0]), timed_missed=int((code != 0).sum()),
               settle_ms=cuda_ms(lambda: bounds.settle_rows(xs, moved, ls, lows, dec, near, table)),
               bound_test_ms=cuda_ms(lambda: bounds.bounded_rows(xs, moved, ls, lows, dec, near)),
               assign_left_ms=cuda_ms(lambda: flash_assign(left, moved, lower_bound=True)),
               assign_missed_ms=cuda_ms(lambda: flash_assign(xs[code != 0], moved, lower_bound=True)))
    return out


def side_copy_check(small_bytes: int = 16 << 20, big_bytes: int = 1 << 30) -> dict:
    """Milliseconds a small host-to-device copy on one stream takes alone and queued while a large one runs on
    another stream. (In the engine, label reads on the compute stream ended gaps of about half a chunk's copy;
    this asks whether two streams' copies share one queue in isolation.)"""
    small, big = (torch.empty(n // 4, dtype=torch.float32, pin_memory=True) for n in (small_bytes, big_bytes))
    small_dev, big_dev = torch.empty_like(small, device=DEV), torch.empty_like(big, device=DEV)
    side, other = torch.cuda.Stream(), torch.cuda.Stream()

    def small_ms(with_big: bool) -> float:
        torch.cuda.synchronize()
        if with_big:
            with torch.cuda.stream(other):
                big_dev.copy_(big, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record()
            small_dev.copy_(small, non_blocking=True)
            end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    for with_big in (False, True):
        small_ms(with_big)
    alone, beside = (statistics.median(small_ms(w) for _ in range(5)) for w in (False, True))
    return {"small_MB": small_bytes / 1e6, "big_MB": big_bytes / 1e6, "alone_ms": alone, "beside_big_ms": beside}


def summary(rows: list) -> dict:
    secs = [r["seconds"] for r in rows]
    late = secs[len(secs) // 2:]
    return {"mean_s": statistics.mean(secs), "after_first_mean_s": statistics.mean(secs[1:] or secs),
            "later_half_mean_s": statistics.mean(late), "first_s": secs[0], "last_s": secs[-1]}


# fit -> (bounded steps, FlashAssign's neighbour tier, skip settled host rows, engine settings)
FITS = {"plain": (False, True, False, {}), "bounded": (True, True, False, {}), "bounded_skip": (True, True, True, {}),
        "bounded_skip_eager": (True, True, True, {"SKIP_MAX_STALE": 1.0}),  # skip whenever the bounds allow
        "bounded_skip_half": (True, True, True, {"SKIP_MAX_STALE": 0.5}),  # (the default was 0.5 before 0.7)
        "bounded_skip_mid": (True, True, True, {"SKIP_MAX_STALE": 0.7}),
        "bounded_skip_streamed": (True, True, True, {"STREAMED_BOUNDS_MIN_K": 0}),  # bound-test streamed chunks
        "plain_no_tier": (False, False, False, {}),
        # streamed chunks' labels read on the compute stream (as before READ_STATE_ON_COPY_STREAM)
        "plain_state_on_compute": (False, True, False, {"READ_STATE_ON_COPY_STREAM": False}),
        "bounded_skip_state_on_compute": (True, True, True, {"READ_STATE_ON_COPY_STREAM": False}),
        # host blocks passed one after the other (as before ONE_HOST_PASS)
        "plain_block_by_block": (False, True, False, {"ONE_HOST_PASS": False}),
        "bounded_skip_block_by_block": (True, True, True, {"ONE_HOST_PASS": False}),
        # in-place reads of skipped rows by one program per 16 rows (as before host_rows.PROGRAMS), or by 128
        "bounded_skip_read_grid_full": (True, True, True, {"host_rows.PROGRAMS": None}),
        "bounded_skip_read_grid_128": (True, True, True, {"host_rows.PROGRAMS": 128})}


def _setting(key: str) -> tuple:
    """(module, name) of a FITS setting: the engine's (streaming) unless the key names the kernels module."""
    module, _, name = key.rpartition(".")
    return ({"": S, "host_rows": host_rows}[module], name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--n", type=int, default=None, help="rows (overrides --log2n), e.g. 180000000 on an H100")
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one more iteration of each fit")
    ap.add_argument("--tier-ab", action="store_true", help="also plain steps without FlashAssign's neighbour tier")
    ap.add_argument("--cache-gib", type=float, default=None, help="device cache (default: 80 %% of free memory)")
    ap.add_argument("--profile-at", type=int, default=0, help="profile this iteration of each fit (1 = the first)")
    ap.add_argument("--fits", default="plain,bounded,bounded_skip",
                    help="which fits (plain_no_tier: --tier-ab); NAME@ROWS: that fit with chunks of ROWS rows")
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per staging chunk (cached: 4 of them; "
                    "default: the engine's)")
    args = ap.parse_args()
    n = args.n or 1 << args.log2n
    x, init = host_blobs(n, args.k, args.d)
    nm = host_numerics(x)
    result = {**provenance(), "device": torch.cuda.get_device_name(), "n": n, "k": args.k, "d": args.d,
              "dtype": "float32", "host_bytes": x.numel() * 4, "h2d_GBps": h2d_gbps(x), "iters": args.iters}
    result["side_copy"] = side_copy_check()
    print(json.dumps(result["side_copy"]), flush=True)
    result["lower_bounds"] = lower_bound_check(x[:50_000].to(DEV), init)
    result["settle_check"] = settle_check(x[:1 << 21].to(DEV), init)
    print(json.dumps(result["settle_check"]), flush=True)
    torch.cuda.empty_cache()  # (the checks' blocks: the fits' caches take 80 % of the memory then free)
    fits, defaults = {}, {key: getattr(*_setting(key)) for key in (
        "SKIP_MAX_STALE", "STREAMED_BOUNDS_MIN_K", "READ_STATE_ON_COPY_STREAM", "ONE_HOST_PASS", "host_rows.PROGRAMS")}
    for name in args.fits.split(",") + (["plain_no_tier"] if args.tier_ab else []):
        kind, _, rows = name.partition("@")
        bounds, tier, skip, settings = FITS[kind]
        A.NEIGHBOUR_TIER = tier
        for key, value in {**defaults, **settings}.items():
            setattr(*_setting(key), value)
        try:
            fits[name] = run(x, init, nm, args.iters, bounds, args.profile, skip,
                             "auto" if args.cache_gib is None else int(args.cache_gib * 2 ** 30), args.profile_at,
                             int(rows) if rows else args.chunk_rows)
        finally:
            A.NEIGHBOUR_TIER = True
            for key, value in defaults.items():
                setattr(*_setting(key), value)
        torch.cuda.empty_cache()
    for key, test in (("centres", lambda a, b: torch.equal(a["centers"], b["centers"])),
                      ("inertia", lambda a, b: a["inertia"] == b["inertia"] or b["inertia"] != b["inertia"]),
                      ("labels_changed", lambda a, b: a["labels_changed"] == b["labels_changed"])):
        suffixes = {"bounded": "", "bounded_skip": "_skipping", "bounded_skip_eager": "_skipping_eager",
                    "plain_no_tier": "_without_tier"}
        for other in fits:
            kind, at, rows = other.partition("@")
            if other != "plain" and "plain" in fits:
                suffix = suffixes.get(kind, "_" + kind) + (f"_{rows}_rows" if at else "")
                result[f"same_{key}_every_iteration{suffix}"] = all(
                    test(a, b) for a, b in zip(fits["plain"]["iterations"], fits[other]["iterations"]))
    result["same_final_inertia"] = len({fit["final_inertia"] for fit in fits.values()}) == 1
    cache_bytes = next(iter(fits.values()))["cache_bytes"]
    uncached = max(0, result["host_bytes"] - cache_bytes)
    result["cache_GiB"] = cache_bytes / 2 ** 30
    result["uncached_floor_s"] = uncached / result["h2d_GBps"] / 1e9
    for name, fit in fits.items():
        for r in fit["iterations"]:
            del r["centers"]
        result[name] = {**summary(fit["iterations"]), "final_inertia": fit["final_inertia"],
                        "iterations": fit["iterations"],
                        **{key: fit[key] for key in ("profile", "profile_at") if key in fit}}
    if not args.no_flash:
        try:
            result["flash_largeN_iter_s"] = flash_largeN_iter_s(x, init)
            for name in fits:
                for key in ("mean_s", "after_first_mean_s", "later_half_mean_s"):
                    result[name][key.replace("_s", "_vs_flash")] = result[name][key] / result["flash_largeN_iter_s"]
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            result["flash_error"] = repr(err)
    for name in fits:
        for key in ("mean_s", "after_first_mean_s", "later_half_mean_s"):
            if result["uncached_floor_s"] > 0:
                result[name][key.replace("_s", "_vs_uncached_floor")] = result[name][key] / result["uncached_floor_s"]
    result["command"] = "python benchmarks/engine_fit.py --out F " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if k != "out" and v not in (None, False))
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
