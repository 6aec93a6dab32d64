"""The streaming, resumable shard builder (``build_shards``, float32 or float16 shards: ``shard_dtype``) and the
containment checks of an index folder (``shards_within``, ``folder_within``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..storage import StorageError, atomic_write_json, check_finite, remove_stale_temporaries_in, save_latents
from .shards import INDEX_FILE, MANIFEST, ProgressFn, Shard, read_header


def shards_within(files: Sequence[str | os.PathLike], base: str | os.PathLike, listed_in) -> list[Path]:
    """files as Paths, each refused (PathRefused, a StorageError) unless its real path (symlinks followed, '..'
    resolved) is inside base's real path."""
    from ..paths import PathRefused, contained

    for f in files:
        try:
            contained(base, os.path.abspath(f), "shard", "rebuild the index: its shards must lie in its own folder")
        except PathRefused as e:
            raise PathRefused(f"{listed_in} lists a {e}") from e
    return [Path(f) for f in files]


def folder_within(folder: str | os.PathLike) -> None:
    """Refuses (PathRefused) an index folder holding an entry that is a symbolic link leading out of it, or
    whose index or manifest lists a shard outside it; reads nothing but their headers. For a build that is
    about to open or resume what the folder holds."""
    from ..paths import contained

    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        contained(folder, p.name, "entry", f"remove that link from {folder}")
    if (folder / INDEX_FILE).is_file():
        header, _ = read_header(folder / INDEX_FILE)
        try:
            listed = json.loads((header.get("__metadata__") or {}).get("shards", "[]"))
        except (ValueError, TypeError, AttributeError):
            listed = []  # a damaged index: the build replaces or refuses it as before
        shards_within([folder / f for f in listed], folder, folder / INDEX_FILE)
    if (folder / MANIFEST).is_file():
        try:
            listed = json.loads((folder / MANIFEST).read_text()).get("shards", [])
        except (OSError, ValueError, AttributeError):
            listed = []
        shards_within([folder / f for f in listed if isinstance(f, str)], folder, folder / MANIFEST)


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


SHARD_DTYPE_CHOICES = ("float32", "float16")
FLOAT16_MAX = 65504.0


def shard_dtype(dtype: str | torch.dtype) -> str:
    """The stored dtype of shards, "float32" or "float16", from that name or torch.float32 / torch.float16;
    ValueError naming the choices otherwise."""
    name = {torch.float32: "float32", torch.float16: "float16"}.get(dtype, dtype)
    if name not in SHARD_DTYPE_CHOICES:
        raise ValueError(f"shard dtype must be one of {SHARD_DTYPE_CHOICES}, got {dtype!r}")
    return name


def complete_shards(out_dir: Path, shard_size: int, dtype: str = "float32") -> int:
    """Number of leading shards that exist, open cleanly, hold exactly shard_size rows and store dtype."""
    j = 0
    while True:
        try:
            s = Shard(out_dir / shard_name(j))
            if len(s) != shard_size or s.dtype != dtype:
                return j
        except StorageError:
            return j
        j += 1


def build_shards(source: Iterable[torch.Tensor] | Callable[[int], Iterable[torch.Tensor]], out_dir: str | os.PathLike,
                 shard_size: int = 8192, total: int | None = None, progress: ProgressFn | None = None,
                 bar: bool = False, dtype: str | torch.dtype = "float32") -> list[Path]:
    """Writes latent batches [n, ...] from source into out_dir/shard-XXXXX.safetensors, atomically.

    Resumable: shards already complete are kept and their rows skipped. source is an iterable of batches
    (skipped rows are then read and dropped) or a callable source(start) returning batches from row
    ``start`` on (skips for free). A manifest.json written last marks the set complete; a complete set
    is returned as is. progress(done, total) is called after every batch (total None if unknown);
    bar shows a tqdm progress bar. Returns the shard paths.

    dtype: "float32" (default) or "float16" (half the disk and page cache; values rounded to nearest, and the
    index searches exactly the float32 values of what is stored). A latent beyond float16's range (|x| > 65504)
    raises StorageError. Shards of another dtype count as missing: a resume with a new dtype rewrites them.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    dtype = shard_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("shard_size") == shard_size and info.get("dtype", "float32") == dtype:
            return shards_within([out / f for f in info["shards"]], out, manifest)
    remove_stale_temporaries_in(out)  # of killed writes; a live writer's are kept
    done_shards = complete_shards(out, shard_size, dtype)
    start = done_shards * shard_size
    it = source(start) if callable(source) else source
    skip = 0 if callable(source) else start
    pbar = None
    if bar:
        from tqdm import tqdm

        pbar = tqdm(total=total, initial=start, unit="latent", desc=f"shards -> {out.name}", dynamic_ncols=True)
    buf, nbuf, j, done, item_shape = [], 0, done_shards, start, None

    def flush():
        nonlocal buf, nbuf, j
        block = torch.cat(buf)
        save_latents(out / shard_name(j), block, {"kind": "index_shard", "index": j}, dtype=block.dtype)
        j += 1
        buf, nbuf = [], 0

    for batch in it:
        batch = batch.detach().to("cpu", torch.float32)
        if item_shape is None:
            item_shape = tuple(batch.shape[1:])
        elif tuple(batch.shape[1:]) != item_shape:
            raise ValueError(f"latent batches must share one item shape: {item_shape} then {tuple(batch.shape[1:])}")
        if skip:
            drop = min(skip, len(batch))
            batch, skip = batch[drop:], skip - drop
            if len(batch) == 0:
                continue
        check_finite(batch, f"latents {done}..{done + len(batch)}")
        if dtype == "float16":
            big = float(batch.abs().max()) if batch.numel() else 0.0
            if big > FLOAT16_MAX:
                raise StorageError(f"latents {done}..{done + len(batch)} exceed float16's range (largest |value| "
                                   f"{big:.6g} > {FLOAT16_MAX:g}): build these shards with dtype float32")
            batch = batch.half()
        while len(batch):
            take = min(shard_size - nbuf, len(batch))
            buf.append(batch[:take])
            nbuf += take
            batch = batch[take:]
            done += take
            if pbar is not None:
                pbar.update(take)
            if nbuf == shard_size:
                flush()
        if progress is not None:
            progress(done, total)
    if nbuf:
        flush()
    if pbar is not None:
        pbar.close()
    files = [shard_name(i) for i in range(j)]
    for extra in range(j, j + 1_000_000):  # a longer earlier run may have left shards past the end
        p = out / shard_name(extra)
        if not p.exists():
            break
        p.unlink()
    atomic_write_json(manifest, {"shards": files, "rows": done, "shard_size": shard_size, "dtype": dtype})
    return [out / f for f in files]
