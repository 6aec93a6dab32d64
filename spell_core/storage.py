"""Reading and writing latents as safetensors: atomic writes, clear errors, never unpickling."""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import StorageError  # noqa: F401 (re-exported: spell_core.storage.StorageError)

FORMAT = "spell-latents/1"


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise StorageError(f"{what} holds {bad} NaN/Inf values")


def _temporary(path: Path) -> str:
    """A new empty temporary beside path, named ``<name>.<pid>-<random>.tmp`` (see remove_stale_temporaries)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _started(pid: int) -> float | None:
    """When process pid started (seconds since the epoch); None if unknown (psutil missing, access refused)."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _is_stale(entry: os.DirEntry, pid: str | None) -> bool:
    """Whether a temporary left by a write of pid (None: no pid in its name, an earlier version's) is litter:
    its process is gone, or started after the temporary was written (a reused pid, as in a restarted
    container); without a pid, older than an hour."""
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if pid is None:
        return time.time() - mtime > 3600
    try:
        os.kill(int(pid), 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:  # exists, another account
        alive = True
    started = _started(int(pid)) if alive else None
    return not alive or (started is not None and mtime < started - 1.0)


def _remove_stale(folder: Path, pattern: re.Pattern, prefix: str = "") -> list[str]:
    removed = []
    try:
        candidates = [e for e in os.scandir(folder) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for entry in candidates:
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False) or not _is_stale(entry, m.group("pid")):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


_TEMPORARY = r"\.(?:(?P<pid>\d+)-)?[a-z0-9_]+\.tmp"


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes the temporaries that killed writes of path left beside it, and only those of this file: names
    ``<name>.<pid>-<random>.tmp`` whose process is gone, or older than that process's start (a reused pid, as in
    a restarted container). Temporaries of earlier versions (``<name>.<random>.tmp``, no pid) go when older than
    an hour. Returns the names removed. Callers call it before a write or a load; a live writer's temporary is
    never touched, so no lock is needed."""
    path = Path(path)
    return _remove_stale(path.parent, re.compile(re.escape(path.name) + _TEMPORARY), path.name + ".")


def remove_stale_temporaries_in(folder: str | os.PathLike) -> list[str]:
    """``remove_stale_temporaries`` for every file of folder (an index folder, whose shards are many)."""
    return _remove_stale(Path(folder), re.compile(r".+" + _TEMPORARY))


def atomic_save(tensors: dict, path: str | os.PathLike, metadata: dict) -> None:
    """The safetensors bytes into a temporary file of the same folder, fsync, then rename over path: a reader sees
    the old file or the new one, never half of one. Stale temporaries of path from killed writes are removed first.

    Serialised in memory and written here, not by ``save_file``: safetensors 0.8's ``save_file`` writes through a
    temporary of its own (``.tmpXXXXXX`` beside the target, then a rename), which a killed process leaves behind
    under a name that carries no owner (tests/core/test_concurrency.py found one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    try:
        data = save(tensors, metadata=metadata)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        del data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, value) -> None:
    """Writes value as JSON to path through a temporary file in the same folder, fsync and an atomic rename;
    stale temporaries of path from killed writes are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_latents(path: str | os.PathLike, latents: torch.Tensor, meta: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Writes {"latents": [N, ...]} (float32, or float16 if dtype says so) with JSON metadata atomically."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"latents are saved as torch.float32 or torch.float16, not {dtype}")
    header = {"format": FORMAT, "meta": json.dumps(meta or {})}
    atomic_save({"latents": latents.detach().to("cpu", dtype).contiguous()}, path, header)


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
    if latents.ndim < 4:
        raise StorageError(f"{path} holds latents of shape {tuple(latents.shape)}; a SPELL set holds latents "
                           f"[N, channels, height, width] as a VAE encodes them: rebuild it with the loader or save node")
    check_finite(latents, str(path))
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise StorageError(f"{path} has unreadable metadata ({e})") from e
    if not isinstance(meta, dict):
        raise StorageError(f"{path} has metadata of type {type(meta).__name__}, not a JSON object: rebuild the set")
    return latents, meta


def inside(base: str | os.PathLike, relative: str) -> Path:
    """base/relative, refusing anything that resolves outside base (.., absolute paths, symlinks) or that the file
    system cannot hold: the pack's one containment rule, ``spell_core.paths.contained``."""
    from .paths import contained

    return contained(base, relative)
