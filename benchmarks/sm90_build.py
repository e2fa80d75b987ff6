"""Build a FlashAssign kernel (the streaming kernel, the sm_90 pass, or the finishing kernel) for Hopper (sm_90) on
a machine without a GPU, and report what the compiler made of it: registers, spills, shared memory, ptxas's notes,
the SASS instruction mix of the whole kernel and the widths of its global loads.

    python benchmarks/sm90_build.py [--k 8192] [--d 128] [--stream | --finish] [--out DIR] [--json]
    # exit 1: spills, or no HGMMA in a streaming kernel

Why: GPU time is scarce, and most questions about a kernel edit (did the tensor-core instructions survive, did
registers spill, did ptxas serialise the wgmma pipeline, how many min/max per score) are answered by the compiler
alone. Triton's JIT is driven through its normal `warmup` path with a stand-in driver that reports an sm_90 target
(nothing is launched), so the build is the one the GPU would get for the same launch parameters (the tile choice
uses H100/H200 device figures). Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch


class _Sm90Driver:
    """Just enough of Triton's driver for `JITFunction.warmup` to compile for sm_90."""

    backend = "cuda"

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


HOPPER = dict(sm_count=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024, l2_bytes=50 * 1024 * 1024,
              capability=(9, 0), interpreted=False)


def build_assign(k: int, d: int):
    """The streaming kernel as flash_assign would launch it for fp16 x (N, d) against k centroids on sm_90."""
    from triton.runtime import driver
    driver.set_active(_Sm90Driver())
    from flashkm_dist.kernels import assign as A
    from flashkm_dist.kernels import config as C
    C.device_traits = lambda device: C.DeviceTraits(**HOPPER)
    cfg = C.assign_config(torch.device("cuda"), k, d, torch.float16)
    n_pad, k_pad, d_pad = cfg.block_n * 4, cfg.padded_k(k), cfg.padded_d(d)
    f16, f32 = torch.float16, torch.float32
    kernel = A._assign_kernel.warmup(
        torch.zeros(1, n_pad, d_pad, dtype=f16), torch.zeros(1, n_pad, 2, dtype=f32),
        torch.zeros(1, k_pad, d_pad, dtype=f16), torch.zeros(1, k_pad, dtype=f32), torch.zeros(3, n_pad, dtype=f32),
        n_pad, n_pad, k_pad, d_pad, C.key_bits(k_pad, cfg.block_k),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, RESIDENT=cfg.resident, PTX=True,
        CHAIN=cfg.chain, num_warps=cfg.num_warps, num_stages=cfg.num_stages, grid=(1, 1))
    return kernel, cfg


def build_stream(k: int, d: int, pairs: int = 2, **variant):
    """The warp-specialised Gluon streaming pass (kernels/assign_sm90.py) as flash_assign would launch it, for
    `pairs` row pairs."""
    from triton.runtime import driver
    driver.set_active(_Sm90Driver())
    from flashkm_dist.kernels import config as C
    C.device_traits = lambda device: C.DeviceTraits(**HOPPER)
    cfg = C.assign_config(torch.device("cuda"), k, d, torch.float16)
    if cfg.stream is None:
        sys.exit(f"no sm_90 streaming pass for K={k} D={d} (see config._stream_config)")
    from flashkm_dist.kernels import assign_sm90 as G
    sc = dataclasses.replace(cfg.stream, **variant)  # (a variant of the shipped config, e.g. block_n=64)
    n_pad, k_pad, d_pad = pairs * sc.rows, cfg.padded_k(k), cfg.padded_d(d)
    f16, f32 = torch.float16, torch.float32
    a_desc, c_desc, n_desc = G.descriptors(torch.zeros(1, n_pad, d_pad, dtype=f16),
                                           torch.zeros(1, k_pad, d_pad, dtype=f16), torch.zeros(1, k_pad, dtype=f32),
                                           sc.block_n, sc.block_k)
    kernel = G._stream_kernel.warmup(a_desc, c_desc, n_desc, torch.zeros(1, n_pad, 2, dtype=f32),
                                     torch.zeros(3, n_pad, dtype=f32), n_pad, k_pad, n_pad, n_pad // sc.rows,
                                     n_pad // sc.rows, C.key_bits(k_pad, sc.block_k), BLOCK_N=sc.block_n,
                                     BLOCK_K=sc.block_k, D_PAD=d_pad, NBUF=sc.stages, REGS=sc.regs, num_warps=4, grid=(1,))
    return kernel, cfg


def build_finish(k: int, d: int, dtype: torch.dtype = torch.float16, batched: bool = True, xb16=None):
    """FlashAssign's finishing kernel (`assign._finish_kernel`: margin test, float64 distance of the label) as
    flash_assign would launch it for x (B, N, d) of `dtype` (B = 2 with `batched`, else 1); xb16 overrides the
    launcher's `assign._xb16` (whether x's batch offset is known to keep 16-byte loads)."""
    from triton.runtime import driver
    driver.set_active(_Sm90Driver())
    from flashkm_dist.kernels import assign as A
    from flashkm_dist.kernels import config as C
    C.device_traits = lambda device: C.DeviceTraits(**HOPPER)
    cfg = C.assign_config(torch.device("cuda"), k, d, dtype)
    block_n, epi_d, warps = cfg.finish
    tile_k = cfg.stream.block_k if cfg.stream else cfg.block_k
    b, n_pad, k_pad = 1 + batched, 4 * block_n, cfg.padded_k(k)
    x, cd = torch.zeros(b, n_pad, d, dtype=dtype), torch.zeros(b, k, d, dtype=dtype)
    f32, i32 = torch.float32, torch.int32
    kernel = A._finish_kernel.warmup(
        torch.zeros(3, b * n_pad, dtype=f32), b * n_pad, x, x.stride(0), x.stride(1), x.stride(2),
        torch.zeros(b, n_pad, 2, dtype=f32), cd, cd.stride(0), cd.stride(1), cd.stride(2),
        torch.zeros(b, n_pad, dtype=torch.int64), torch.zeros(b, n_pad, dtype=f32),
        torch.zeros(b, n_pad, dtype=torch.int8), torch.zeros(b, n_pad, dtype=f32), torch.zeros(2, b, n_pad, dtype=i32),
        torch.zeros(b, 4, dtype=i32), n_pad, n_pad, d, C.key_bits(k_pad, tile_k),
        torch.zeros(b, n_pad, dtype=f32), torch.zeros(b, 4, dtype=f32),
        COSINE=False, BLOCK_N=block_n, EPI_D=epi_d, XB16=A._xb16(x) if xb16 is None else xb16, LOWER=False,
        num_warps=warps, grid=(n_pad // block_n, b))
    return kernel, cfg


def report(kernel, out_dir: str) -> dict:
    """ptxas's resource report and notes, and the SASS instruction mix (Triton's own ptxas and cuobjdump)."""
    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptx, cubin = os.path.join(out_dir, "kernel.ptx"), os.path.join(out_dir, "kernel.cubin")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    notes = ""
    for name in ("ptxas", "ptxas-blackwell"):  # (newer Triton wheels ship the ptxas of their PTX as the second)
        if os.path.exists(os.path.join(tools, name)):
            run = subprocess.run([os.path.join(tools, name), "-v", "-arch=sm_90a", ptx, "-o", os.devnull],
                                 capture_output=True, text=True)
            notes = run.stderr
            if run.returncode == 0:
                break
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    with open(os.path.join(out_dir, "kernel.sass"), "w") as f:
        f.write(sass)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    loads = re.findall(r"\bLDG\.E[.A-Z0-9]*", sass)
    regs = re.search(r"Used (\d+) registers", notes)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", notes)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills),
            "shared_bytes": kernel.metadata.shared, "ptxas_notes": [ln.strip() for ln in notes.splitlines()
                                                                    if "(C7" in ln],
            "hgmma": ops.count("HGMMA"), "sass_ops": dict(collections.Counter(ops).most_common()),
            "global_loads": dict(collections.Counter(loads).most_common())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="also print the report as one JSON line (last)")
    ap.add_argument("--stream", action="store_true", help="the sm_90 Gluon streaming pass instead of the portable one")
    ap.add_argument("--block-n", type=int, default=None, help="--stream: rows per scorer (default: as shipped)")
    ap.add_argument("--regs", type=int, default=None, help="--stream: registers per scorer thread")
    ap.add_argument("--stages", type=int, default=None, help="--stream: ring slots")
    ap.add_argument("--finish", action="store_true", help="the finishing kernel (margin test, float64 distance)")
    ap.add_argument("--out", default=None, help="folder for kernel.ptx / .cubin / .sass (default: a temporary one)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("sm90_build.py compiles for the GPU: run it without TRITON_INTERPRET")
    variant = {name: value for name, value in (("block_n", args.block_n), ("regs", args.regs), ("stages", args.stages))
               if value is not None}
    if variant and not args.stream:
        sys.exit("--block-n, --regs and --stages are for --stream")
    if args.finish:
        kernel, cfg = build_finish(args.k, args.d)
    elif args.stream:
        kernel, cfg = build_stream(args.k, args.d, **variant)
    else:
        kernel, cfg = build_assign(args.k, args.d)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        rep = report(kernel, out)
    if args.finish:
        print(f"_finish_kernel sm_90, fp16 x (2, N, {args.d}), K={args.k}: (rows, float64 chunk, warps) {cfg.finish}")
    elif args.stream:
        print(f"assign_sm90._stream_kernel sm_90, K={args.k} D={args.d}: {cfg.stream} {variant or ''}")
    else:
        print(f"_assign_kernel sm_90, K={args.k} D={args.d}: block_n={cfg.block_n} block_k={cfg.block_k} "
              f"block_d={cfg.block_d} warps={cfg.num_warps} stages={cfg.num_stages}")
    for key, value in rep.items():
        print(f"  {key}: {value}")
    if args.json:
        print(json.dumps(rep))
    ok = rep["registers"] is not None and rep["spill_bytes"] == 0 and (rep["hgmma"] > 0 or args.finish)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
