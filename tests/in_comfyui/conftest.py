"""Node tests (this folder is not called nodes/: that name would shadow ComfyUI's own nodes module) need
ComfyUI importable when their modules are collected: start it here, once, in a
temporary base directory (input/, output/, user/, models/ all inside it)."""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tools/, demo/

from tools import comfy_host  # noqa: E402

torch.set_num_threads(2)
comfy_host.start(tempfile.mkdtemp(prefix="spell-comfyui-"))
