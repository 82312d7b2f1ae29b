#!/bin/bash
# Runs HERE (where PyPI is reachable), in the repository root. Packs the device's
# wheels into ignored folders .bpw1 .. .bpwN of at most PIECE_MIB each, one per
# `run` call (a call carries 64 MiB at most, the working tree included):
#   VLLM_WHL  vLLM 0.24.0 and its missing deps (shared/notes/vllm-gpu/fetch_wheels.py)
#   BP_WHL    Bearpaw's missing deps (bench/gpu/fetch_wheels.py); a wheel already in
#             VLLM_WHL under the same file name is not sent twice
#   BP_ONLY=1 Bearpaw's wheels only (no vLLM): for the cache measurement alone
# One tar stream (vllm/ and bp/), split in pieces; .bpw1/MANIFEST has the piece count
# and the stream's sha256, which bench/gpu/device.sh checks before unpacking.
set -euo pipefail
VLLM_WHL=${1:-/tmp/vllmgpu/whl}
BP_WHL=${2:-/tmp/bpgpu/whl}
PIECE_MIB=${PIECE_MIB:-52}
STAGE=$(mktemp -d)
mkdir -p "$STAGE/bp"
if [ "${BP_ONLY:-0}" = 1 ]; then
  # Bearpaw's wheels alone, with those it shares with vLLM (cache-only runs).
  ln -s "$BP_WHL"/*.whl "$STAGE/bp/"
else
  mkdir -p "$STAGE/vllm"
  ln -s "$VLLM_WHL"/*.whl "$STAGE/vllm/"
  for f in "$BP_WHL"/*.whl; do
    [ -e "$VLLM_WHL/$(basename "$f")" ] || ln -s "$f" "$STAGE/bp/"
  done
fi
rm -rf .bpw[0-9]*
DIRS="bp"; [ -d "$STAGE/vllm" ] && DIRS="vllm bp"
(cd "$STAGE" && tar chf - $DIRS) > "$STAGE/all.tar"
split -b $((PIECE_MIB * 1024 * 1024)) -d -a 2 "$STAGE/all.tar" "$STAGE/piece."
n=0
for p in "$STAGE"/piece.*; do
  n=$((n + 1)); mkdir -p ".bpw$n"; mv "$p" ".bpw$n/"
  grep -qx "/.bpw$n/" .git/info/exclude 2>/dev/null || echo "/.bpw$n/" >> .git/info/exclude
done
echo "pieces=$n sha256=$(sha256sum "$STAGE/all.tar" | cut -d' ' -f1)" > .bpw1/MANIFEST
echo "vllm wheels: $(ls "$STAGE/vllm" 2>/dev/null | wc -l), bearpaw wheels: $(ls "$STAGE/bp" | wc -l)"
cat .bpw1/MANIFEST; du -sb .bpw* | awk '{printf "%s %.1f MiB\n", $2, $1/1048576}'
rm -rf "$STAGE"
