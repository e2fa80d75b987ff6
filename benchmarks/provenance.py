"""Which code a result came from: every suite stores these fields, and the report prints them, so that rows
measured with different kernels are never mistaken for one run (a GPU host's copy of the tree may have no git)."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_digest(*folders: str) -> str:
    """First 12 hex digits of a SHA-256 over the Python sources of the folders (path and text, sorted)."""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def provenance() -> dict:
    import flashkm_dist
    return {"flashkm_dist": flashkm_dist.__version__, "kernels_sha": source_digest("kernels"),
            "package_sha": source_digest("flashkm_dist"), "date": time.strftime("%Y-%m-%d")}


def gpu_run(device) -> dict:
    """The header of a GPU suite's result: the device, torch and triton versions, and `provenance()`."""
    import torch
    import triton
    return {"device": torch.cuda.get_device_properties(device).name, "torch": torch.__version__,
            "triton": triton.__version__, **provenance()}
