"""Index folders built from a folder of images (through an encoder, e.g. a VAE) or of latent files.

An index folder holds shard-XXXXX.safetensors (the latents, memory-mapped at query time), index.safetensors
(``index.ReferenceIndex``) and source.json, which records what the folder was built from (file names, sizes,
modification times, and the encoding settings). Builds stream: images are read and encoded a batch at a
time and written out shard by shard, so memory does not grow with the set. A build that was interrupted
resumes at its first incomplete shard when it is run again on the same source; a folder built from a
different source is never touched unless ``overwrite`` is set.

A build holds the folder's lock (``index.safetensors.lock``, ``spell_core.locking``) from its first look at the
folder to its last write, so two builds of one folder (two servers, a server and the command line) never
interleave: the second waits up to ``lock_timeout`` seconds, then opens the first one's index (same source) or
refuses (another source); if the lock is still held then, it raises ``LockTimeout`` and touches nothing. Before
anything is opened, the folder must hold no link leading out of it and no index or manifest listing a shard
outside it (``index.folder_within``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .index.building import build_shards, folder_within, shard_dtype
from .index.search import ReferenceIndex
from .index.shards import INDEX_FILE, MANIFEST
from .locking import LOCK_TIMEOUT_S, file_lock
from .references import list_images, read_image
from .storage import StorageError, atomic_write_json, check_finite
from .variants import Variants, make as make_variants, preset as variant_preset

SOURCE_FILE = "source.json"
StageProgress = Callable[[str, int, int], None]  # (stage "encode" | "index", done, total)


def describe_source(files: Sequence[Path], settings: dict) -> dict:
    """What a build reads: a digest of the files' names, sizes and modification times, plus settings."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "digest": h.hexdigest(), "settings": settings}


def image_source(files: Sequence[Path], width: int, height: int, mode: str,
                 encode: Callable[[torch.Tensor], torch.Tensor], batch: int = 8, variants: Variants = Variants()):
    """source(start) for ``build_shards``: latents of the images files[start // V:] (V = variants.count versions of
    each, ``variants.make``: image-major, version 0 the image itself), encoded ``batch`` rows at a time.

    encode(pixels [b, height, width, 3] float in 0..1) -> latents [b, ...]; one latent per version, so row
    i·V + v is version v of image files[i], and a resumed build skips the images before its first row without
    reading them.
    """
    count = variants.count

    def source(start: int):
        first, drop = divmod(start, count)
        per_read = max(1, batch // count)
        for a in range(first, len(files), per_read):
            chunk = files[a:a + per_read]
            pixels = torch.from_numpy(np.stack([read_image(p, width, height, mode) for p in chunk]))
            pixels = make_variants(pixels, variants) if count > 1 else pixels
            latents = torch.cat([encode(pixels[b:b + batch]).detach().to("cpu", torch.float32)
                                 for b in range(0, len(pixels), batch)])
            if latents.shape[0] != len(pixels):
                raise StorageError(f"the encoder returned {latents.shape[0]} latents for {len(pixels)} images")
            check_finite(latents, f"the encodings of {chunk[0].name}..{chunk[-1].name}")
            yield latents[drop:] if drop else latents
            drop = 0
    return source


def owned_files(out: Path) -> list[Path]:
    """Files of out that an index build writes (the only ones ``overwrite`` removes)."""
    names = {INDEX_FILE, MANIFEST, SOURCE_FILE}
    return [p for p in out.iterdir() if p.is_file() and (p.name in names or p.name.endswith(".tmp")
                                                         or (p.name.startswith("shard-") and p.suffix == ".safetensors"))]


def with_dtype(record: dict, dtype: str) -> dict:
    """record with the shards' dtype in its settings when it is not float32 (so float32 records, and the
    source.json of folders built before float16 shards existed, stay as they were): another dtype stores other
    values, so it is another source."""
    if dtype == "float32":
        return record
    if isinstance(record.get("settings"), dict):
        return {**record, "settings": {**record["settings"], "dtype": dtype}}
    return {**record, "dtype": dtype}


def _dtype_of(record: dict) -> str:
    settings = record.get("settings")
    return (settings if isinstance(settings, dict) else record).get("dtype", "float32")


def _without_dtype(record):
    if not isinstance(record, dict):
        return record
    out = {k: v for k, v in record.items() if k != "dtype"}
    if isinstance(out.get("settings"), dict):
        out["settings"] = {k: v for k, v in out["settings"].items() if k != "dtype"}
    return out


def build_index_folder(source, total: int, out: str | os.PathLike, record: dict, *, shard_size: int = 4096,
                       backend: str = "auto", overwrite: bool = False, progress: StageProgress | None = None,
                       bar: bool = False, index_options: dict | None = None,
                       lock_timeout: float = LOCK_TIMEOUT_S, dtype: str = "float32") -> tuple[ReferenceIndex, str]:
    """Shards the latents of ``source`` into ``out`` and indexes them; returns (index, what was done).

    record describes the source (``describe_source``); it is stored in out/source.json. If out already holds
    a complete index of the same record it is opened as is; a partial build of the same record resumes; a
    folder holding shards or an index of another record raises StorageError unless overwrite, which deletes the
    build's own files first; a folder with nothing built yet (source.json and temporaries only) is started afresh.
    index_options go to ``ReferenceIndex.build`` (projection, dim, ...). The whole build holds the folder's
    lock (module docstring); LockTimeout after lock_timeout seconds if another build holds it.

    dtype: the shards' stored dtype, "float32" (default) or "float16" (half the disk; ``index.build_shards``). It
    is part of the record (``with_dtype``): a folder of the same files in the other dtype is refused unless
    overwrite, with a message saying so.
    """
    dtype = shard_dtype(dtype)
    record = with_dtype(record, dtype)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StorageError(f"{out.name} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / INDEX_FILE, f"index build {out.name}", lock_timeout):
        folder_within(out)
        return _build_locked(source, total, out, record, shard_size, backend, overwrite, progress, bar,
                             index_options, dtype)


def _build_locked(source, total, out, record, shard_size, backend, overwrite, progress, bar, index_options,
                  dtype="float32"):
    src = out / SOURCE_FILE
    recorded = None
    if src.is_file():
        try:
            recorded = json.loads(src.read_text())
        except (OSError, ValueError):
            recorded = {"unreadable": True}
    existing = owned_files(out)
    built = [f for f in existing if f.name == INDEX_FILE or f.name.startswith("shard-")]
    if existing and recorded != record:
        # Nothing built yet (a build that failed before its first shard: only source.json and temporaries) is no
        # one's index: it is replaced, so the build can be queued again after fixing its input.
        if built and not overwrite:
            if _without_dtype(recorded) == _without_dtype(record):
                had = _dtype_of(recorded)
                raise StorageError(f"{out.name} already holds an index of the same files with {had} shards, not "
                                   f"{dtype}; build with dtype {had} to open it, or switch overwrite on to rebuild it "
                                   f"with {dtype} shards")
            was = (f"{recorded.get('files')} files, settings {recorded.get('settings')}" if isinstance(recorded, dict)
                   and "files" in recorded else "an unknown source")
            raise StorageError(f"{out.name} already holds an index built from another source ({was}); choose "
                               "another name, or switch overwrite on to replace it")
        for p in existing:
            p.unlink()
        existing = []
    if existing and (out / INDEX_FILE).is_file():
        return ReferenceIndex.load(out, within=out), "already built from the same files: opened as is"
    resumed = any(p.name.startswith("shard-") for p in existing)
    atomic_write_json(src, record)

    def stage(name):
        return None if progress is None else (lambda done, tot: progress(name, done, total))

    files = build_shards(source, out, shard_size, total=total, progress=stage("encode"), bar=bar, dtype=dtype)
    index = ReferenceIndex.build(files, backend=backend, progress=stage("index"), **(index_options or {}))
    index.save(out)
    return index, "resumed an interrupted build" if resumed else "built"


def build_from_images(folder: str | os.PathLike, out: str | os.PathLike, width: int, height: int, mode: str,
                      encode: Callable[[torch.Tensor], torch.Tensor], encoder: str, *, batch: int = 8,
                      variants_name: str = "none", **kwargs) -> tuple[ReferenceIndex, str]:
    """``build_index_folder`` over the images of folder (sorted by name) encoded with encode; encoder names
    the encoder's weights (e.g. ``references.fingerprint_tensors``) so that another VAE is another source.
    variants_name: ``variants.PRESETS`` key; each image is stored as that many versions of itself (recorded in
    source.json when it is not "none", so folders built before variants existed keep their record)."""
    spec = variant_preset(variants_name)
    files = list_images(folder)
    if not files:
        raise StorageError(f"folder {Path(folder).name!r} holds no images")
    settings = {"width": width, "height": height, "resize": mode, "encoder": encoder}
    if spec.count > 1:
        settings["variants"] = variants_name
    record = describe_source(files, settings)
    return build_index_folder(image_source(files, width, height, mode, encode, batch, spec), len(files) * spec.count,
                              out, record, **kwargs)


def cli_build(build: Callable[[StageProgress], tuple[ReferenceIndex, str]], out, quiet_stages: Sequence[str] = ()) -> int:
    """Command-line wrapper: runs build(progress) with one tqdm bar per stage (except quiet_stages, which show
    their own), turns a StorageError into a one-line exit message, and reports what was built."""
    from tqdm import tqdm

    bars = {}

    def progress(stage, done, total):
        if stage not in quiet_stages:
            bar = bars.setdefault(stage, tqdm(total=total, desc=stage, unit="latent", dynamic_ncols=True))
            bar.update(done - bar.n)

    try:
        index, what = build(progress)
    except StorageError as e:
        raise SystemExit(f"error: {e}")
    finally:
        for bar in bars.values():
            bar.close()
    print(f"{what}: {len(index)} latents of shape {tuple(index.item_shape)} ({index.backend}) in {out}",
          file=sys.stderr)
    return 0
