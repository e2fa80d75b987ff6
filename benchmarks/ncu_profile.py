"""Nsight Compute figures of the kernels of gpu_check's rows: for each row, `ncu` runs ncu_target.py on the row's
shape and data, and the speed-of-light, occupancy, launch and warp-state figures of each kernel's last launch are
kept as JSON (what bounds each kernel: tensor pipes, L2, DRAM or latency).

    python benchmarks/ncu_profile.py --out ncu.json [--cases 8M_1024_fp16,...]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys

from provenance import gpu_run

KERNELS = ("_stream_kernel|_assign_kernel|_class_kernel|_finish_kernel|_resolve_kernel|_cluster_sums_kernel"
           "|_rows_kernel")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")
# gpu_check's rows: ncu_target.py arguments
CASES = {"8M_1024_fp16": ["--n", "8388608", "--k", "1024", "--blobs"],
         "1M_8192_fp16": ["--n", "1048576", "--k", "8192", "--blobs"],
         "1M_4096_d1024_fp16": ["--n", "1048576", "--k", "4096", "--d", "1024", "--blobs"],
         "batched_32x75600_1000_fp16": ["--batch", "32", "--n", "75600", "--k", "1000"]}
KEPT = {"Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput", "L1/TEX Cache Throughput",
        "L2 Cache Throughput", "Achieved Occupancy", "Theoretical Occupancy", "Registers Per Thread",
        "Block Limit Registers", "Block Limit Shared Mem", "Grid Size", "Block Size", "Waves Per SM",
        "Warp Cycles Per Issued Instruction", "Avg. Active Threads Per Warp", "Dynamic Shared Memory Per Block"}


def parse(text: str) -> dict:
    """{kernel name: {metric: [value, unit]}} of the last launch of each kernel in ncu's --csv --page details."""
    start = text.find('"ID"')
    if start < 0:
        return {}
    launches = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        name = row["Kernel Name"].split("(")[0]
        if row["Metric Name"] in KEPT:
            launches.setdefault(row["ID"], (name, {}))[1][row["Metric Name"]] = [row["Metric Value"],
                                                                                 row["Metric Unit"]]
    return {name: metrics for name, metrics in launches.values()}  # (in launch order: each name's last stays)


def profile(args: list) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = ["ncu", "--clock-control", "none", "--csv", "--page", "details", "-k", f"regex:{KERNELS}"]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, os.path.join(here, "ncu_target.py"), "--reps", "2"] + args
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=here, timeout=900)
    out = {"command": " ".join(cmd[cmd.index(sys.executable) + 1:]), "returncode": done.returncode,
           "kernels": parse(done.stdout)}
    if not out["kernels"]:
        out["output_tail"] = (done.stdout[-3000:] + done.stderr[-3000:])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    import torch
    result = {**gpu_run(torch.device("cuda")), "sections": SECTIONS}
    for name in args.cases.split(","):
        result[name] = profile(CASES[name])
        print(name, json.dumps(result[name])[:3000], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
