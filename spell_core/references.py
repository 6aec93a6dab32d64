"""Protected sets: reference latents that generation must stay away from (SPELL's static mode).

Images are read with Pillow, never unpickled; sets and cached encodings are safetensors files.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .variants import make as make_variants, preset as variant_preset
from .storage import StorageError, check_finite, load_latents, save_latents

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE_MODES = ("center crop", "stretch")


# Sets larger than this are searched through an exact index (spell_core.index) instead of brute force.
INDEX_MIN_REFERENCES = 4096


@dataclass
class ReferenceSet:
    """latents [N, C, h, w] in the VAE's space (as LATENT["samples"]), or an index over such latents for sets
    too large for RAM; meta says where they came from."""

    latents: torch.Tensor | None
    meta: dict = field(default_factory=dict)
    index: object = None  # index.ReferenceIndex, built on demand for large sets or loaded from a folder

    def __post_init__(self):
        if self.latents is None:
            if self.index is None:
                raise ValueError("a reference set needs latents or an index")
            return
        if self.latents.ndim < 3:
            raise ValueError(f"reference latents must be [N, C, ...], got shape {tuple(self.latents.shape)}")
        check_finite(self.latents, "reference latents")

    def __len__(self) -> int:
        return len(self.index) if self.latents is None else self.latents.shape[0]

    @property
    def item_shape(self) -> tuple:
        return tuple(self.index.item_shape) if self.latents is None else tuple(self.latents.shape[1:])

    def search_index(self):
        """The exact index for large sets (built once, kept on the set), None for small ones."""
        if self.index is None and len(self) >= INDEX_MIN_REFERENCES:
            from .index.search import ReferenceIndex

            self.index = ReferenceIndex.build(self.latents)
        return self.index

    def merged(self, other: "ReferenceSet") -> "ReferenceSet":
        if other.item_shape != self.item_shape:
            raise ValueError(f"cannot merge reference sets of item shapes {self.item_shape} and {other.item_shape}")
        if self.latents is None or other.latents is None:
            raise ValueError("an indexed set (a folder in models/spell_sets) cannot be combined with other sources; "
                             "use it alone, or rebuild one index from all the latents")
        sources = self.meta.get("sources", []) + other.meta.get("sources", [])
        return ReferenceSet(torch.cat([self.latents, other.latents]), {**self.meta, "sources": sources})

    def save(self, path: str | os.PathLike) -> None:
        if self.latents is None:
            raise ValueError("an indexed set is already stored in its folder")
        save_latents(path, self.latents, {"kind": "protected_set", **self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceSet":
        """A set file (safetensors) or an index folder (holding index.safetensors and its shards)."""
        path = Path(path)
        if path.is_dir():
            from .index.search import ReferenceIndex

            index = ReferenceIndex.load(path)
            if len(index) == 0:
                raise StorageError(f"{path} holds an empty index")
            return cls(None, {}, index)
        latents, meta = load_latents(path)
        if len(latents) == 0:
            raise StorageError(f"{path} holds an empty set")
        return cls(latents, meta)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in folder, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def fit_image(img: Image.Image, width: int, height: int, mode: str) -> np.ndarray:
    """RGB float [height, width, 3] in 0..1. "center crop": crop the largest centred window of the target
    aspect ratio, then resize (Lanczos); "stretch": resize without keeping the aspect ratio."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    img = img.convert("RGB")
    if mode == "center crop":
        w, h = img.size
        scale = min(w / width, h / height)
        cw, ch = round(width * scale), round(height * scale)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    img = img.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32) / 255.0


# The largest image read: Pillow's own decompression-bomb limit (about 89.5 megapixels, e.g. 9459 x 9459), checked
# on the header before any pixel is decoded, so a huge file costs nothing and gets a message rather than Pillow's
# DecompressionBombError.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def read_image(path: Path, width: int, height: int, mode: str) -> np.ndarray:
    limit = f"the largest image read is {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels: downscale it or leave it out"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise StorageError(f"{path.name} is {w} x {h} px ({w * h / 1e6:.1f} megapixels); {limit}")
            img.load()
            return fit_image(img, width, height, mode)
    except Image.DecompressionBombError as e:  # Pillow refuses over twice its limit at open
        raise StorageError(f"{path.name} is too large ({e}); {limit}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise StorageError(f"{path.name} is not a readable image ({e})") from e


def fingerprint_tensors(state: dict[str, torch.Tensor], sample: int = 4) -> str:
    """A key for a set of weights: names, shapes, dtypes, and the bytes of a few tensors."""
    h = hashlib.sha256()
    names = sorted(state)
    for n in names:
        t = state[n]
        h.update(f"{n}:{tuple(t.shape)}:{t.dtype};".encode())
    for n in names[:sample] + names[-sample:]:
        h.update(state[n].detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class EncodingCache:
    """Encoded latents of single images on disk, keyed by image content, encoder and preprocessing."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def key(self, image_bytes: bytes, encoder: str, width: int, height: int, mode: str) -> str:
        h = hashlib.sha256(image_bytes)
        h.update(f"|{encoder}|{width}x{height}|{mode}".encode())
        return h.hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        path = self.folder / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            return load_latents(path)[0]
        except StorageError:
            path.unlink(missing_ok=True)  # a damaged cache entry is re-encoded, never trusted
            return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        save_latents(self.folder / f"{key}.safetensors", latent, {"kind": "encoding_cache"})


def encode_folder(folder: Path, width: int, height: int, mode: str, encoder: str, encode, cache: EncodingCache,
                  progress=None, variants_name: str = "none") -> tuple[torch.Tensor, int]:
    """Encodes every image of folder with encode(images [B, H, W, 3]) -> latents [B, ...], reusing cache; each
    image as the versions ``variants.PRESETS[variants_name]`` makes (one, itself, for "none").

    Returns (latents [N·versions, ...], image-major, number of images actually encoded). progress(done, total) is
    called per image.
    """
    spec = variant_preset(variants_name)
    files = list_images(folder)
    if not files:
        raise StorageError(f"folder {folder.name!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out, encoded = [], 0
    for n, path in enumerate(files):
        key = cache.key(path.read_bytes(), encoder, width, height,
                        mode if spec.count == 1 else f"{mode}|variants {variants_name}")
        latent = cache.get(key)
        if latent is None or latent.shape[0] != spec.count:
            pixels = make_variants(torch.from_numpy(read_image(path, width, height, mode))[None], spec)
            latent = encode(pixels).detach().to("cpu", torch.float32)
            check_finite(latent, f"the encoding of {path.name}")
            cache.put(key, latent)
            encoded += 1
        out.append(latent)
        if progress is not None:
            progress(n + 1, len(files))
    return torch.cat(out), encoded


def fit_batch(images: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """IMAGE-style batch [B, H, W, 3] in 0..1 -> [B, height, width, 3], each through fit_image."""
    if images.shape[1:3] == (height, width):
        return images.astype(np.float32)
    out = [fit_image(Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)), width, height, mode)
           for im in images]
    return np.stack(out)
