#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the SPELL example workflows headless through ComfyUI's
# executor on the embedded demo model, each with SPELL and with it bypassed (the batch memory example three runs
# in a row), and writes a labelled figure (grid.png) and metrics.json to run/main_job/, then prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m tools.main_job "$@"
