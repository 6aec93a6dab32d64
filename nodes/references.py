"""SpellProtectedSetLoader and SpellProtectedSetSave: protected sets (SPELL's static references).

A set is a ``spell_core.ReferenceSet`` (VAE-space latents); it travels between nodes as the custom type
SPELL_REFERENCES. Folders are read from ComfyUI's input directory, set files from ``models/spell_sets``,
encodings cached under ``user/spell/encodings`` keyed by image content, VAE and preprocessing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..spell_core import ReferenceSet, StorageError
from ..spell_core.build import build_from_images
from ..spell_core.index import BACKENDS, INDEX_FILE, ReferenceIndex
from ..spell_core.paths import contained, find_in
from ..spell_core.references import RESIZE_MODES, EncodingCache, encode_folder, fingerprint_tensors, fit_batch, list_images
from ..spell_core.storage import inside
from ..spell_core.variants import PRESETS as VARIANT_PRESETS, describe, make, preset
from .common import SpellInputError, user_folder

SETS = "spell_sets"
VARIANTS_TOOLTIP = (
    "Versions of each image (folder and images) the shield holds: shifted by 3% of the side each way, also zoomed "
    "5%, also mirrored (9, 18, 36 references per image). A copy that is shifted or cropped a little lies far from "
    "its source in latent space but close to the version moved the same way, so a small radius catches it. Use the "
    "same choice in SPELL Shield Calibration when you measure r. Set files and latents are used as they are.")
NONE = "(none)"
SHARD_ROWS = 4096  # latents per shard of an index folder: the work a cancelled build can lose
if SETS not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[SETS] = ([os.path.join(folder_paths.models_dir, SETS)], {".safetensors"})


# How images are fitted before encoding (the loader and the index builder)
SIZE_INPUTS = {
    "width": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip":
        "Generation width: images are fitted to it before encoding (must match the sampler's latent)."}),
    "height": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip": "Generation height."}),
    "resize": (list(RESIZE_MODES), {"tooltip": "center crop: crop the centred window of the target aspect ratio, "
                                               "then resize (Lanczos). stretch: resize only."}),
}


class ContainedCache(EncodingCache):
    """The encoding cache with every entry's path under the containment rule: an entry of user/spell/encodings
    that is a symbolic link leading out of it is refused, never read or written through."""

    def entry(self, key: str) -> Path:
        return contained(self.folder, f"{key}.safetensors", "encoding cache entry",
                         f"remove that link from {self.folder}")

    def get(self, key: str):
        self.entry(key)
        return super().get(key)

    def put(self, key: str, latent) -> None:
        self.entry(key)
        super().put(key, latent)


def images_inside(base, folder: str) -> list[Path]:
    """The images of base/folder, each refused unless its real path is inside base (ComfyUI's input directory)."""
    return [inside(base, f"{folder}/{p.name}") for p in list_images(inside(base, folder))]


def input_folders() -> list[str]:
    """Sub-folders of ComfyUI's input directory that hold images (one level deep)."""
    base = Path(folder_paths.get_input_directory())
    return sorted(p.name for p in base.iterdir() if p.is_dir() and list_images(p)) if base.is_dir() else []


def set_files() -> list[str]:
    """Set files and index folders ("<name>/") in models/spell_sets."""
    names = list(folder_paths.get_filename_list(SETS))
    for base in folder_paths.get_folder_paths(SETS):
        if os.path.isdir(base):
            names += [f"{d}/" for d in sorted(os.listdir(base)) if os.path.isfile(os.path.join(base, d, "index.safetensors"))]
    return names


def folder_stamp(folder: str) -> str:
    """Names, sizes and modification times of the images of an input folder, hashed."""
    h = hashlib.sha256()
    if folder != NONE:
        base = Path(folder_paths.get_input_directory(), folder)
        for p in list_images(base) if base.is_dir() else []:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


class SpellProtectedSetLoader:
    NODE_ID = "SpellProtectedSetLoader"
    DISPLAY_NAME = "SPELL Protected Set Loader"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Builds a protected set: reference latents that SPELL Sparse Repellency keeps outputs away from. Sources "
        "(all that are given are combined): a folder of images under ComfyUI's input folder, a saved set file "
        "(models/spell_sets), an IMAGE batch, a LATENT. Images are fitted to width x height and encoded with the "
        "connected VAE; encodings are cached, so a re-run does not encode again. variants: the shield also holds "
        "shifted, zoomed and mirrored versions of each image, so shifted or cropped copies are caught at a small radius."
    )
    RETURN_TYPES = ("SPELL_REFERENCES", "STRING")
    RETURN_NAMES = ("references", "summary")
    OUTPUT_TOOLTIPS = ("The protected set, for SPELL Sparse Repellency.",
                       "How many references, their latent shape and sources (also shown on the node).")
    FUNCTION = "load_and_show"
    SEARCH_ALIASES = ["SPELL", "protected", "shield", "references"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ([NONE] + input_folders(), {"tooltip": "A folder under ComfyUI's input directory whose "
                                                              "images are protected (PNG, JPEG, WebP, BMP)."}),
                "set_file": ([NONE] + set_files(), {"tooltip":
                    "A set saved with SPELL Protected Set Save (models/spell_sets/*.safetensors), or an index folder "
                    "there (models/spell_sets/<name>/, built by SPELL Protected Set Index Builder or "
                    "`python -m spell_core.index build`) for large sets."}),
                **SIZE_INPUTS,
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "The VAE of the model you sample with; needed for folders and images."}),
                "images": ("IMAGE", {"tooltip": "Images to protect (encoded with the VAE)."}),
                "latent": ("LATENT", {"tooltip": "Latents to protect, as they are."}),
                "variants": (list(VARIANT_PRESETS), {"default": "none", "tooltip": VARIANTS_TOOLTIP}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder, set_file, **kwargs):
        """Re-run when the folder's files or the set file change."""
        h = hashlib.sha256(folder_stamp(folder).encode())
        if set_file != NONE:
            for b in folder_paths.get_folder_paths(SETS):
                path = os.path.join(b, set_file, "index.safetensors") if set_file.endswith("/") else os.path.join(b, set_file)
                if os.path.exists(path):
                    h.update(f"{set_file}:{os.stat(path).st_mtime_ns}".encode())
        return h.hexdigest()

    def load(self, folder, set_file, width, height, resize, vae=None, images=None, latent=None, variants="none"):
        if variants not in VARIANT_PRESETS:
            raise SpellInputError(self.NODE_ID, f"variants must be one of {list(VARIANT_PRESETS)}, got {variants!r}.")
        if width % 8 or height % 8:
            raise SpellInputError(self.NODE_ID, f"width and height must be multiples of 8, got {width} x {height}.")
        parts = []
        try:
            if folder != NONE:
                parts.append(self.from_folder(folder, width, height, resize, vae, variants))
            if set_file != NONE:
                parts.append(self.from_file(set_file))
            if images is not None:
                parts.append(self.from_images(images, width, height, resize, vae, variants))
            if latent is not None:
                parts.append(ReferenceSet(latent["samples"].detach().float().cpu(), {"sources": ["LATENT input"]}))
        except StorageError as e:
            raise SpellInputError(self.NODE_ID, str(e)) from e
        if not parts:
            raise SpellInputError(self.NODE_ID, "no source given: choose a folder or a set file, or connect images or a latent.")
        refs = parts[0]
        for p in parts[1:]:
            if p.item_shape != refs.item_shape:
                raise SpellInputError(self.NODE_ID, f"sources give latents of different shapes {refs.item_shape} and "
                                                    f"{p.item_shape}; use the same VAE and size for all of them.")
            refs = refs.merged(p)
        summary = f"{len(refs)} references, latent shape {refs.item_shape}, from: " + "; ".join(refs.meta.get("sources", []))
        return (refs, summary)

    def load_and_show(self, folder, set_file, width, height, resize, vae=None, images=None, latent=None,
                      variants="none"):
        """What ComfyUI calls: ``load``, with the summary also shown on the node."""
        refs, summary = self.load(folder, set_file, width, height, resize, vae=vae, images=images, latent=latent,
                                  variants=variants)
        return {"ui": {"text": [summary]}, "result": (refs, summary)}

    def need_vae(self, vae, what):
        if vae is None:
            raise SpellInputError(self.NODE_ID, f"{what} must be encoded: connect the VAE of the model you sample with.")

    def from_folder(self, folder, width, height, resize, vae, variants="none"):
        self.need_vae(vae, f"the images of folder {folder!r}")
        path = inside(folder_paths.get_input_directory(), folder)
        if not path.is_dir():
            raise StorageError(f"folder {folder!r} does not exist under ComfyUI's input directory")
        images_inside(folder_paths.get_input_directory(), folder)  # an image linked out of input/: refused
        bar = comfy.utils.ProgressBar(max(len(list_images(path)), 1))
        latents, _ = encode_folder(path, width, height, resize, fingerprint_tensors(vae.get_sd()), vae.encode,
                                   ContainedCache(user_folder("encodings")), lambda done, total: bar.update_absolute(done, total),
                                   variants)
        n = len(latents) // preset(variants).count
        return ReferenceSet(latents, {"sources": [f"folder {folder} ({n} images, {width}x{height}, {resize}"
                                                  + self.versions(variants, len(latents)) + ")"]})

    @staticmethod
    def versions(variants, n_latents):
        return "" if preset(variants).count == 1 else f"; {describe(variants)}: {n_latents} references"

    def from_file(self, set_file):
        fix = f"remove that link: set files and index folders must lie in models/{SETS} itself"
        path = find_in(folder_paths.get_folder_paths(SETS), set_file.rstrip("/"), "set file", fix)
        if path is None or not (path.is_dir() if set_file.endswith("/") else path.is_file()):
            raise StorageError(f"set file {set_file!r} not found in models/{SETS}")
        if path.is_dir():  # an index folder: every shard its index lists must lie in that folder
            index = ReferenceIndex.load(path, within=path)
            if len(index) == 0:
                raise StorageError(f"{path} holds an empty index")
            refs = ReferenceSet(None, {}, index)
        else:
            refs = ReferenceSet.load(path)
        engine = getattr(refs.index, "engine", None) if set_file.endswith("/") else None
        # an index folder's files read into the page cache in the background: the first run does not wait on disk
        warm = refs.index.warm(also=[path / INDEX_FILE]) if set_file.endswith("/") else None
        refs.meta["sources"] = [f"file {set_file} ({len(refs)}" + (f", searched through the {engine.describe()}"
                                                                  if engine is not None else "")
                                + (f"; {warm.summary()}" if warm is not None else "") + ")"]
        return refs

    def from_images(self, images, width, height, resize, vae, variants="none"):
        self.need_vae(vae, "the connected images")
        pixels = torch.from_numpy(fit_batch(images.detach().cpu().numpy(), width, height, resize))
        spec = preset(variants)
        latents = torch.cat([vae.encode(make(pixels[i:i + 1], spec)).detach().float().cpu() for i in range(len(pixels))])
        return ReferenceSet(latents, {"sources": [f"IMAGE input ({len(pixels)}, {width}x{height}, {resize}"
                                                  + self.versions(variants, len(latents)) + ")"]})


class SpellProtectedSetSave:
    NODE_ID = "SpellProtectedSetSave"
    DISPLAY_NAME = "SPELL Protected Set Save"
    CATEGORY = "SPELL"
    DESCRIPTION = "Saves a protected set to models/spell_sets/<name>.safetensors for SPELL Protected Set Loader."
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "references": ("SPELL_REFERENCES", {"tooltip": "The set to save."}),
            "name": ("STRING", {"default": "protected", "tooltip": "File name (without extension) under models/spell_sets."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name (off: refuse)."}),
        }}

    def save(self, references, name, overwrite):
        base = folder_paths.get_folder_paths(SETS)[0]
        try:
            path = inside(base, f"{name}.safetensors")
        except StorageError as e:
            raise SpellInputError(self.NODE_ID, f"{e}; give a plain file name.") from e
        if path.exists() and not overwrite:
            raise SpellInputError(self.NODE_ID, f"{path.name} already exists; choose another name or switch overwrite on.")
        references.save(path)
        return {"ui": {"text": [f"saved {len(references)} references to models/{SETS}/{path.name}"]}}


class SpellProtectedSetIndexBuilder:
    NODE_ID = "SpellProtectedSetIndexBuilder"
    DISPLAY_NAME = "SPELL Protected Set Index Builder"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Builds an exact search index over a large folder of images (thousands to millions) for SPELL: the images "
        "are encoded with the VAE a batch at a time and written to models/spell_sets/<name>/ in shards, so memory "
        "does not grow with the set. If it is stopped (Cancel, a crash), queue it again: it resumes where it "
        "stopped. Once built, the same inputs open the index at once, and SPELL Protected Set Loader lists it as "
        "'<name>/'. variants: the index also holds shifted, zoomed and mirrored versions of each image."
    )
    RETURN_TYPES = ("SPELL_REFERENCES", "STRING")
    RETURN_NAMES = ("references", "summary")
    FUNCTION = "build"
    OUTPUT_NODE = True
    SEARCH_ALIASES = ["SPELL", "protected", "shield", "index", "million"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": (input_folders() or [NONE], {"tooltip": "A folder under ComfyUI's input directory whose "
                                                             "images are protected (PNG, JPEG, WebP, BMP)."}),
            "vae": ("VAE", {"tooltip": "The VAE of the model you sample with."}),
            "name": ("STRING", {"default": "protected_index", "tooltip":
                "Index folder name under models/spell_sets (shown by the loader as '<name>/')."}),
            **SIZE_INPUTS,
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip":
                "Images encoded per VAE call (more is faster on a GPU, uses more memory)."}),
            "backend": (list(BACKENDS), {"tooltip": "Search backend; auto picks the fastest exact one for the set's "
                                                    "size. Every backend is exact."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                "Replace an index of that name built from other images or settings (off: refuse)."}),
        }, "optional": {
            "variants": (list(VARIANT_PRESETS), {"default": "none", "tooltip":
                "Versions of each image the index holds: shifted by 3% of the side each way, also zoomed 5%, also "
                "mirrored (9, 18, 36 rows per image, and that many times the encoding time and disk). Shifted or "
                "cropped copies are then caught at a small radius; measure it with SPELL Shield Calibration set "
                "the same way. Another choice is another index: rebuild with overwrite, or use another name."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, name, **kwargs):
        """Re-run when the images change or the index folder was changed or removed outside this node."""
        index = Path(folder_paths.get_folder_paths(SETS)[0], name.strip(), "index.safetensors")
        plain = name.strip() not in ("", ".", "..") and not any(c in name for c in "/\\")
        stamp = index.stat().st_mtime_ns if plain and index.is_file() else None
        return f"{folder_stamp(folder)}:{stamp}"

    def build(self, folder, vae, name, width, height, resize, batch_size, backend, overwrite, variants="none"):
        if variants not in VARIANT_PRESETS:
            raise SpellInputError(self.NODE_ID, f"variants must be one of {list(VARIANT_PRESETS)}, got {variants!r}.")
        if width % 8 or height % 8:
            raise SpellInputError(self.NODE_ID, f"width and height must be multiples of 8, got {width} x {height}.")
        try:
            base = Path(folder_paths.get_folder_paths(SETS)[0])
            base.mkdir(parents=True, exist_ok=True)
            if not name.strip() or any(c in name for c in "/\\") or name.strip() in (".", ".."):
                raise StorageError(f"name {name!r} must be a plain folder name (no path)")
            out = inside(base, name.strip())
            src = inside(folder_paths.get_input_directory(), folder)
            if folder == NONE or not src.is_dir():
                raise StorageError(f"folder {folder!r} does not exist under ComfyUI's input directory")
            images_inside(folder_paths.get_input_directory(), folder)  # an image linked out of input/: refused
            bar = comfy.utils.ProgressBar(2)

            def progress(stage, done, total):
                comfy.model_management.throw_exception_if_processing_interrupted()
                bar.update_absolute(done + (total if stage == "index" else 0), 2 * max(total, 1))

            index, what = build_from_images(src, out, width, height, resize, vae.encode,
                                            fingerprint_tensors(vae.get_sd()), batch=batch_size, shard_size=SHARD_ROWS,
                                            backend=backend, variants_name=variants,
                                            overwrite=overwrite, progress=progress)
        except StorageError as e:
            raise SpellInputError(self.NODE_ID, f"{e}.") from e
        warm = index.warm(also=[out / INDEX_FILE])  # an index opened as is (after a restart): read ahead too
        refs = ReferenceSet(None, {"sources": [f"index {out.name}/ ({len(index)})"]}, index)
        versions = "" if preset(variants).count == 1 else f" ({describe(variants)})"
        summary = (f"{what}: {len(index)} references from folder {folder}{versions}, latent shape {tuple(index.item_shape)}, "
                   f"backend {index.backend}, in models/{SETS}/{out.name}/" + (f"; {warm.summary()}" if warm else ""))
        return {"ui": {"text": [summary]}, "result": (refs, summary)}


NODES = [SpellProtectedSetLoader, SpellProtectedSetSave, SpellProtectedSetIndexBuilder]
