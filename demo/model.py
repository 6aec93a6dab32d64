"""A toy model family on ComfyUI's own classes: ``comfy.ldm...UNetModel`` inside ``comfy.model_base.BaseModel``,
wrapped in a ``ModelPatcher``, so every ComfyUI sampler, hook and block patch applies to it unchanged.

Sizes: 64x64 RGB images <-> latents [4, 8, 8] (EmptyLatentImage's 4 channels at 1/8 size). A 16-channel
variant (SD3/Flux-style latent format and flow sampling) exists for tests. Conditioning is a
[1, TOKENS, CONTEXT_DIM] token tensor, as CLIP would give.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

from . import DEFAULT_WEIGHTS

CONTEXT_DIM = 32
TOKENS = 2
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / DEFAULT_WEIGHTS  # written by ``python -m demo.train``
META_KEY = "spell_demo"  # safetensors metadata key holding the demo's json metadata
TOKENS_KEY = "class_tokens"  # tensor key of the prompt table [prompts, TOKENS, CONTEXT_DIM]
MODEL_TYPES = {
    "eps": comfy.model_base.ModelType.EPS,
    "v_prediction": comfy.model_base.ModelType.V_PREDICTION,
    "flow": comfy.model_base.ModelType.FLOW,
}


class ToyLatent(comfy.latent_formats.LatentFormat):
    """4-channel latents of the demo VAE; already unit scale, so process_in/out are the identity."""

    latent_channels = 4

    def __init__(self):
        self.scale_factor = 1.0


def unet_config(channels: int = 4, model_channels: int = 32) -> dict:
    return dict(
        image_size=8, in_channels=channels, out_channels=channels, model_channels=model_channels,
        num_res_blocks=[1, 1], channel_mult=(1, 2), use_spatial_transformer=True,
        transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
        context_dim=CONTEXT_DIM,
        use_linear_in_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
        use_temporal_resblock=False,
    )


def toy_config(model_type: str = "eps", channels: int = 4, model_channels: int = 32):
    """A ComfyUI model config (``supported_models_base.BASE``) for the toy U-Net."""
    if channels == 4:
        fmt = ToyLatent
    elif channels == 16:
        fmt = comfy.latent_formats.SD3
    else:
        raise ValueError(f"toy models have 4 or 16 latent channels, got {channels}")

    class ToyConfig(comfy.supported_models_base.BASE):
        latent_format = fmt
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
        sampling_settings = {"shift": 1.0, "multiplier": 1000} if model_type == "flow" else {}

    return ToyConfig(unet_config(channels, model_channels))


def build_model(model_type: str = "eps", channels: int = 4, state_dict: dict | None = None, seed: int = 0,
                model_channels: int = 32) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around BaseModel(toy U-Net). Without state_dict, weights are initialised from seed
    (ComfyUI's layers skip initialisation, so they would otherwise hold garbage)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    config = toy_config(model_type, channels, model_channels)
    base = comfy.model_base.BaseModel(config, model_type=MODEL_TYPES[model_type], device="cpu")
    net = base.diffusion_model
    if state_dict is None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(net.named_parameters()):
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name and p.ndim == 1:
                    p.fill_(1.0)
                else:
                    fan_in = max(p[0].numel() if p.numel() else 1, 1)
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    else:
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"toy U-Net weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    net.float()
    load = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=load, offload_device=torch.device("cpu"))


def conditioning(tokens: torch.Tensor) -> list:
    """ComfyUI CONDITIONING from a token tensor [1, TOKENS, CONTEXT_DIM]."""
    return [[tokens, {}]]


class PixelShuffleVAE:
    """The demo "VAE": 64x64 RGB <-> [4, 8, 8]. Encode: grey, 4x4 average pool to 16x16, map 0..1 to -1..1,
    pixel-unshuffle by 2. Decode is its exact inverse on 16x16 grey images (then nearest 4x upscale), so
    encode(decode(z)) == z for z in [-1, 1]. Offers what ComfyUI's VAE nodes call: encode, decode, get_sd."""

    downscale = 8

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 (H, W multiples of 8) -> latents [B, 4, H/8, W/8]."""
        grey = pixels[..., :3].float().mean(-1)[:, None]
        small = F.avg_pool2d(grey, 4)
        return F.pixel_unshuffle(small * 2 - 1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> IMAGE [B, 8h, 8w, 3] in 0..1."""
        small = (F.pixel_shuffle(latents.float(), 2) + 1) / 2
        big = F.interpolate(small.clamp(0, 1), scale_factor=4, mode="nearest")
        return big[:, 0, :, :, None].expand(-1, -1, -1, 3).contiguous()

    def get_sd(self) -> dict:
        return {"pixel_shuffle_vae.version": torch.tensor([1.0])}

    def spacial_compression_encode(self) -> int:
        return self.downscale

    def spacial_compression_decode(self) -> int:
        return self.downscale


class DemoPrompts:
    """The demo's learned prompt table: ``tokens`` [P, TOKENS, CONTEXT_DIM], one row per name in ``names``
    (digit classes, "any digit", "(empty)"); ``meta`` is the training metadata (mixture, sizes, seeds)."""

    def __init__(self, tokens: torch.Tensor, names: list[str], meta: dict | None = None):
        if tokens.shape[0] != len(names):
            raise ValueError(f"prompt table has {tokens.shape[0]} rows but {len(names)} names")
        self.tokens, self.names, self.meta = tokens, list(names), dict(meta or {})

    def tokens_for(self, name: str) -> torch.Tensor:
        """Token tensor [1, TOKENS, CONTEXT_DIM] of one prompt name."""
        if name not in self.names:
            raise ValueError(f"unknown demo prompt {name!r}; choose one of {self.names}")
        i = self.names.index(name)
        return self.tokens[i:i + 1].clone()

    def conditioning(self, name: str) -> list:
        """ComfyUI CONDITIONING of one prompt name."""
        return conditioning(self.tokens_for(name))


def save_demo(path: str | Path, unet_state: dict, tokens: torch.Tensor, meta: dict) -> None:
    """Writes U-Net weights (float16), the prompt table (float32) and json metadata into one safetensors file."""
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in unet_state.items()}
    tensors[TOKENS_KEY] = tokens.detach().float().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})


def load_demo(path: str | Path = DEMO_WEIGHTS):
    """(ModelPatcher, PixelShuffleVAE, DemoPrompts) from a file written by ``save_demo``."""
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no demo weights at {path}; run `python -m demo.train`")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = load_file(str(path))
    unet = {k[len("unet."):]: v.float() for k, v in tensors.items() if k.startswith("unet.")}
    model = build_model(meta["model_type"], meta["channels"], state_dict=unet, model_channels=meta["model_channels"])
    return model, PixelShuffleVAE(), DemoPrompts(tensors[TOKENS_KEY], meta["prompt_names"], meta)
