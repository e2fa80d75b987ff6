"""GPU check and benchmark of the kernels, in one process: exactness first, then timings against the peers.

    python benchmarks/gpu_check.py --out results.json [--quick]

1. Checks on the GPU: FlashAssign labels exact against float64 (fp32 / fp16 / bf16; offset data, near-ties,
   duplicate centroids), sort-inverse partials bitwise equal to the reference and across chunkings, and the
   estimator end to end (GPU fit == CPU fit, to the bit).
2. Times with CUDA events (median after warm-up) this project, flash-kmeans 0.3.1 and fastkmeans 0.5.0 on the
   same tensors, reports TFLOP/s against the fp16 matmul rate measured in the same run, and the time of a first
   call for a new shape and for a new N. Records the host's speed (`host_speed`: launch-bound rows follow it).
   Writes one JSON file and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback

import torch
import triton
import triton.language as tl

from flashkm_dist import KMeans, batched_kmeans, graphed
from provenance import provenance
from flashkm_dist.engine import backend_for, numerics_for
from flashkm_dist.kernels import reference
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import neighbours
from flashkm_dist.kernels.assign import flash_assign
from flashkm_dist.kernels.update import sort_inverse_update
from flashkm_dist.streaming import Block, Engine

DEV = torch.device("cuda")


def cuda_ms(fn, warmup=2, reps=7) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@triton.jit
def _one_store(ptr):
    tl.store(ptr, 1.0)


def host_speed() -> dict:
    """Host us per small torch allocation and per launch of a one-store Triton kernel (medians of 5 x 2000 calls,
    queued without waiting). Rows that launching bounds (the batched ones, a single call's prelude) follow the
    host's speed, which differs from one GPU machine to the next: this says which kind of host a result had."""
    buf = torch.zeros(1, device=DEV)
    _one_store[(1,)](buf)
    torch.cuda.synchronize()

    def per_call(fn, calls=2000) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        took = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        return took
    return {"torch_empty_us": statistics.median(per_call(lambda: torch.empty(16, device=DEV)) for _ in range(5)),
            "triton_launch_us": statistics.median(per_call(lambda: _one_store[(1,)](buf)) for _ in range(5))}


def matmul_tflops(dtype) -> float:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    ms = cuda_ms(lambda: a @ b, warmup=3, reps=10)
    return 2 * n ** 3 / ms / 1e9


def blobs(n, d, k, dtype, seed=0, offset=0.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    centers = torch.randn(k, d, device=DEV, generator=g) * 4
    idx = torch.randint(0, k, (n,), device=DEV, generator=g)
    x = centers[idx] + torch.randn(n, d, device=DEV, generator=g)
    return (x + offset).to(dtype)


# --------------------------------------------------------------------------------------------------- checks
def contract_violations(x, c, labels, rel=1e-5):
    """Rows whose label breaks the numerics contract against the float64 argmin (reference, exact to ~1e-14)."""
    best, _ = reference.assign(x, c)
    x64, c64 = x.double(), c.double()
    mu = x64.mean(0)
    d_lab = ((x64 - c64[labels]) ** 2).sum(1)
    d_best = ((x64 - c64[best]) ** 2).sum(1)
    bound = rel * (((x64 - mu) ** 2).sum(1) + ((c64[best] - mu) ** 2).sum(1))
    return int((d_lab - d_best > bound).sum()), int((labels != best).sum())


def check_assign_exact():
    out = []
    cases = [("random", 0.0, False), ("offset+300", 300.0, False), ("near-ties", 0.0, True)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, offset, ties in cases:
            n, d, k = 200_000, 128, 1024
            x = blobs(n, d, k, dtype, seed=1, offset=offset)
            c = x[torch.randperm(n, device=DEV)[:k]].clone()
            if ties:  # duplicate and nearly duplicate centroids, and points on bisecting planes
                c[1::4] = c[0::4]
                c[2::4] = (c[0::4].float() + 1e-3).to(dtype)
                x[: n // 4] = ((c[0].float() + c[3].float()) / 2).to(dtype)
            labels, dist = flash_assign(x, c)
            viol, differ = contract_violations(x, c, labels)
            ref_d = ((x.double() - c.double()[labels]) ** 2).sum(1)
            out.append({"dtype": str(dtype), "case": name, "n": n, "k": k, "d": d, "violations": viol,
                        "labels_differing_from_float64_argmin": differ,
                        "min_dist_max_rel_err": float(((dist.double() - ref_d).abs() / ref_d.clamp_min(1e-30)).max())})
    return out


def check_neighbour_tier():
    """FlashAssign with the neighbour tier against FlashAssign without it (labels and distances to the bit), on
    centroids taken from random rows of blobs (about two per blob: a fit's start, many near ties), per dtype;
    and the table's bounds against float64 distances from the differences."""
    out = {"assign": []}
    n, d, k = 1 << 20, 128, 8192
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = blobs(n, d, k // 2, dtype, seed=5)
        c = x[torch.randperm(n, device=DEV)[:k]].clone()
        row = {"dtype": str(dtype), "n": n, "k": k, "d": d}
        rule = neighbours.ROWS_PER_CENTROID
        for tier in (True, False):
            A.NEIGHBOUR_TIER, neighbours.ROWS_PER_CENTROID = tier, 0  # (the tier for this N, as in a long step)
            try:
                neighbours.forget()
                p = A._prepare(x[None], c[None], "euclidean", None)
                fast = A._fast_pass(p)  # (FlashAssign's passes, to read each tier's count of rows too)
                A._resolve(p, fast)
            finally:
                A.NEIGHBOUR_TIER, neighbours.ROWS_PER_CENTROID = True, rule
                neighbours.forget()
            row["tier" if tier else "no_tier"] = (fast.labels[0], fast.min_dist[0], fast.counts[0].tolist())
        (l1, d1, counts), (l0, d0, _) = row.pop("tier"), row.pop("no_tier")
        row.update(same_labels=bool(torch.equal(l1, l0)), same_min_dist=bool(torch.equal(d1, d0)),
                   violations=contract_violations(x, c, l1)[0], rows_flagged=counts[0],
                   rows_left_to_resolve=counts[3], rows_brute_force=counts[1])
        out["assign"].append(row)
    c = blobs(2048, d, 512, torch.float32, seed=6, offset=100.0)
    t = neighbours.neighbour_table(c)
    c64, worst_low, worst_beyond = c.double(), 0.0, 0.0
    for r0 in range(0, c.shape[0], 128):
        true = ((c64[r0:r0 + 128, None, :] - c64[None, :, :]) ** 2).sum(-1).sqrt()
        listed = true.gather(1, t.index[0, r0:r0 + 128].long())
        worst_low = max(worst_low, float((t.low[0, r0:r0 + 128] - listed).max()))
        true.scatter_(1, t.index[0, r0:r0 + 128].long(), float("inf"))
        worst_beyond = max(worst_beyond, float((t.beyond[0, r0:r0 + 128] - true.min(dim=1).values).max()))
    out["table"] = {"k": 2048, "offset": 100.0, "max_low_minus_true": worst_low,
                    "max_beyond_minus_nearest_unlisted": worst_beyond,
                    "bounds_hold": worst_low <= 0.0 and worst_beyond <= 0.0}
    return out


def check_graphed_tier(n=1 << 21, k=2048, d=64, iters=6):
    """The neighbour tier inside the estimator's replayed CUDA graphs (K >= 2048 and >= 1024 rows per centroid,
    so each iteration builds its table): a fit with graphs, the same fit op by op, and op by op without the tier,
    from the same random rows of blobs (about two centroids per blob): the same bits, and graphs replayed."""
    x = blobs(n, d, k // 2, torch.float16, seed=7)
    init = x[torch.randperm(n, device=DEV)[:k]].cpu().numpy()
    replayed = []
    call = graphed.GraphedIteration.__call__

    def counting(self, centers):
        replayed.append(self.graph is not None)
        return call(self, centers)

    def fit():
        return KMeans(k, init=init, device="cuda", max_iter=iters, tol=0.0).fit(x)
    graphed.GraphedIteration.__call__ = counting
    try:
        neighbours.forget()
        with_graph = fit()
        built = bool(neighbours._LAST)
    finally:
        graphed.GraphedIteration.__call__ = call
    graphed.ENABLED = False
    try:
        op_by_op = fit()
        A.NEIGHBOUR_TIER = False
        no_tier = fit()
    finally:
        graphed.ENABLED, A.NEIGHBOUR_TIER = True, True

    def same(a, b):
        return bool((a.cluster_centers_ == b.cluster_centers_).all() and (a.labels_ == b.labels_).all()
                    and a.n_iter_ == b.n_iter_ and a.inertia_ == b.inertia_)
    return {"n": n, "k": k, "d": d, "iters": iters, "graph_replays": sum(replayed), "table_built": built,
            "graphed_equals_op_by_op": same(with_graph, op_by_op), "tier_equals_no_tier": same(op_by_op, no_tier)}


def check_partials_bitwise():
    x = blobs(300_000, 96, 500, torch.float16, seed=2)
    labels = torch.randint(0, 500, (300_000,), device=DEV)
    w = torch.rand(300_000, device=DEV, dtype=torch.float64)
    nm = numerics_for(x, w, metric="euclidean")
    whole = sort_inverse_update(x, labels, 500, weights=w, scale=nm.scale)
    ref = reference.partial_sums(x, labels, 500, w, scale=nm.scale)
    same_as_reference = torch.equal(whole.sums, ref.sums) and torch.equal(whole.weights, ref.weights)
    chunkings_equal = True
    for trial in range(4):
        perm = torch.randperm(300_000, device=DEV)
        parts = [sort_inverse_update(x[i], labels[i], 500, weights=w[i], scale=nm.scale)
                 for i in torch.tensor_split(perm, 3 + 5 * trial)]
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        chunkings_equal &= torch.equal(total.sums, whole.sums) and torch.equal(total.weights, whole.weights)
    return {"same_as_reference": bool(same_as_reference), "any_chunking_same_bits": bool(chunkings_equal)}


def check_limbs_bitwise():
    """The fixed-point grid's kernels (kernels/limbs.py, what fixed_point runs on a GPU) against their torch twins
    run on the CPU: the same bits."""
    from flashkm_dist.kernels import fixed_point as fp, limbs
    g = torch.Generator(device=DEV).manual_seed(5)
    raw = torch.randint(-(1 << 36), 1 << 36, (2, 8192, 128), device=DEV, generator=g)
    v = torch.randn(1 << 20, device=DEV, generator=g) * 1e4
    w = torch.rand(1 << 20, device=DEV, generator=g, dtype=torch.float64)
    sq = torch.randn(8192 * 128, device=DEV, generator=g, dtype=torch.float64) ** 2
    cpu = [t.cpu() for t in (raw, v, w, sq)]
    exp = fp.exponent_for(float(v.abs().max()) * v.numel())
    out = {"to_float": all(torch.equal(limbs.to_float(raw, e).cpu(), fp.to_float(cpu[0], e)) for e in (-40, 0, 30)),
           "exact_sum": torch.equal(fp.exact_sum(v, exp, weights=w).cpu(), fp.exact_sum(cpu[1], exp, weights=cpu[2])),
           "exact_total": torch.equal(fp.exact_total(sq).cpu().view(torch.int64),
                                      fp.exact_total(cpu[3]).view(torch.int64))}
    return {k: bool(t) for k, t in out.items()}


def check_estimator_end_to_end():
    x = blobs(100_000, 32, 64, torch.float32, seed=3, offset=50.0)
    init = x[:64].clone()
    t0 = time.perf_counter()
    gpu = KMeans(64, init=init.cpu().numpy(), device="cuda", max_iter=50).fit(x)
    gpu_s = time.perf_counter() - t0
    cpu = KMeans(64, init=init.cpu().numpy(), device="cpu", max_iter=50).fit(x.cpu())
    out = {"centroids_bitwise_equal": bool((gpu.cluster_centers_ == cpu.cluster_centers_).all()),
           "labels_equal": bool((gpu.labels_ == cpu.labels_).all()), "n_iter": [gpu.n_iter_, cpu.n_iter_],
           "inertia": [gpu.inertia_, cpu.inertia_], "gpu_fit_seconds": gpu_s}
    # NumPy input on the GPU streams from the host through the engine: same bits as the device-resident fit
    for init_kind in ("k-means||", "array"):
        start = init.cpu().numpy() if init_kind == "array" else init_kind
        resident = KMeans(64, init=start, device="cuda", max_iter=50, random_state=0).fit(x)
        streamed = KMeans(64, init=start, device="cuda", max_iter=50, random_state=0).fit(x.cpu().numpy())
        out[f"streamed_equals_resident_{init_kind}"] = bool(
            (resident.cluster_centers_ == streamed.cluster_centers_).all()
            and (resident.labels_ == streamed.labels_).all() and resident.n_iter_ == streamed.n_iter_)
    # resident rows iterate as a replayed CUDA graph: the same fit launched op by op must give the same bits
    replayed = []
    call = graphed.GraphedIteration.__call__

    def counting(self, centers):
        replayed.append(self.graph is not None)
        return call(self, centers)
    graphed.GraphedIteration.__call__ = counting
    try:
        with_graph = KMeans(64, init=init.cpu().numpy(), device="cuda", max_iter=50).fit(x)
    finally:
        graphed.GraphedIteration.__call__ = call
    graphed.ENABLED = False
    try:
        op_by_op = KMeans(64, init=init.cpu().numpy(), device="cuda", max_iter=50).fit(x)
    finally:
        graphed.ENABLED = True
    out["graph_replays"] = sum(replayed)
    out["graphed_equals_op_by_op"] = bool(
        (with_graph.cluster_centers_ == op_by_op.cluster_centers_).all()
        and (with_graph.labels_ == op_by_op.labels_).all() and with_graph.n_iter_ == op_by_op.n_iter_
        and with_graph.inertia_ == op_by_op.inertia_)
    return out


# --------------------------------------------------------------------------------------------------- timings
def peers():
    found = {}
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
        from flash_kmeans.kmeans_triton_impl import _euclid_iter
        found["flash"] = (euclid_assign_triton, _euclid_iter)
    except Exception as err:  # reported, never hidden
        found["flash_error"] = repr(err)
    try:
        from fastkmeans.kmeans import _kmeans_torch_double_chunked
        found["fast"] = _kmeans_torch_double_chunked
    except Exception as err:
        found["fast_error"] = repr(err)
    return found


def our_iteration(iterate, c):
    """What the estimator does per iteration (`graphed.GraphedIteration`, which replays `lloyd.lloyd_iteration`'s
    device half as a CUDA graph once it may): the engine's exact step (labels kept, changes counted), the update
    and its scalars, with one wait for the device."""
    it = iterate(c)
    return it.shift, it.step.n_changed


def flash_times(flash, x, c, reps=7) -> dict:
    """flash-kmeans' assign and Lloyd iteration (`peers()["flash"]`) on the same tensors, its row norms
    precomputed as it expects them."""
    assign_fn, iter_fn = flash
    xb, cb = x[None], c[None]
    x_sq = (xb.float() ** 2).sum(-1)
    return {"flash_assign_ms": cuda_ms(lambda: assign_fn(xb, cb, x_sq), reps=reps),
            "flash_iter_ms": cuda_ms(lambda: iter_fn(xb, x_sq, cb), reps=reps)}


def time_shape(n, k, d, dtype, p, with_fast: bool):
    x = blobs(n, d, min(k, 4096), dtype, seed=4)
    c = x[torch.randperm(n, device=DEV)[:k]].clone()
    nm = numerics_for(x, None, metric="euclidean")
    backend = backend_for(DEV)
    row = {"n": n, "k": k, "d": d, "dtype": str(dtype).removeprefix("torch.")}
    row["ours_assign_ms"] = cuda_ms(lambda: flash_assign(x, c, shift=nm.shift))
    # (a Lloyd step has new centroids: the neighbour table built anew each call, as `ours_iter_ms` builds it)
    row["ours_assign_new_table_ms"] = cuda_ms(lambda: (neighbours.forget(), flash_assign(x, c, shift=nm.shift)))
    row["neighbour_table_ms"] = cuda_ms(lambda: neighbours.neighbour_table(c))
    p_ = A._prepare(x[None], c[None], "euclidean", nm.shift)
    fast = A._fast_pass(p_)
    A._resolve(p_, fast)
    row["neighbour_tier"] = A._neighbour_table(p_) is not None
    row["rows_flagged"] = fast.counts[0, 0].item()
    row["rows_left_to_resolve"] = fast.counts[0, 3 if row["neighbour_tier"] else 0].item()
    iterate = graphed.GraphedIteration(Engine(DEV, dtype=x.dtype, backend=backend), [Block(x)], nm)
    row["ours_iter_ms"] = cuda_ms(lambda: our_iteration(iterate, c))
    row["tflops_assign"] = 2 * n * k * d / row["ours_assign_ms"] / 1e9
    if "flash" in p:
        row.update(flash_times(p["flash"], x, c))
    if with_fast and "fast" in p:
        norms = (x.float() ** 2).sum(1)

        def fast(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            p["fast"](x, norms, k, DEV, dtype=x.dtype if x.dtype != torch.float32 else torch.float32,
                      max_iters=iters, tol=-1.0, chunk_size_data=n, chunk_size_centroids=k,
                      max_points_per_centroid=None, use_triton=True)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        fast(2)
        row["fastkmeans_iter_ms"] = (fast(6) - fast(2)) / 4 * 1e3
    for peer in ("flash", "fastkmeans"):
        if f"{peer}_iter_ms" in row:
            row[f"iter_ratio_vs_{peer}"] = row["ours_iter_ms"] / row[f"{peer}_iter_ms"]
    return row


def time_batched(p, b=32, n=75_600, k=1000, d=128):
    x = torch.randn(b, n, d, device=DEV, dtype=torch.float16)
    c = x[:, :k].clone()
    row = {"b": b, "n": n, "k": k, "d": d, "dtype": "float16"}
    row["ours_batched_10_iters_ms"] = cuda_ms(lambda: batched_kmeans(x, k, init=c, max_iter=10, tol=0.0),
                                              warmup=1, reps=3)
    graphed.ENABLED = False  # every iteration launched op by op: the time the graph saves, and the same bits
    try:
        row["ours_batched_op_by_op_10_iters_ms"] = cuda_ms(
            lambda: batched_kmeans(x, k, init=c, max_iter=10, tol=0.0), warmup=1, reps=3)
        op_by_op = batched_kmeans(x, k, init=c, max_iter=10, tol=0.0)
    finally:
        graphed.ENABLED = True
    with_graph = batched_kmeans(x, k, init=c, max_iter=10, tol=0.0)
    row["graphed_same_bits"] = all(torch.equal(getattr(with_graph, f), getattr(op_by_op, f))
                                   for f in ("labels", "centroids", "n_iter", "inertia"))
    if "flash" in p:
        from flash_kmeans import batch_kmeans_Euclid
        row["flash_batched_10_iters_ms"] = cuda_ms(
            lambda: batch_kmeans_Euclid(x, k, max_iters=10, tol=0.0, init_centroids=c), warmup=1, reps=3)
    return row


def first_call_seconds():
    """flash_assign's first call for a new shape (its kernels compile then; the process's first compile also pays
    Triton's one-time set-up), for a new N of a known shape (nothing compiles), for a second new shape, and for a
    third with the kernels compiled one by one as they are launched instead of concurrently ahead of the call."""
    def once(n, k, d):
        x = torch.randn(n, d, device=DEV, dtype=torch.float16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        flash_assign(x, x[:k].clone())
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    out = {"new_shape_s": once(50_000, 777, 72), "new_n_same_k_d_s": once(61_234, 777, 72),
           "second_new_shape_s": once(30_000, 1500, 40)}
    A.COMPILE_AHEAD = False
    try:
        out["new_shape_one_by_one_s"] = once(20_000, 500, 24)
    finally:
        A.COMPILE_AHEAD = True
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(DEV)
    result = {"device": props.name, "torch": torch.__version__, "python": platform.python_version(),
              **provenance()}
    result["triton"] = triton.__version__
    result["host"] = host_speed()
    result["first_call"] = first_call_seconds()
    for name, fn in [("assign_exact", check_assign_exact), ("neighbour_tier", check_neighbour_tier),
                     ("graphed_tier", check_graphed_tier),
                     ("partials", check_partials_bitwise),
                     ("limbs", check_limbs_bitwise), ("estimator", check_estimator_end_to_end)]:
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        print(name, json.dumps(result[name])[:2000], flush=True)
    result["matmul_tflops"] = {"fp16": matmul_tflops(torch.float16), "tf32": None}
    torch.backends.cuda.matmul.allow_tf32 = True
    result["matmul_tflops"]["tf32"] = matmul_tflops(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    p = peers()
    result["peer_errors"] = {k: v for k, v in p.items() if k.endswith("_error")}
    shapes = [(1 << 20, 8192, 128, torch.float16, True), (1 << 23, 1024, 128, torch.float16, False),
              (1 << 20, 65536, 128, torch.float16, False), (1 << 20, 8192, 128, torch.float32, True),
              (1 << 20, 4096, 64, torch.float16, False), (1 << 20, 4096, 256, torch.float16, False),
              (1 << 20, 4096, 1024, torch.float16, False)]
    if args.quick:
        shapes = shapes[:1]
    result["timings"] = []
    for n, k, d, dtype, fast in shapes:
        try:
            row = time_shape(n, k, d, dtype, p, fast)
        except Exception:
            row = {"n": n, "k": k, "d": d, "dtype": str(dtype), "error": traceback.format_exc()}
        result["timings"].append(row)
        print(json.dumps(row), flush=True)
    for key, shape in (("batched", {}), ("batched_small", dict(b=8, n=10_000, k=64, d=64))):
        try:  # the case, then many small problems, where launching is most of the time
            result[key] = time_batched(p, **shape)
        except Exception:
            result[key] = {"error": traceback.format_exc()}
        print(json.dumps(result[key]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'shape':>28} {'ours assign':>12} {'flash assign':>12} {'ours iter':>10} {'flash iter':>10} "
          f"{'fastkm iter':>11} {'TFLOP/s':>8}")
    for r in result["timings"]:
        if "error" in r:
            print(f"{r['n']}x{r['k']}x{r['d']} {r['dtype']}: ERROR")
            continue
        print(f"{r['n']:>9}x{r['k']:>6}x{r['d']:>4} {r['dtype']:>7} {r['ours_assign_ms']:12.3f} "
              f"{r.get('flash_assign_ms', float('nan')):12.3f} {r['ours_iter_ms']:10.3f} "
              f"{r.get('flash_iter_ms', float('nan')):10.3f} {r.get('fastkmeans_iter_ms', float('nan')):11.3f} "
              f"{r['tflops_assign']:8.1f}")


if __name__ == "__main__":
    main()
