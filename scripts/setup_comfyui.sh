#!/usr/bin/env bash
# Prepares a Python for a ComfyUI checkout of your own (e.g. a newer upstream than the pinned 0.3.75):
#   scripts/setup_comfyui.sh /path/to/ComfyUI
#   SPELL_COMFYUI=/path/to/ComfyUI .venv-comfyui/bin/python -m pytest tests -q
# .venv-comfyui/ sees everything in .venv/ (a .pth file) and adds what the checkout's requirements.txt asks for
# beyond it, with torch, torchvision, torchsde and numpy held at .venv's versions.
# torchaudio (imported unconditionally by newer comfy/sd.py) is taken at the release built with the same minor
# version as .venv's torch, falling back to the newest release, which loads on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: scripts/setup_comfyui.sh /path/to/ComfyUI}
[ -f "$ROOT/comfy/model_patcher.py" ] || { echo "$ROOT is not a ComfyUI checkout (no comfy/model_patcher.py)"; exit 1; }
scripts/setup.sh
VENV=.venv-comfyui
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
OWN=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$OWN/spell_main_venv.pth"
# Requirement lines (comments and blanks dropped); torch-family wheels are never replaced.
grep -vE '^\s*(#|$)' "$ROOT/requirements.txt" | grep -viE '^(torch|torchvision|torchsde|numpy)\b' > "$VENV/requirements.txt"
TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0].rsplit('.', 1)[0])")
if grep -qiE '^torchaudio\b' "$VENV/requirements.txt"; then
  sed -i '/^torchaudio/Id' "$VENV/requirements.txt"
  "$VENV/bin/python" -m pip install -q --no-deps "torchaudio==$TORCH.*" 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --no-deps torchaudio
fi
# Its own site-packages come before .venv's on sys.path, so what it installs shadows .venv without changing it;
# the torch family is held at .venv's versions.
.venv/bin/python -m pip freeze | grep -iE '^(torch|torchvision|torchsde|numpy)==' > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q --no-warn-conflicts -r "$VENV/requirements.txt" -c "$VENV/constraints.txt"
echo "[setup_comfyui] $VENV ready for $ROOT ($(cat "$ROOT/comfyui_version.py" 2>/dev/null | grep -o '[0-9][0-9.]*' | head -1))"
