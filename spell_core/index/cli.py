"""The command line: ``python -m spell_core.index build --latents-dir DIR... --out DIR [--dtype float16]`` (``main``)
over folders of latent files (``latent_files``, ``folder_source``); the build itself is
``spell_core.build.build_index_folder``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from ..build import build_index_folder, cli_build, describe_source
from ..storage import StorageError
from .building import SHARD_DTYPE_CHOICES
from .engine import DEFAULT_URI, ENGINE_FILE, TOKEN_ENV, upload_folder
from .search import BACKENDS, PROJECTIONS, ReferenceIndex
from .shards import read_header


def latent_files(dirs: Sequence[str]) -> list[Path]:
    files = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise SystemExit(f"--latents-dir {d} is not a folder")
        files += sorted(p.glob("*.safetensors"))
    if not files:
        raise SystemExit("no .safetensors latent files found in " + ", ".join(dirs))
    return files


def folder_source(files: Sequence[Path]):
    """source(start) over latent files ({"latents": [n, ...]} or a single tensor), skipping whole files."""
    def rows_of(f):
        header, _ = read_header(f)
        names = [k for k in header if k != "__metadata__"]
        if not names:
            raise StorageError(f"{f} holds no tensors")
        name = "latents" if "latents" in header else names[0]
        return name, tuple(header[name]["shape"])

    info = [rows_of(f) for f in files]

    def source(start: int):
        base = 0
        for f, (name, shape) in zip(files, info):
            n = shape[0] if len(shape) >= 4 else 1
            if base + n <= start:
                base += n
                continue
            x = load_file(str(f))[name].float()
            x = x if len(shape) >= 4 else x[None]
            yield x[max(0, start - base):]
            base += n

    total = sum(s[0] if len(s) >= 4 else 1 for _, s in info)
    return source, total


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spell_core.index", description="Build a SPELL reference index.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="shard latent files and index them (resumable)")
    b.add_argument("--latents-dir", nargs="+", required=True, help="folders of latent .safetensors files")
    b.add_argument("--out", required=True, help="output folder (shards + index.safetensors)")
    b.add_argument("--shard-size", type=int, default=8192)
    b.add_argument("--backend", default="auto", choices=BACKENDS)
    b.add_argument("--projection", default="pca", choices=PROJECTIONS)
    b.add_argument("--dim", type=int, default=32, help="PCA dimensions of the lower-bound features")
    b.add_argument("--dtype", default="float32", choices=SHARD_DTYPE_CHOICES,
                   help="stored dtype of the shards: float16 halves the disk; the index searches exactly the stored "
                        "values (default float32)")
    b.add_argument("--overwrite", action="store_true", help="replace an index in --out built from other files")
    e = sub.add_parser("engine", help="store an index folder's lower-bound features in Milvus (engine.json)")
    e.add_argument("folder", help="an index folder (holds index.safetensors)")
    e.add_argument("--uri", default=DEFAULT_URI, help="a milvus-lite database name ending in .db, kept inside the "
                   f"folder (default {DEFAULT_URI}), or a Milvus server URI (http://host:19530); a token is read from "
                   f"${TOKEN_ENV}")
    e.add_argument("--collection", default=None, help="collection name (default: spell_ + the features' fingerprint)")
    args = ap.parse_args(argv)
    if args.cmd == "engine":
        return upload_command(args.folder, args.uri, args.collection)

    files = latent_files(args.latents_dir)
    source, total = folder_source(files)
    record = describe_source(files, {"kind": "latent files", "dim": args.dim, "projection": args.projection})
    return cli_build(lambda progress: build_index_folder(
        source, total, args.out, record, shard_size=args.shard_size, backend=args.backend, overwrite=args.overwrite,
        progress=progress, bar=True, index_options={"projection": args.projection, "dim": args.dim}, dtype=args.dtype),
        args.out, quiet_stages=("encode",))  # the shard writer shows its own bar



def upload_command(folder: str, uri: str, collection: str | None) -> int:
    """``engine``: uploads the features with a progress line, then one test query through the engine."""
    import sys
    import time

    try:
        index = ReferenceIndex.load(folder, engine=False)
        t0 = time.perf_counter()

        def progress(done, total):
            print(f"\r[spell engine] {done}/{total} features uploaded", end="", file=sys.stderr, flush=True)

        eng = upload_folder(index, folder, uri, collection, progress)
        print(file=sys.stderr)
        x = index.get(torch.arange(min(len(index), 1)))
        i, k, d = index.range_search(x, 1e-3) if len(x) else (None, [], None)
        print(f"[spell engine] {eng.describe()} ready in {time.perf_counter() - t0:.1f} s; {Path(folder) / ENGINE_FILE} "
              f"written; a test query found {len(k)} reference(s) within 0.001 of reference 0")
    except StorageError as e:
        print(f"[spell engine] {e}", file=sys.stderr)
        return 1
    return 0
