#!/usr/bin/env bash
# Set up everything latentlab needs, idempotently (a no-op in well under a second
# when nothing changed):
#   1. system packages, when apt-get is usable: espeak-ng (spoken digits) and
#      dataset-fashion-mnist (Fashion-MNIST) for the offline default data, and
#      chromium for the test that drives the MLflow UI in a headless browser;
#   2. a virtual environment in .venv with the pinned packages (requirements.lock)
#      and latentlab installed in editable mode.
# Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# --- 1. system packages -------------------------------------------------------
want=()
command -v espeak-ng >/dev/null 2>&1 || want+=(espeak-ng)
[ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
if [ ${#want[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    echo "setup: installing Debian packages: ${want[*]}"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want[@]}" >/dev/null; }; then
      echo "setup: warning: could not install ${want[*]}; set ingest.datasets.*.path in params.yaml to local data instead" >&2
    fi
  else
    echo "setup: warning: apt-get not found; without ${want[*]} the offline defaults for speech / Fashion-MNIST are unavailable" >&2
  fi
fi

# --- 2. virtual environment -----------------------------------------------------
stamp=.venv/.latentlab-setup
digest=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing pinned packages into .venv (a few minutes the first time)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
echo "$digest" > "$stamp"
echo "setup: done"
