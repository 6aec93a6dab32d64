"""Reading and writing latents as safetensors: atomic writes, clear errors, never unpickling."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "spell-latents/1"


class StorageError(ValueError):
    """A file that cannot be used; the message says which file and why."""


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise StorageError(f"{what} holds {bad} NaN/Inf values")


def atomic_save(tensors: dict, path: str | os.PathLike, metadata: dict) -> None:
    """save_file into a temporary file of the same folder, fsync, then rename over path: a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, value) -> None:
    """Writes value as JSON to path through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_latents(path: str | os.PathLike, latents: torch.Tensor, meta: dict | None = None) -> None:
    """Writes {"latents": [N, ...]} with JSON metadata atomically."""
    header = {"format": FORMAT, "meta": json.dumps(meta or {})}
    atomic_save({"latents": latents.detach().to("cpu", torch.float32).contiguous()}, path, header)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file; StorageError naming the file when it is not one (never unpickles)."""
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StorageError(f"{path} is not a readable safetensors file ({e})") from e
    return tensors, header


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Reads a file written by save_latents -> (latents [N, ...] float32, meta)."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path} does not exist")
    tensors, header = read_safetensors(path)
    if header.get("format") != FORMAT or "latents" not in tensors:
        raise StorageError(f"{path} is a safetensors file but not a SPELL latent set (format {header.get('format')!r})")
    latents = tensors["latents"].float()
    check_finite(latents, str(path))
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise StorageError(f"{path} has unreadable metadata ({e})") from e
    return latents, meta


def inside(base: str | os.PathLike, relative: str) -> Path:
    """base/relative, refusing anything that resolves outside base (.., absolute paths, symlinks) or that the file
    system cannot hold: the pack's one containment rule, ``spell_core.paths.contained``."""
    from .paths import contained

    return contained(base, relative)
