"""One command per benchmark suite on a GPU host; results land in benchmarks/results/ with tables and plots.

    python benchmarks/harness.py kernels       # exactness on the GPU + kernel timings vs flash-kmeans, fastkmeans
    python benchmarks/harness.py engine        # one GPU, host data: streamed vs cached vs flash-kmeans largeN
    python benchmarks/harness.py out-of-core   # one GPU, host data larger than the GPU (N=180M fp32, 92 GB)
    python benchmarks/harness.py distributed   # Dask-CUDA workers 1, 2, 4: strong scaling, overhead, both reductions
    python benchmarks/harness.py weak          # 2^24 fp16 rows per GPU on 1, 2, 4 GPUs: iteration time growth
    python benchmarks/harness.py headline      # N = 1e9, D = 128, fp16, K = 32768 on 4 GPUs, data made on the workers;
                                               then the series N = 1e8, 2.5e8, 5e8 on the same 4 GPUs
    python benchmarks/harness.py end-to-end    # blobs with known centres, 1e7 and 1e8 rows: time to convergence, inertia
    python benchmarks/harness.py report        # only re-render results/REPORT.md and the plots
    options: --tag h200x4 (default: from the GPUs seen), --results DIR (default: results/), --dry-run (print the
             commands), -- EXTRA ARGS

Each suite is one of the scripts in this folder with the settings of the committed results, writes its JSON as
results/<stem>_<tag>[_<size>].json (peers timed in the same process), then `report.py` renders REPORT.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
_BIG = ["--k", "32768", "--workers", "4", "--iters", "4", "--resident-only"]
SUITES = {  # suite -> runs of (script, JSON stem, file suffix, arguments)
    "kernels": [("gpu_check.py", "gpu_check", "", [])],
    "engine": [("engine_check.py", "engine_check", "", ["--log2n", "26"])],
    "out-of-core": [("engine_check.py", "engine_check", "_n180m", ["--n", "180000000", "--iters", "2"])],
    "distributed": [("dask_scaling.py", "dask_scaling", "", ["--workers", "1,2,4"])],
    "weak": [("dask_scaling.py", "dask_weak", "", ["--weak", str(1 << 24), "--workers", "1,2,4", "--resident-only"])],
    "headline": [("dask_scaling.py", "dask_1e9", "", ["--n", str(10 ** 9), *_BIG])]
    + [("dask_scaling.py", "dask_series", f"_n{int(n) // 10 ** 6}m", ["--n", str(int(n)), *_BIG,
                                                                            "--no-exactness"])
       for n in (1e8, 2.5e8, 5e8)],
    "end-to-end": [("end_to_end.py", "end_to_end", f"_n{int(n) // 10 ** 6}m", ["--n", str(int(n)),
                                                                                      "--k", "1024"])
                   for n in (1e7, 1e8)],
}


def device_tag() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            words = torch.cuda.get_device_name(0).split()  # "NVIDIA H100 80GB HBM3" -> h100
            name = next((w.lower() for w in words[1:] if any(c.isdigit() for c in w)), words[-1].lower())
            return f"{name}x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return "cpu"


def commands(suite: str, tag: str, results: Path, extra: list) -> list:
    return [[sys.executable, str(HERE / script), "--out", str(results / f"{stem}_{tag}{suffix}.json"), *args, *extra]
            for script, stem, suffix, args in SUITES[suite]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=[*SUITES, "report"])
    ap.add_argument("--tag", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="folder for the JSON, tables and plots")
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    todo = [] if args.suite == "report" else commands(args.suite, args.tag or device_tag(), args.results, extra)
    todo.append([sys.executable, str(HERE / "report.py"), "--results", str(args.results)])
    for cmd in todo:
        print("+", " ".join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd)
            if rc != 0:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
