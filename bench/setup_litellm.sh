#!/usr/bin/env bash
# The LiteLLM proxy for bench/gateway_overhead.py's peer column, in a venv of the
# bench's own (.venv-bench-litellm): never in the product's dependencies.
#
#   bash bench/setup_litellm.sh            # create or reuse, then print the version
#   LITELLM_SPEC='litellm[proxy]==1.2.3' bash bench/setup_litellm.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LITELLM_VENV:-$ROOT/.venv-bench-litellm}
SPEC=${LITELLM_SPEC:-litellm[proxy]}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/litellm" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q "$SPEC"
fi
"$VENV/bin/python" -c 'import importlib.metadata as m; print("litellm", m.version("litellm"))'
