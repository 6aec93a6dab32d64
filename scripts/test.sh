#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs every test against a real ComfyUI (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
