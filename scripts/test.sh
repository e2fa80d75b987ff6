#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (CPU only; Triton kernels under its interpreter).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"
