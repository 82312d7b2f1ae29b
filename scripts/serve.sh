#!/usr/bin/env bash
# Quick start: install Bearpaw into .venv and run it on its embedded defaults
# (SQLite, in-process FAISS cache, embedded broker, a worker beside the gateway).
# Arguments are passed to `bearpaw serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.bearpaw-install
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q -U pip
  # torch first, and exactly this CPU build: a looser pin pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e .
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/bearpaw serve "$@"
