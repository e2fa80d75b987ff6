"""What a same-host GPU-to-GPU hand-off of a step's partials would cost, against the host path the Dask fit uses.

Two processes, each seeing the other's GPU second (as dask-cuda's workers do): a producer makes an 8 MB int64
array per iteration (a step's partials at K=8192, D=128) and hands it over; the consumer sums it into its own
GPU's memory. Ways: torch's CUDA IPC reductions (a new handle per array, opened and closed every time), a raw
CUDA IPC handle of a buffer kept for the whole run (opened once), and the host path (copy to the host, pickle
through a pipe, copy to the device). Median milliseconds per hand-off, consumer side, after a warm-up.
Usage: python ipc_probe.py --out F.json (two GPUs).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import statistics
import time

ROWS, COLS, ITERS, WARMUP = 8192, 128, 30, 5


def _setup(first: int, second: int):
    os.environ["CUDA_VISIBLE_DEVICES"] = f"{first},{second}"
    import torch
    torch.cuda.set_device(0)
    return torch


def producer(conn, way: str):
    torch = _setup(0, 1)
    from torch.multiprocessing.reductions import reduce_tensor
    kept = None
    if way == "raw":
        import cupy
        kept = torch.empty(ROWS * COLS, dtype=torch.int64, device="cuda")
        handle = cupy.cuda.runtime.ipcGetMemHandle(kept.data_ptr())
    for i in range(ITERS):
        x = torch.full((ROWS, COLS), i, dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        if way == "torch":
            msg = pickle.dumps(reduce_tensor(x))
        elif way == "raw":
            kept.copy_(x.reshape(-1))
            torch.cuda.synchronize()
            msg = pickle.dumps((handle, i))
        else:
            msg = pickle.dumps(x.cpu().numpy(), protocol=5)
        conn.send_bytes(msg)
        conn.recv()  # the consumer is done with it
        del x
        torch.cuda.ipc_collect()
    conn.send_bytes(b"")


def consumer(conn, way: str, out):
    torch = _setup(1, 0)
    opened = {}
    times = []
    total = torch.zeros(ROWS, COLS, dtype=torch.int64, device="cuda")
    while True:
        msg = conn.recv_bytes()
        if not msg:
            break
        t0 = time.perf_counter()
        obj = pickle.loads(msg)
        if way == "torch":
            fn, args = obj
            x = fn(*args)
        elif way == "raw":
            import cupy
            handle, i = obj
            if handle not in opened:
                opened[handle] = cupy.cuda.runtime.ipcOpenMemHandle(handle)
            mem = cupy.cuda.UnownedMemory(opened[handle], ROWS * COLS * 8, None)
            arr = cupy.ndarray((ROWS, COLS), dtype=cupy.int64, memptr=cupy.cuda.MemoryPointer(mem, 0))
            x = torch.as_tensor(arr, device="cuda")
        else:
            x = torch.from_numpy(obj).cuda()
        t1 = time.perf_counter()
        total += x
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ok = bool((x[0, 0] == x[-1, -1]).item())
        del x
        conn.send(ok)
        times.append((t1 - t0, t2 - t1, t2 - t0, ok))
    steady = times[WARMUP:]
    out.put({"way": way, "open_ms": 1e3 * statistics.median(t[0] for t in steady),
             "sum_ms": 1e3 * statistics.median(t[1] for t in steady),
             "total_ms": 1e3 * statistics.median(t[2] for t in steady),
             "first_ms": 1e3 * times[0][2], "all_ok": all(t[3] for t in times), "n": len(steady)})


def measure(way: str) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    procs = [ctx.Process(target=producer, args=(a, way)), ctx.Process(target=consumer, args=(b, way, out))]
    for p in procs:
        p.start()
    try:
        result = out.get(timeout=120)
    except Exception as err:  # noqa: BLE001 - a way that fails is a result too
        result = {"way": way, "error": repr(err)}
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [measure(w) for w in ("host", "torch", "raw")]
    for r in rows:
        print(r)
    with open(args.out, "w") as f:
        json.dump({"bytes": ROWS * COLS * 8, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
