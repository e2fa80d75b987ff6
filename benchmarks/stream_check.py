"""The sm_90 streaming pass (kernels/assign_sm90.py) against the portable one, in one process: same bits, then time.

    python benchmarks/stream_check.py --out F.json [--smoke]

1. Bits: for each shape, dtype and metric, `fast_assign` with the warp-specialised pass and with the portable
   kernel (`assign.SM90_STREAM` off) must agree to the bit on labels, min_dist, flags, thresholds and the number
   of flagged rows (both compute the same keys); `flash_assign`'s labels are then checked against float64.
2. Time (CUDA events, median after warm-up): the streaming pass alone, the class pass, `flash_assign`, and the
   estimator's iteration op by op (`lloyd.lloyd_iteration`), both ways, and as the estimator runs it (a replayed
   CUDA graph, whose bits are checked against op by op), with flash-kmeans' assign and iteration on the same tensors;
   then the device's busy time in one iteration (all kernels and copies, from the profiler) and its longest kernels.
`--smoke` runs two small shapes only (a hang or a fault shows there first, cheaply).
"""
from __future__ import annotations

import argparse
import functools
import json
import traceback

import torch

import gpu_check as G
from profile_kernels import kernel_times
from provenance import gpu_run
from flashkm_dist import graphed
from flashkm_dist.engine import backend_for, numerics_for
from flashkm_dist.kernels import assign as A
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import lloyd_iteration
from flashkm_dist.streaming import Block, Engine

DEV = G.DEV


def both_ways(fn):
    """fn() with the sm_90 pass, then with the portable kernel."""
    out = []
    for on in (True, False):
        A.SM90_STREAM = on
        try:
            out.append(fn())
        finally:
            A.SM90_STREAM = True
    return out


def same_bits(x, c, metric="euclidean") -> dict:
    ws, portable = both_ways(lambda: A.fast_assign(x, c, metric=metric))
    row = {"shape": list(x.shape), "k": c.shape[-2], "dtype": str(x.dtype).removeprefix("torch."), "metric": metric}
    for name in ("labels", "min_dist", "flag", "threshold"):
        a, b = getattr(ws, name), getattr(portable, name)
        row[f"{name}_equal"] = bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                                          and torch.equal(a.nan_to_num(), b.nan_to_num())))
    row["flagged"] = [int(ws.counts[:, 0].sum()), int(portable.counts[:, 0].sum())]
    labels, _ = A.flash_assign(x, c, metric=metric)
    ref, _ = reference.assign(x.double(), c.double(), metric=metric)
    row["labels_differing_from_float64"] = int((labels != ref).sum())
    row["uses_sm90_pass"] = A.assign_config(x.device, c.shape[-2], x.shape[-1], x.dtype).stream is not None
    row["ok"] = all(row[f"{n}_equal"] for n in ("labels", "min_dist", "flag", "threshold")) \
        and row["flagged"][0] == row["flagged"][1]
    return row


def bit_cases(smoke: bool):
    g = torch.Generator(device=DEV).manual_seed(7)
    cases = [(1000, 1, 3, torch.float16, "euclidean"), (3000, 300, 100, torch.float32, "euclidean")]
    if not smoke:
        cases += [(200_000, 1024, 128, torch.float16, "euclidean"), (200_000, 1024, 128, torch.bfloat16, "euclidean"),
                  (200_000, 1024, 128, torch.float32, "euclidean"), (100_000, 8192, 128, torch.float16, "cosine"),
                  (77_777, 4096, 64, torch.float16, "euclidean"), (50_000, 999, 17, torch.float16, "euclidean"),
                  (20_000, 20_000, 128, torch.float16, "euclidean"),
                  # D padded to 256: the pass's 64-row scorers (config.STREAM_SHAPE_WIDE_D)
                  (100_000, 2048, 256, torch.float16, "euclidean"), (60_000, 1500, 200, torch.float32, "euclidean"),
                  (50_000, 1024, 256, torch.bfloat16, "cosine")]
    for n, k, d, dtype, metric in cases:
        x = G.blobs(n, d, min(k, 512), dtype, seed=n % 97)
        yield x, x[torch.randperm(n, device=DEV, generator=g)[:k]].clone(), metric
    if not smoke:
        xb = torch.randn(5, 30_000, 128, device=DEV, generator=g).half()  # batched
        yield xb, xb[:, :1000].clone(), "euclidean"
        near = G.blobs(100_000, 128, 64, torch.float16, seed=3)  # near-ties: centroids in pairs 1e-3 apart
        cn = near[:512].clone().float()
        cn = torch.cat([cn, cn + 1e-3]).half()
        yield near, cn, "euclidean"


def graph_same_bits(x, c, nm, iters=5) -> bool:
    """`iters` Lloyd iterations from c, op by op and through `GraphedIteration` (which replays a graph from its
    second iteration on): the same centres, inertia, shift and label changes at every iteration."""
    runs = []
    for iterate in (functools.partial(lloyd_iteration, Engine(DEV, dtype=x.dtype), [Block(x)], numerics=nm),
                    graphed.GraphedIteration(Engine(DEV, dtype=x.dtype), [Block(x)], nm)):
        centers, seen = c, []
        for _ in range(iters):
            it = iterate(centers)
            seen.append((it.centers.clone(), it.inertia, it.shift, it.step.n_changed))
            centers = it.centers
        runs.append(seen)
    return all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(*runs)) and iterate.graph is not None


def time_shape(n, k, d, dtype, flash) -> dict:
    x = G.blobs(n, d, min(k, 4096), dtype, seed=4)
    c = x[torch.randperm(n, device=DEV)[:k]].clone()
    nm = numerics_for(x, None, metric="euclidean")
    row = {"n": n, "k": k, "d": d, "dtype": str(dtype).removeprefix("torch.")}
    p = A._prepare(x[None], c[None], "euclidean", nm.shift)
    A._prepare_rows(p)
    row["sm90_pass"] = str(p.cfg.stream)
    if p.cfg.stream is not None:
        from flashkm_dist.kernels import assign_sm90, config
        key_low = config.key_bits(p.c_fast.shape[1], p.cfg.stream.block_k)
        row["stream_only_ms"] = G.cuda_ms(lambda: assign_sm90.stream(p.a_fast, p.rowstat, p.c_fast, p.cc,
                                                                     p.cfg.stream, key_low), reps=15)
        row["stream_tflops"] = 2 * n * k * d / row["stream_only_ms"] / 1e9
        top = assign_sm90.stream(p.a_fast, p.rowstat, p.c_fast, p.cc, p.cfg.stream, key_low)
        row["class_pass_ms"] = G.cuda_ms(lambda: A._class_pass(p, top, p.cfg.stream.block_k, key_low), reps=15)
    engine, blocks = Engine(DEV, dtype=x.dtype, backend=backend_for(DEV)), [Block(x)]
    for tag, on in (("sm90", True), ("portable", False)):
        A.SM90_STREAM = on
        try:
            row[f"{tag}_fast_pass_ms"] = G.cuda_ms(lambda: A._fast_pass(p), reps=15)
            row[f"{tag}_assign_ms"] = G.cuda_ms(lambda: A.flash_assign(x, c, shift=nm.shift), reps=15)
            row[f"{tag}_iter_ms"] = G.cuda_ms(lambda: lloyd_iteration(engine, blocks, c, nm), reps=15)
        finally:
            A.SM90_STREAM = True
    row["tflops_assign_sm90"] = 2 * n * k * d / row["sm90_assign_ms"] / 1e9
    iterate = graphed.GraphedIteration(Engine(DEV, dtype=x.dtype, backend=backend_for(DEV)), [Block(x)], nm)
    row["sm90_graphed_iter_ms"] = G.cuda_ms(lambda: G.our_iteration(iterate, c), reps=15)
    row["graph_captured"] = iterate.graph is not None
    row["graphed_same_bits"] = graph_same_bits(x, c, nm)
    # where an op-by-op iteration's time goes: the device's busy time (kernels, copies) against its wall time
    times = kernel_times(lambda: lloyd_iteration(engine, blocks, c, nm))
    row["iter_device_busy_ms"] = round(sum(t for _, t, _ in times), 4)
    row["iter_kernels"] = times[:16]
    if flash:
        row.update(G.flash_times(flash, x, c, reps=15))
        row["iter_ratio_vs_flash"] = row["sm90_graphed_iter_ms"] / row["flash_iter_ms"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    result = {**gpu_run(DEV), "bits": [], "timings": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    for x, c, metric in bit_cases(args.smoke):
        try:
            row = same_bits(x, c, metric)
        except Exception:
            row = {"shape": list(x.shape), "error": traceback.format_exc()}
        result["bits"].append(row)
        print(json.dumps(row), flush=True)
        save()
    if args.smoke:
        return
    result["matmul_tflops_fp16"] = G.matmul_tflops(torch.float16)
    p = G.peers()
    flash = p.get("flash")
    result["peer_errors"] = {k: v for k, v in p.items() if k.endswith("_error")}
    shapes = [(1 << 20, 8192, 128, torch.float16), (1 << 23, 1024, 128, torch.float16),
              (1 << 20, 65536, 128, torch.float16), (1 << 20, 8192, 128, torch.float32),
              (1 << 20, 4096, 64, torch.float16), (1 << 20, 4096, 256, torch.float16)]
    for n, k, d, dtype in shapes:
        try:
            row = time_shape(n, k, d, dtype, flash)
        except Exception:
            row = {"n": n, "k": k, "d": d, "error": traceback.format_exc()}
        result["timings"].append(row)
        print(json.dumps(row), flush=True)
        save()
    try:  # the batched case (B=32 small problems), timed as gpu_check does, and where its time goes
        result["batched"] = G.time_batched(p)
        x = torch.randn(32, 75_600, 128, device=DEV, dtype=torch.float16)
        result["batched"]["kernels_2_iters"] = kernel_times(
            lambda: G.batched_kmeans(x, 1000, init=x[:, :1000].clone(), max_iter=2, tol=0.0))[:16]
    except Exception:
        result["batched"] = {"error": traceback.format_exc()}
    print(json.dumps(result["batched"]), flush=True)
    save()


if __name__ == "__main__":
    main()
