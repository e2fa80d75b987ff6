"""Tables and plots from the committed benchmark results: `results/REPORT.md` and `results/*.png`.

    python benchmarks/report.py [--results benchmarks/results]

Reads every JSON the suites wrote (gpu_check_*, stream_check_*, stream_variants_*, class_sweep_*,
iteration_profile_*, ncu_profile_*, engine_check_*, engine_fit_*, dask_scaling_*, dask_weak_*, dask_1e9_*,
dask_series_*, dask_floor_*, end_to_end_*) and renders, per file, a Markdown table with the device and versions it
came from (the headline and its N series as one table per device), plus plots: iteration times against the peers,
distributed strong and weak scaling, time per iteration against N, and the out-of-core engine against its PCIe
floor.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _versions(r: dict) -> str:
    keys = ("device", "gpus", "torch", "triton", "dask", "distributed", "date", "kernels_sha", "package_sha")
    return ", ".join(f"{k} {r[k]}" for k in keys if r.get(k) not in (None, ""))


def kernels(name: str, r: dict) -> str:
    rows = [[t["dtype"], t["n"], t["k"], t["d"], t.get("ours_iter_ms"), t.get("flash_iter_ms"),
             t.get("fastkmeans_iter_ms"), t.get("iter_ratio_vs_flash"), t.get("tflops_assign")]
            for t in r.get("timings", [])]
    batched = [[b["b"], b["n"], b["k"], b["d"], b.get("ours_batched_10_iters_ms"),
                b.get("ours_batched_op_by_op_10_iters_ms"), b.get("flash_batched_10_iters_ms"),
                b.get("graphed_same_bits")]
               for b in (r.get("batched"), r.get("batched_small")) if b and "error" not in b]
    first = r.get("first_call", {})
    first_line = ("\n\nFirst call of flash_assign, s: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} "
                                                                      f"{_f(v)}" for k, v in first.items())
                  if first else "")
    host = r.get("host")
    host_line = (f"\n\nhost: {_f(host['torch_empty_us'])} us per small torch allocation, "
                 f"{_f(host['triton_launch_us'])} us per Triton launch (launch-bound rows follow it)" if host else "")
    return (f"### {name}\n\n{_versions(r)}{host_line}\n\nLloyd iteration, ms (ratio < 1: faster than flash-kmeans)\n\n"
            + _table(["dtype", "N", "K", "D", "ours", "flash-kmeans", "fastkmeans", "ours/flash",
                      "assign TFLOP/s"], rows)
            + ("\n\nbatched_kmeans, ms for 10 iterations ('ours': as it runs, a CUDA graph where launching "
               "dominates)\n\n" + _table(["B", "N", "K", "D", "ours", "op by op", "flash-kmeans",
                                             "same bits"], batched) if batched else "")
            + first_line)


def streaming_pass(name: str, r: dict) -> str:
    """stream_check.py: the sm_90 streaming pass against the portable kernel, same process."""
    bits = r.get("bits", [])
    ok = sum(bool(b.get("ok")) for b in bits)
    rows = [[t.get("dtype"), t["n"], t["k"], t["d"], t.get("stream_only_ms"), t.get("class_pass_ms"),
             t.get("sm90_fast_pass_ms"),
             t.get("portable_fast_pass_ms"), t.get("sm90_assign_ms"), t.get("portable_assign_ms"),
             t.get("flash_assign_ms"), t.get("sm90_graphed_iter_ms"), t.get("sm90_iter_ms"), t.get("portable_iter_ms"),
             t.get("flash_iter_ms")]
            for t in r.get("timings", []) if "error" not in t]
    graphs = [t["graphed_same_bits"] for t in r.get("timings", []) if "graphed_same_bits" in t]
    graph_line = (f" Graphed iterations give the op-by-op bits: {sum(graphs)} of {len(graphs)} shapes."
                  if graphs else "")
    return (f"### {name}\n\n{_versions(r)}\n\nSame bits as the portable kernel (labels, min_dist, flags, "
            f"thresholds): {ok} of {len(bits)} cases.{graph_line} Times in ms; 'fast pass' = row pass + streaming "
            f"pass (+ class pass and margin test where the run has a class-pass column); 'iter graphed' = the "
            f"estimator's iteration (sm_90 pass, replayed CUDA graph), the other iteration "
            f"columns launch op by op.{' ' + r['note'] if r.get('note') else ''}\n\n"
            + _table(["dtype", "N", "K", "D", "sm_90 pass alone", "class pass", "fast pass sm_90",
                      "fast pass portable",
                      "assign sm_90", "assign portable", "assign flash", "iter graphed", "iter sm_90",
                      "iter portable", "iter flash"], rows))


def class_sweep(name: str, r: dict) -> str:
    """class_sweep.py: variants of the class pass (launch shape, segments of its sort), same process."""
    rows = [[f"{s['n']} x {s['k']} x {s['d']}", v["variant"], v.get("ms_with_sort"), v.get("same_bits"),
             s.get("sort_ms")] for s in r.get("shapes", []) for v in s.get("variants", [])]
    return (f"### {name}\n\n{_versions(r)}\n\n{r.get('note', '')}\n\n"
            + _table(["N x K x D", "variant", "ms with sort", "same bits", "sort alone"],
                     rows))


def stream_variants(name: str, r: dict) -> str:
    """stream_variants.py: shapes of the sm_90 streaming pass against the shipped one, same process."""
    rows = [[f"{s['n']} x {s['k']} x {s['d']}", json.dumps(v["variant"]) if v["variant"] else "shipped",
             v.get("ms"), v.get("tflops"), v.get("same_bits")]
            for s in r.get("shapes", []) for v in s.get("variants", []) if "error" not in v]
    return (f"### {name}\n\n{_versions(r)}\n\nfp16, the streaming pass alone (ms, CUDA events, median of 15); "
            f"'same bits': the three output planes equal the shipped config's. Measured fp16 matmul: "
            f"{_f(r.get('matmul_tflops_fp16'))} TFLOP/s.{' ' + r['note'] if r.get('note') else ''}\n\n"
            + _table(["N x K x D", "variant (StreamConfig fields)", "ms", "TFLOP/s", "same bits"], rows))


def engine(name: str, r: dict) -> str:
    rows = [[r["n"], r["dtype"], r.get("host_bytes", 0) / 1e9, r.get("h2d_GBps"), r.get("pcie_floor_s"),
             r.get("streaming_step_s"), r.get("cached_step_s"), r.get("cache_GiB"), r.get("flash_largeN_iter_s"),
             r.get("overlap_efficiency"), r.get("bitwise_equal_cache_vs_streaming")]]
    return (f"### {name}\n\n{_versions(r)}\n\nOne GPU, host data, K={r['k']}, D={r['d']}; seconds per iteration\n\n"
            + _table(["N", "dtype", "host GB", "H2D GB/s", "PCIe floor", "streamed", "cached", "cache GiB",
                      "flash largeN", "overlap", "bitwise equal"], rows))


def engine_fit(name: str, r: dict) -> str:
    steps = [key for key, value in r.items() if isinstance(value, dict) and "iterations" in value]  # (the fits)
    rows = [[step, r[step]["first_s"], r[step]["after_first_mean_s"], r[step]["later_half_mean_s"],
             r[step].get("after_first_mean_vs_flash"), r[step].get("later_half_mean_vs_flash"),
             r[step].get("after_first_mean_vs_uncached_floor"), r[step].get("later_half_mean_vs_uncached_floor"),
             min(i["seconds"] for i in r[step]["iterations"]),
             "/".join(str(i["rescored"]) for i in r[step]["iterations"][-3:]) if step.startswith("bounded") else "",
             "/".join(str(i.get("host_rows_read_in_place", 0)) for i in r[step]["iterations"][-3:])
             if step.startswith("bounded_skip") else ""]
            for step in steps]
    same = {key: value for key, value in r.items() if key.startswith("same_centres_every_iteration")}
    settle = r.get("settle_check")
    return (f"### {name}\n\n{_versions(r)}\n\nOne GPU, host data, N={r['n']}, K={r['k']}, D={r['d']}, {r['iters']} "
            f"iterations from random rows; {_f(r.get('cache_GiB'))} GiB cached, PCIe floor of the rest "
            f"{_f(r.get('uncached_floor_s'))} s; flash-kmeans largeN {_f(r.get('flash_largeN_iter_s'))} s/iteration; "
            f"same centres every iteration as plain: {all(same.values()) if same else None} ({len(same)} fits)"
            + (" (plain_no_tier: FlashAssign without its neighbour tier)" if "plain_no_tier" in r else "")
            + (f"; bounded_skip: settled host rows not copied, same final inertia: {r.get('same_final_inertia')}"
               if "bounded_skip" in r else "")
            + (f"; table settling (one update from the start, {settle['rows']} rows): kernel = twin "
               f"{settle['same_as_twin']}, labels exact {settle['settled_labels_exact']}, bound violations "
               f"{settle['lower_bound_violations']}, kept/settled/stale {settle['kept']}/"
               f"{settle['settled_from_table']}/{settle['stale']}" if settle else "") + "\n\n"
            + _table(["steps", "first s", "after first s", "later half s", "after first / flash",
                      "later half / flash", "after first / PCIe floor", "later half / PCIe floor", "fastest s",
                      "rows scored, last 3", "host rows read in place, last 3"], rows))


def distributed(name: str, r: dict) -> str:
    rows = []
    weak = r.get("weak_rows_per_worker")
    labels = {"resident": "dask", "resident_nccl": "nccl", "resident_default_batching": "dask, default batching",
              "resident_reducer_per_worker": "dask, reducer per worker", "resident_nccl_eager": "nccl, update op by op",
              "resident_socket": "dask, results over the socket",
              "resident_chained": "dask, chained steps",
              "resident_chained_anchored": "dask, chained, an anchor every iteration",
              "resident_chained_unpushed": "dask, chained, results fetched (not pushed)",
              "resident_chained_unbatched": "dask, chained, no message batching",
              "resident_chained_batched": "dask, chained, a message batch per 0.5 ms",
              "resident_chained_switch": "dask, chained, 0.2 ms GIL switch interval",
              "resident_chained_after_report": "dask, chained, pushed after 'task-finished' left",
              "resident_unpushed": "dask, results fetched (not pushed)",
              "resident_default_switch": "dask, default GIL switch interval"}
    for mode, label in labels.items():
        eff = r.get(f"weak_scaling_growth_{mode}" if weak else f"strong_scaling_efficiency_{mode}") or (
            r.get("strong_scaling_efficiency") if mode == "resident" else {}) or {}
        for w, v in sorted(r.get(mode, {}).items(), key=lambda kv: int(kv[0])):
            rows.append([label, w, v.get("n", r["n"]),
                         v["iteration_s"], v["slowest_worker_step_s"], v["dask_overhead_s"] * 1e3,
                         v.get("to_first_iteration_s"), eff.get(w)])
    for mode in ("host_streamed", "host_cached"):
        if mode in r:
            v = r[mode]
            rows.append([mode.replace("_", " "), v["workers"], v.get("n", r["n"]), v["iteration_s"],
                         v["slowest_worker_step_s"], v["dask_overhead_s"] * 1e3, v.get("to_first_iteration_s"),
                         None])
    flash = r.get("flash_kmeans_largeN", {})
    if "iteration_s" in flash:
        rows.append(["flash-kmeans largeN (host data)", flash.get("gpus"), r["n"], flash["iteration_s"], None, None,
                     None, None])
    exact = r.get("exactness", {})
    checked = f"{sum(all(v[k] for k in ('centers_equal', 'inertia_equal', 'labels_equal')) for v in exact.values())}"\
        f"/{len(exact)} exactness checks bitwise equal to the in-process fit" if exact else ""
    size = f"{weak} rows per worker" if weak else f"N={r['n']}"
    return (f"### {name}\n\n{_versions(r)}\n\n{size}, D={r['d']}, K={r['k']}, {r['dtype']}, seconds per iteration; "
            f"overhead = iteration minus the slowest worker's step. {checked}\n\n"
            + (f"{r['note']}\n\n" if r.get("note") else "")
            + _table(["reduction", "workers", "N", "iteration s", "slowest step s", "overhead ms",
                      "to 1st iteration s", "weak growth" if weak else "efficiency"], rows))


def _series(loaded: dict) -> dict:
    """{device tag: runs ordered by N} of the headline and its N series (dask_1e9_TAG, dask_series_TAG_nSIZE)."""
    out = {}
    for name, r in loaded.items():
        if name.startswith(("dask_1e9_", "dask_series_")):
            tag = name.removeprefix("dask_1e9_").removeprefix("dask_series_").split("_n")[0]
            out.setdefault(tag, []).append(r)
    return {tag: sorted(runs, key=lambda r: r["n"]) for tag, runs in sorted(out.items())}


def series(loaded: dict) -> str:
    """The billion-point headline and its N series, one table per device tag: N against seconds per iteration."""
    parts = []
    for tag, runs in _series(loaded).items():
        rows = []
        for r in runs:
            for mode, label in (("resident", "dask"), ("resident_nccl", "nccl")):
                for w, v in sorted(r.get(mode, {}).items()):
                    rows.append([r["n"], label, w, r["k"], v["iteration_s"], v["slowest_worker_step_s"],
                                 v["dask_overhead_s"] * 1e3, v.get("to_first_iteration_s"),
                                 r["n"] / v["iteration_s"] / 1e6])
        first = runs[-1]
        exact = first.get("exactness", {})
        checked = f" {sum(all(v.values()) for v in exact.values())}/{len(exact)} exactness checks bitwise equal " \
                  "to the in-process fit." if exact else ""
        parts.append(f"### {tag}: N series\n\n{_versions(first)}\n\nD={first['d']}, {first['dtype']}, data made on "
                     f"the workers, seconds per iteration (median after {first.get('warmup_iters_excluded', 2)} "
                     f"warm-up iterations).{checked}\n\n"
                     + _table(["N", "reduction", "workers", "K", "iteration s", "slowest step s", "overhead ms",
                               "to 1st iteration s", "M rows/s"], rows))
    return "\n\n".join(parts)


def end_to_end(name: str, r: dict) -> str:
    def exact(value):  # inertias are compared to many digits
        return None if value is None else f"{value:.9g}"

    rows = [[who, v.get("seconds"), v.get("n_iter"), exact(v.get("inertia")), v.get("centre_error"), v.get("error")]
            for who, v in (("flashkm_dist", r.get("ours", {})), ("flash-kmeans", r.get("flash_kmeans", {})))
            if v]
    sub = r.get("subsample", {})
    rows += [[f"{who} on {sub['n']} rows", v["seconds"], v["n_iter"], exact(v["inertia"]), None, None]
             for who, v in (("scikit-learn", sub.get("sklearn")), ("flashkm_dist", sub.get("ours"))) if v]
    return (f"### {name}\n\n{_versions(r)}\n\nBlobs, N={r['n']}, K={r['k']}, D={r['d']}, {r['dtype']}, {r['init']}; "
            "flash-kmeans runs as many iterations as flashkm_dist needed\n\n"
            + _table(["", "seconds", "iterations", "inertia", "centre error", "error"], rows))


def plots(results: Path, loaded: dict) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for name, r in loaded.items():
        if name.startswith("gpu_check") and r.get("timings"):
            t = r["timings"]
            labels = [f"{x['dtype']}\n{x['n'] >> 20}M x {x['k']}\nD={x['d']}" for x in t]
            fig, ax = plt.subplots(figsize=(max(6, len(t) * 1.2), 4))
            width = 0.27
            for j, (key, label) in enumerate((("ours_iter_ms", "flashkm_dist"), ("flash_iter_ms", "flash-kmeans"),
                                              ("fastkmeans_iter_ms", "fastkmeans"))):
                ax.bar([i + (j - 1) * width for i in range(len(t))], [x.get(key) or 0 for x in t], width,
                       label=label)
            ax.set_xticks(range(len(t)), labels, fontsize=7)
            ax.set_ylabel("ms per Lloyd iteration")
            ax.set_title(f"{name}: {r.get('device', '')}")
            ax.legend()
        elif name.startswith(("dask_1e9_", "dask_series_", "dask_floor")):
            continue  # series: drawn once below; the floor: a table only
        elif name.startswith("dask_"):
            fig, ax = plt.subplots(figsize=(5, 4))
            for mode, label in (("resident", "Dask reduction"), ("resident_nccl", "allreduce='nccl'")):
                pts = sorted((int(w), v["iteration_s"]) for w, v in r.get(mode, {}).items())
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
                    ax.plot([p[0] for p in pts], [pts[0][1] * pts[0][0] / p[0] for p in pts], ":", color="grey")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("workers (GPUs)")
            ax.set_ylabel("s per iteration (dotted: linear scaling)")
            ax.set_title(f"{name}: N={r['n']}, K={r['k']}")
            ax.legend()
        elif name.startswith("engine_check"):
            keys = [("pcie_floor_s", "PCIe floor"), ("streaming_step_s", "streamed"), ("cached_step_s", "cached"),
                    ("flash_largeN_iter_s", "flash largeN")]
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.bar([lab for _, lab in keys], [r.get(k) or 0 for k, _ in keys])
            ax.set_ylabel("s per iteration")
            ax.set_title(f"{name}: N={r['n']}")
        else:
            continue
        fig.tight_layout()
        out = results / f"{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        made.append(out.name)
    for tag, runs in _series(loaded).items():
        fig, ax = plt.subplots(figsize=(5, 4))
        for mode, label in (("resident", "Dask reduction"), ("resident_nccl", "allreduce='nccl'")):
            pts = [(r["n"], v["iteration_s"]) for r in runs for v in r.get(mode, {}).values()]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (rows)")
        ax.set_ylabel("s per iteration")
        ax.set_title(f"{tag}: N series, K={runs[-1]['k']}")
        ax.legend()
        fig.tight_layout()
        out = results / f"dask_series_{tag}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        made.append(out.name)
    return made


def floor(name: str, r: dict) -> str:
    """dask_floor.py: ms per chained iteration of trivial tasks, per mode and worker count."""
    per = r["ms_per_iteration"]
    counts = sorted({w for by in per.values() for w in by}, key=int)
    rows = [[mode] + [by.get(w) for w in counts] for mode, by in per.items()]
    return (f"### {name}\n\n{_versions(r)}\n\n{r.get('iters')} iterations, median of the runs, ms per iteration\n\n"
            + _table([""] + [f"{w} worker" + ("s" if w != "1" else "") for w in counts], rows)
            + (f"\n\n{r['note']}" if r.get("note") else ""))


def _ms(value_unit: list) -> float:
    """ncu's [value, unit] of a duration, in ms."""
    value, unit = value_unit
    per_ms = {"ns": 1e6, "nsecond": 1e6, "us": 1e3, "usecond": 1e3, "ms": 1.0, "msecond": 1.0}
    return float(value.replace(",", "")) / per_ms[unit]


def ncu(name: str, r: dict) -> str:
    """ncu_profile.py: what bounds each kernel of gpu_check's rows (the last launch of each)."""
    columns = ("Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput", "L2 Cache Throughput",
               "Achieved Occupancy", "Registers Per Thread")
    parts = [f"### {name}\n\n{_versions(r)}\n\nper kernel: ms, then % of peak (SM = the busiest SM pipe), "
             "occupancy % and registers per thread"]
    for case, found in r.items():
        if isinstance(found, dict) and found.get("kernels"):
            rows = [[kernel, _ms(m["Duration"])] + [m.get(c, [""])[0] for c in columns]
                    for kernel, m in found["kernels"].items() if "Duration" in m]
            parts.append(f"{case}\n\n" + _table(["kernel", "ms", "SM %", "memory %", "DRAM %", "L2 %",
                                                  "occupancy %", "registers"], rows))
    return "\n\n".join(parts)


def iteration(name: str, r: dict) -> str:
    """iteration_profile.py: one Lloyd iteration and one assign of gpu_check's rows, kernel by kernel."""
    rows = []
    for case, v in r.items():
        if isinstance(v, dict) and "graphed_iter_ms" in v:
            top = ", ".join(f"{k[0].strip('_')[:40]} {_f(k[1])}" for k in v["kernels"][:6])
            rows.append([case, v["graphed_iter_ms"], v.get("op_by_op_iter_ms"), v.get("assign_ms"), top])
    return (f"### {name}\n\n{_versions(r)}\n\nms: the graphed iteration, one op by op, one assign (rows prepared "
            "anew); the longest kernels of the op-by-op iteration, ms\n\n"
            + _table(["case", "iteration", "op by op", "assign", "longest kernels"], rows))


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    results = Path(args.results)
    loaded = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            loaded[path.stem] = data
    sections = {"Kernels (gpu_check.py)": ("gpu_check", kernels),
                "The sm_90 streaming pass against the portable kernel (stream_check.py)": ("stream_check",
                                                                                         streaming_pass),
                "Variants of the sm_90 streaming pass (stream_variants.py)": ("stream_variants", stream_variants),
                "Variants of the class pass (class_sweep.py)": ("class_sweep", class_sweep),
                "Where one iteration goes (iteration_profile.py)": ("iteration_profile", iteration),
                "What bounds each kernel (ncu_profile.py, Nsight Compute)": ("ncu_profile", ncu),
                "Engine, data larger than or as large as one GPU (engine_check.py)": ("engine_check", engine),
                "Fits on host data, plain and bounded steps (engine_fit.py)": ("engine_fit", engine_fit),
                "Distributed (dask_scaling.py)": ("dask_scaling", distributed),
                "Weak scaling (dask_scaling.py --weak)": ("dask_weak", distributed),
                "Dask's own cost of a chained iteration (dask_floor.py)": ("dask_floor", floor),
                "End to end (end_to_end.py)": ("end_to_end", end_to_end)}
    out = ["# Benchmark results", "", "Generated by `python benchmarks/report.py` from the JSON files in this folder."]
    images = plots(results, loaded)
    for title, (prefix, render) in sections.items():
        parts = [render(name, r) for name, r in loaded.items() if name.startswith(prefix)]
        if parts:
            out += ["", f"## {title}", ""] + ["\n\n".join(parts)]
            out += [f"\n![{img}]({img})" for img in images if img.startswith(prefix)]
        if prefix == "dask_scaling" and series(loaded):  # the headline right after the scaling tables
            out += ["", "## Billion points and the N series (dask_scaling.py --n)", "", series(loaded)]
            out += [f"\n![{img}]({img})" for img in images if img.startswith("dask_series_")]
    report = results / "REPORT.md"
    report.write_text("\n".join(out) + "\n")
    return report


if __name__ == "__main__":
    print(main())
