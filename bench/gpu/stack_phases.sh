#!/bin/bash
# Runs ON THE GPU MACHINE, in the repository root, after `device.sh stash` has
# taken every carried piece but the last. The whole measurement of
# bench/gpu_stack.py in three calls, each well inside the 10-minute limit:
#   bash bench/gpu/stack_phases.sh boot      setup (last piece), vLLM, gateway, overhead, cache
#   bash bench/gpu/stack_phases.sh steady    the steady trace: alone, oracle sweep, naive64
#   bash bench/gpu/stack_phases.sh steady2   the steady trace's SLO phases (baseline from steady.json)
#   bash bench/gpu/stack_phases.sh diurnal   the diurnal trace: alone, oracle sweep, naive64
#   bash bench/gpu/stack_phases.sh diurnal2  the diurnal trace's SLO phases (baseline from
#                                            diurnal.json), then stops everything
#   bash bench/gpu/stack_phases.sh cacheonly setup of Bearpaw's wheels alone, the cache measurements
# Every log and JSON goes to $OUT (the folder whose files come back); the
# gateway and vLLM outlive a call (their own sessions) while the machine is warm.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bpsite:/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STACK="python3 $HERE/../gpu_stack.py"

boot() {
  bash "$HERE/device.sh" setup 2>&1 | tee "$OUT/setup.log" || return 1
  bash "$HERE/device.sh" vllm /tmp/vllm.log 2>&1 | tee -a "$OUT/setup.log"
  local rc=$?
  cp /tmp/vllm.log "$OUT/vllm_server.log"
  [ $rc = 0 ] || return 1
  $STACK start 2>&1 | tee -a "$OUT/setup.log" || return 1
  $STACK overhead --out "$OUT/overhead.json" 2>&1 | tee "$OUT/overhead.log"
  $STACK cache --lookups 20000 --out "$OUT/cache.json" 2>&1 | tee "$OUT/cache.log"
  $STACK cache --lookups 20000 --namespaces 1 --concurrency 1024 --out "$OUT/cache_1024.json" \
    2>&1 | tee "$OUT/cache_1024.log"
}

cacheonly() {
  # No vLLM: Bearpaw's wheels only (pack.sh BP_ONLY=1), then the cache measurements.
  bash "$HERE/device.sh" setup 2>&1 | tee "$OUT/setup.log" || return 1
  $STACK cache --lookups 20000 --out "$OUT/cache.json" 2>&1 | tee "$OUT/cache.log"
  $STACK cache --lookups 20000 --namespaces 1 --concurrency 1024 --out "$OUT/cache_1024.json" \
    2>&1 | tee "$OUT/cache_1024.log"
}

steady() {
  # Seven phases of about 60 s each (setup included): one call, inside its 600 s.
  $STACK slo --traces steady --phases alone,fixed1,fixed2,fixed4,fixed8,fixed12,naive64 \
    --duration 45 --out "$OUT/steady.json" 2>&1 | tee "$OUT/steady.log"
  cp "$OUT/steady.json" /tmp/bp/steady-alone.json
}

steady2() {
  $STACK slo --traces steady --phases slo1.1,slo1.5 --baseline-from /tmp/bp/steady-alone.json \
    --duration 45 --out "$OUT/steady2.json" 2>&1 | tee "$OUT/steady2.log"
  for f in /tmp/bp/data/worker-slo*.log; do cp "$f" "$OUT/steady-$(basename "$f")"; done
}

diurnal() {
  $STACK slo --traces diurnal --phases alone,fixed4,fixed8,fixed12,naive64 \
    --duration 60 --out "$OUT/diurnal.json" 2>&1 | tee "$OUT/diurnal.log"
  cp "$OUT/diurnal.json" /tmp/bp/diurnal-alone.json
}

diurnal2() {
  $STACK slo --traces diurnal --phases slo1.1,slo1.5 --baseline-from /tmp/bp/diurnal-alone.json \
    --duration 60 --out "$OUT/diurnal2.json" 2>&1 | tee "$OUT/diurnal2.log"
  for f in /tmp/bp/data/worker-slo*.log; do cp "$f" "$OUT/diurnal-$(basename "$f")"; done
  gzip -c /tmp/vllm.log > "$OUT/vllm_server.log.gz"
  bash "$HERE/device.sh" stop
}

"${1:?boot|steady|steady2|diurnal|diurnal2|cacheonly}"
