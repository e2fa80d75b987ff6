"""Can the GPU gather rows of page-locked host memory in place (`kernels.host_rows.read_in_place`), and how fast,
against copying the whole rows with the copy engine?

    python benchmarks/zero_copy_probe.py --out probe.json [--rows 16777216] [--d 128]

Host rows page-locked three ways (the pinned allocator, cudaHostRegister with flags 0 and with 'mapped'); for
each, gathers of 1/2/5/10/20/40/100 % of the rows (sorted positions) checked against host indexing, timed with CUDA
events, as GB/s of rows read; the copy engine's H2D rate of the whole rows in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from flashkm_dist.kernels.host_rows import read_in_place as gather
from provenance import provenance
from timing import seconds

DEV = torch.device("cuda")


def registered(n, d, flags):
    x = torch.empty((n, d), dtype=torch.float32)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(x.data_ptr(), x.numel() * 4, flags))
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=1 << 24)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args()
    n, d = args.rows, args.d
    res = {**provenance(), "device": torch.cuda.get_device_name(), "rows": n, "d": d, "kinds": {}}
    src = torch.randn(n, d, device=DEV)
    for kind in ("pinned", "registered_0", "registered_mapped"):
        out = {}
        try:
            x = (torch.empty((n, d), dtype=torch.float32, pin_memory=True) if kind == "pinned"
                 else registered(n, d, 0 if kind == "registered_0" else 2))
            x.copy_(src)
            dev = torch.empty_like(src)
            secs = statistics.median(seconds(lambda: dev.copy_(x, non_blocking=True), 3))
            out["copy_GBps"] = x.numel() * 4 / secs / 1e9
            for pct in (1, 2, 5, 10, 20, 40, 100):
                g = torch.Generator(device=DEV).manual_seed(pct)
                idx = torch.sort(torch.randperm(n, generator=g, device=DEV)[: n * pct // 100]).values
                got = gather(x, idx, torch.float32)
                ok = torch.equal(got, src[idx])
                secs = statistics.median(seconds(lambda: gather(x, idx, torch.float32), 3))
                out[f"gather_{pct}pct"] = {"same": ok, "ms": secs * 1e3, "GBps": idx.numel() * d * 4 / secs / 1e9}
                print(kind, pct, out[f"gather_{pct}pct"], flush=True)
        except Exception as err:  # noqa: BLE001 - reported
            out["error"] = repr(err)
        res["kinds"][kind] = out
        print(kind, out, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
