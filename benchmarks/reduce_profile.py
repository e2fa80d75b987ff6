"""Where the Dask path's per-iteration reduction spends its time, on one GPU, outside Dask.

    python benchmarks/reduce_profile.py --out reduce.json [--k 8192] [--d 128] [--workers 1,4]

Builds one worker's step result of realistic size (exact partial sums of K x D, as the step task returns them),
then times, median of repeated runs with the device synchronised: the step's hand-over to the wire
(`worker.StepResult.of`), a pickle round trip of it (what Dask does between processes), and the reduction task
(`worker.reduce`) over 1..W such results on the GPU and on the CPU, plus its phases, and one reducer's share
(K/W rows) of the reduce-scatter over W workers.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics

import torch

from provenance import provenance
from timing import seconds

from flashkm_dist.dask import worker
from flashkm_dist.engine import FitNumerics
from flashkm_dist.kernels import fixed_point as fp
from flashkm_dist.kernels import reference
from flashkm_dist.lloyd import next_centers
from flashkm_dist.streaming import EngineStep


def timed(fn, reps: int = 15) -> float:
    """Median milliseconds of fn() after two warm-up calls (device synchronised around each)."""
    return 1e3 * statistics.median(seconds(fn, reps, warmup=2))


def fake_step(k: int, d: int, rows: int, dev) -> tuple[EngineStep, FitNumerics]:
    """A step's exact partials with the magnitudes of `rows` standard-normal fp16 rows spread over k clusters."""
    scale = fp.FixedPointScale.from_bounds(8.0, 1.0, 8.0 * 8.0 * d)
    x = torch.randn(k, d, device=dev, dtype=torch.float64).clamp(-8.0, 8.0)
    sums = fp.normalize(fp.quantize(x, scale.sum_exp) * (rows // k))  # rows // k rows of value x
    weights = fp.normalize(fp.quantize(torch.ones(k, device=dev), scale.weight_exp) * (rows // k))
    inertia = fp.exact_sum(torch.rand(1000, device=dev), scale.dist_exp)
    numerics = FitNumerics("euclidean", torch.zeros(d, dtype=torch.float64, device=dev), scale, 1.0)
    return EngineStep(reference.Partials(sums, weights, scale), inertia, rows // 3, 0.1), numerics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--workers", default="1,4")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (CPU: checks the script only)
    step, numerics = fake_step(args.k, args.d, 16 << 20, dev)
    centers = worker.Update(torch.randn(args.k, args.d, dtype=torch.float16))
    wire = worker.StepResult.of(step)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    res = {**provenance(), "device": name, "k": args.k, "d": args.d,
           "sums_bytes": int(wire.sums.nbytes), "centers_bytes": int(centers.centers.numel() * 2)}
    res["step_result_of_ms"] = timed(lambda: worker.StepResult.of(step))
    res["pickle_round_trip_ms"] = timed(lambda: pickle.loads(pickle.dumps(wire, protocol=5)))
    for w in [int(v) for v in args.workers.split(",")]:
        parts = [pickle.loads(pickle.dumps(wire, protocol=5)) for _ in range(w)]
        res[f"reduce_w{w}_ms"] = timed(
            lambda: worker.reduce(numerics, "profile", None, [], 0, args.k, [centers], *parts))
        cut = [worker.rows_of(p, 0, args.k // w) for p in parts]  # one reducer's share of w reducers
        res[f"reduce_share_w{w}_ms"] = timed(
            lambda: worker.reduce(numerics, "profile", None, [], 0, args.k // w, [centers], *cut))
        for where in ("cuda", "cpu") if dev.type == "cuda" else ("cpu",):
            device = torch.device(where)
            res[f"combine_w{w}_{where}_ms"] = timed(lambda: worker._combined(parts, numerics.scale, device))
            partials = worker._combined(parts, numerics.scale, device)[0]
            res[f"next_centers_{where}_ms"] = timed(lambda: next_centers(partials, centers.centers,
                                                                                "euclidean"))
            res[f"empty_clusters_{where}_ms"] = timed(lambda: worker.empty_clusters(partials))
    # the collective path after its all-reduce (partials, next centres, scalars, one read), op by op and as one
    # CUDA graph, which must give the same bits
    from flashkm_dist.dask import summed
    on_device = centers.centers.to(dev)
    counts = torch.tensor([123, 456], dtype=torch.int64, device=dev)  # labels changed, one worker's step ns
    flat = torch.cat([step.partials.sums.reshape(-1), step.partials.weights.reshape(-1),
                      step.inertia.reshape(-1).to(dev), counts])
    res["collective_update_ms"] = timed(lambda: summed.after_sum(flat, on_device, numerics)[2].cpu())
    if dev.type == "cuda":
        graphed = summed.GraphedUpdate(numerics)
        res["collective_update_graphed_ms"] = timed(lambda: graphed(flat, on_device)[2].cpu())
        eager, once = summed.after_sum(flat, on_device, numerics), graphed(flat, on_device)
        res["collective_graphed_same_bits"] = bool(torch.equal(eager[1], once[1]) and torch.equal(
            eager[2].view(torch.int64), once[2].view(torch.int64)))
    if dev.type == "cuda":  # per-op CPU and CUDA time of one reduction over one step (torch profiler)
        from torch.profiler import ProfilerActivity, profile
        parts = [pickle.loads(pickle.dumps(wire, protocol=5))]
        worker.reduce(numerics, "profile", None, [], 0, args.k, [centers], *parts)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                worker.reduce(numerics, "profile", None, [], 0, args.k, [centers], *parts)
            torch.cuda.synchronize()
        res["reduce_w1_ops"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        print(res["reduce_w1_ops"])
    print(json.dumps({k: v for k, v in res.items() if k != "reduce_w1_ops"}, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
