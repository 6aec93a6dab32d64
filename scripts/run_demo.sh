#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the SPELL example workflows headless through ComfyUI's
# executor on the embedded demo model and writes a baseline-vs-SPELL grid and metrics to run/main_job/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m tools.main_job "$@"
