#!/usr/bin/env bash
# Set up the locked environment (.venv via uv), then run one of:
#   extract [hydra overrides...]   python -m runners.extract
#   test [pytest args...]          ruff check + pytest
#   bench [args...]                python -m benchmarks.extract
#   gpu-check [args...]            python -m benchmarks.gpu (gpu tests + GPU benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."

uv_cmd() {
  if command -v uv >/dev/null 2>&1; then uv "$@"; return; fi
  if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "installing uv with pip ..." >&2
    python3 -m pip install --quiet --user uv 2>/dev/null \
      || python3 -m pip install --quiet --user --break-system-packages uv 2>/dev/null \
      || python3 -m pip install --quiet uv
  fi
  python3 -m uv "$@"
}

ensure_ffmpeg() {
  # torchcodec and whisperX decode through ffmpeg; the openSMILE/librosa/torchaudio paths do not.
  command -v ffmpeg >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ffmpeg with apt-get ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "warning: ffmpeg is missing (needed for whisperX): sudo apt-get install -y ffmpeg" >&2
  fi
}

ensure_postgres() {
  # Only the tests need it: they start a throw-away PostgreSQL behind `mlflow server`.
  command -v initdb >/dev/null 2>&1 && return
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql with apt-get (for the tracking-server test) ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "warning: PostgreSQL is missing, its test will skip: sudo apt-get install -y postgresql" >&2
  fi
}

ensure_ffmpeg
[ "${1:-}" = test ] && ensure_postgres
# Bytecode compiled once at install: with PYTHONDONTWRITEBYTECODE set (as on this project's
# machines) every command would otherwise compile torch, Lightning and transformers from source
# (import lightning: 18 s without, 8 s with).
uv_cmd sync --frozen --quiet --compile-bytecode

cmd="${1:-extract}"
shift || true
case "$cmd" in
  extract) exec .venv/bin/python -m runners.extract "$@" ;;
  test) .venv/bin/ruff check . && exec .venv/bin/python -m pytest "$@" ;;
  bench) exec .venv/bin/python -m benchmarks.extract "$@" ;;
  gpu-check)
    # Every gpu-marked test, then the GPU benchmarks, one table (benchmarks/gpu.py); sized for
    # 8 minutes on one H100/H200. No GPU: say so and succeed, so CI on CPU hosts stays green.
    if ! command -v nvidia-smi >/dev/null 2>&1 \
      || ! .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
      echo "no CUDA device: gpu-check skipped"; exit 0
    fi
    exec .venv/bin/python -m benchmarks.gpu "$@" ;;
  *) echo "usage: $0 {extract|test|bench|gpu-check} [args...]" >&2; exit 2 ;;
esac
