#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install the project with its test extras.
# Idempotent: re-running only reinstalls when pyproject.toml changed. Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  if ! "$py" -m venv "$venv" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"; "$py" -m venv "$venv"
    else
      echo "error: '$py -m venv' failed; install python3-venv (Python >= 3.10 is required)" >&2; exit 1
    fi
  fi
fi
stamp="$venv/.flashkm-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -qq --disable-pip-version-check --upgrade pip setuptools wheel
  # torch first and pinned, so that the range in pyproject.toml does not pull a different build.
  "$venv/bin/python" -c "import torch" 2>/dev/null || \
    "$venv/bin/python" -m pip install -qq --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install -qq --disable-pip-version-check -e "$root[test]"
  echo "$want" > "$stamp"
fi
