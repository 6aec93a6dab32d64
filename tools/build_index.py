"""Command line: build a SPELL index folder from a folder of images through a VAE (what the SPELL Protected Set
Index Builder node does, without the graph). Streams, shows tqdm bars, resumes an interrupted build.

    .venv/bin/python -m tools.build_index --images DIR --vae demo|PATH.safetensors --width 512 --height 512 \\
        --out ComfyUI/models/spell_sets/NAME

--vae takes a VAE safetensors file (loaded by ComfyUI's comfy.sd.VAE, never unpickled) or "demo" for the pack's
demo model. Latent files (no VAE) are indexed by ``python -m spell_core.index build``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_vae(spec: str):
    if spec == "demo":
        from demo.model import load_demo

        return load_demo()[1]
    path = Path(spec)
    if path.suffix != ".safetensors" or not path.is_file():
        raise SystemExit(f"--vae {spec}: give a .safetensors VAE file or 'demo'")
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path), safe_load=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.build_index", description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="folder of images (PNG, JPEG, WebP, BMP; sorted by name)")
    ap.add_argument("--vae", required=True, help="VAE .safetensors file, or 'demo'")
    ap.add_argument("--out", required=True, help="index folder to write (e.g. ComfyUI/models/spell_sets/NAME)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--resize", default="center crop", choices=["center crop", "stretch"])
    ap.add_argument("--batch-size", type=int, default=8, help="images per VAE call")
    ap.add_argument("--shard-size", type=int, default=4096, help="latents per shard (the work an interruption loses)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                    help="stored dtype of the shards (float16: half the disk; searched exactly as stored)")
    ap.add_argument("--variants", default="none", help="versions of each image the index holds: 'none', 'shifts', "
                    "'shifts + zoom' or 'shifts + zoom + mirror' (1, 9, 18, 36 rows per image)")
    ap.add_argument("--overwrite", action="store_true", help="replace an index in --out built from other images")
    args = ap.parse_args(argv)
    if args.width % 8 or args.height % 8:
        raise SystemExit("--width and --height must be multiples of 8")
    from spell_core.variants import PRESETS

    if args.variants not in PRESETS:
        raise SystemExit(f"--variants {args.variants!r}: choose one of {list(PRESETS)}")

    from tools import comfy_host

    comfy_host.start(tempfile.mkdtemp(prefix="spell-build-index-"))
    spell_core = comfy_host.pack_module().spell_core
    vae = load_vae(args.vae)
    return spell_core.build.cli_build(lambda progress: spell_core.build.build_from_images(
        Path(args.images), Path(args.out), args.width, args.height, args.resize, vae.encode,
        spell_core.references.fingerprint_tensors(vae.get_sd()), batch=args.batch_size, shard_size=args.shard_size,
        backend=args.backend, overwrite=args.overwrite, progress=progress, dtype=args.dtype,
        variants_name=args.variants), args.out)


if __name__ == "__main__":
    sys.exit(main())
