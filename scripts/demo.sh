#!/usr/bin/env bash
# The main job: set up .venv if needed, then fit k-means on synthetic data on a local Dask cluster and print what
# was found (`--in-process` fits without Dask; `--help` lists the options).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
exec "$root/.venv/bin/python" -m flashkm_dist.demo "$@"
