"""SpellShieldCalibration: measures which shield radius r catches near-copies of the protected images and leaves
distinct images alone (``spell_core.calibration``). No sampling hook: the node encodes images with the connected
VAE and the model's latent format (``model.model.process_latent_in``, the space SpellRepellency's r lives in),
and returns the suggested r as a FLOAT for SpellRepellency's radius input, the report and a histogram."""
from __future__ import annotations

import comfy.model_management
import folder_paths
import numpy as np
import torch

from ..spell_core import StorageError
from ..spell_core.calibration import KINDS, calibrate_images
from ..spell_core.references import RESIZE_MODES, fit_batch, read_image
from ..spell_core.variants import PRESETS as VARIANT_PRESETS
from .common import SpellInputError
from .references import NONE, SIZE_INPUTS, folder_stamp, images_inside, input_folders
from .report import image_batch

MIN_COPIES = 20  # near-copies in all: fewer and the 95 % quantile is the largest distance
# Images of a folder calibrated at most (evenly spaced in name order): a few dozen give r to its first digits, and
# a folder may hold the millions an index is built from.
FOLDER_SAMPLE = 200


class SpellShieldCalibration:
    NODE_ID = "SpellShieldCalibration"
    DISPLAY_NAME = "SPELL Shield Calibration"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Finds the shield radius r for SPELL Sparse Repellency: makes near-copies of the protected images (crop and "
        "resize back, small shifts, a mirror image, JPEG re-compression, colour changes), encodes everything with "
        "the VAE into the model's latent space, and suggests the smallest r that holds 95% of the near-copies, with "
        "the share of distinct images (other protected images, or the images you connect) that r would also catch. "
        "Connect the images at the size you generate at, or choose their folder and set width and height; set "
        "variants as SPELL Protected Set Loader's is set (with 'shifts + zoom' a shifted or cropped copy is caught "
        "at a much smaller r); wire the radius output into SPELL "
        "Sparse Repellency's radius (converted to an input). It does not sample."
    )
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("histogram", "report", "radius")
    OUTPUT_TOOLTIPS = (
        "Histograms of the distances (near-copy to its source, distinct image to the nearest protected image) with "
        "the suggested r, 768x512; connect it to Preview Image.",
        "The report as text (also shown on the node): r, coverage, false positives, per-kind coverage.",
        "The suggested shield radius r (RMS, the model's latent space), for SPELL Sparse Repellency's radius.",
    )
    FUNCTION = "calibrate"
    OUTPUT_NODE = True
    SEARCH_ALIASES = ["SPELL", "shield", "radius", "calibration", "near-copy", "protected"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model you sample with: its latent format defines the space "
                                               "SPELL's radius is measured in."}),
                "vae": ("VAE", {"tooltip": "The VAE of that model."}),
                "copies_per_image": ("INT", {"default": 10, "min": 1, "max": 200, "tooltip":
                    "Near-copies made of each image, the kinds taken in turn; at least 20 near-copies in all. More "
                    "gives a steadier r and takes longer (one VAE encode each)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip":
                    "Seed of the near-copies' random crops, shifts, JPEG qualities and colour changes."}),
                "flip": ("BOOLEAN", {"default": True, "tooltip":
                    "Count mirror images as copies. Switch off for text, digits, logos and anything whose mirror "
                    "image is a different picture."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "The protected images (or a sample of them), at the size you "
                                                "generate at; at least 2 when no distinct images are connected. Or "
                                                "choose their folder below."}),
                "distinct_images": ("IMAGE", {"tooltip":
                    "Images that must NOT count as copies (other artwork, a held-out set), the same size as the "
                    "protected images. Not connected: each protected image against its nearest other one."}),
                "variants": (list(VARIANT_PRESETS), {"default": "none", "tooltip":
                    "The versions of each image the shield holds: choose what SPELL Protected Set Loader's variants "
                    "is set to. Near-copies are then measured to the nearest version of their source, distinct "
                    "images to the nearest version of any protected image."}),
                "folder": ([NONE, *input_folders()], {"default": NONE, "tooltip":
                    "The protected images' folder under ComfyUI's input directory, as SPELL Protected Set Loader's "
                    f"folder: its images (at most {FOLDER_SAMPLE}, evenly spaced by name) are calibrated, fitted to "
                    "width x height. Combined with the images input if both are given."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8, "tooltip":
                    "Generation width: the protected and distinct images are fitted to it first (as the loader "
                    "does). 0: the connected images as they are; a folder needs the size you generate at."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8, "tooltip":
                    "Generation height (0: the connected images' own)."}),
                "resize": SIZE_INPUTS["resize"],
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder=NONE, **kwargs):
        """Re-run when the chosen folder's images change (connected inputs are ComfyUI's own to track)."""
        return folder_stamp(folder)

    def calibrate(self, model, vae, images=None, copies_per_image=10, seed=0, flip=True, distinct_images=None,
                  variants="none", folder=NONE, width=0, height=0, resize="center crop"):
        images, distinct_images, source = self.protected(images, distinct_images, folder, width, height, resize)
        self.check(images, copies_per_image, distinct_images)
        if variants not in VARIANT_PRESETS:
            raise SpellInputError(self.NODE_ID, f"variants must be one of {list(VARIANT_PRESETS)}, got {variants!r}.")

        def encode(pixels):
            comfy.model_management.throw_exception_if_processing_interrupted()
            return model.model.process_latent_in(vae.encode(pixels).float())

        kinds = KINDS if flip else tuple(k for k in KINDS if k != "flip")
        result = calibrate_images(images, encode, copies_per_image, seed, kinds, distinct_images,
                                  variants_name=variants)
        text = result.text() + source
        return {"ui": {"text": [text]}, "result": (image_batch([result.chart()]), text, result.radius)}

    def protected(self, images, distinct_images, folder, width, height, resize):
        """(protected [N, H, W, 3], distinct or None, a line for the report naming the folder): the folder's images
        and the connected ones, fitted to width x height when it is set."""
        if (width == 0) != (height == 0):
            raise SpellInputError(self.NODE_ID, f"width {width} and height {height}: set both to the size you "
                                                f"generate at, or both to 0 for the connected images as they are.")
        if resize not in RESIZE_MODES:
            raise SpellInputError(self.NODE_ID, f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}.")
        sized = width > 0

        def fit(batch):
            return torch.from_numpy(fit_batch(batch.detach().float().cpu().numpy(), width, height, resize))

        parts, source = [], ""
        if folder != NONE:
            if not sized:
                raise SpellInputError(self.NODE_ID, f"folder {folder!r}: set width and height to the size you generate "
                                                    f"at (the images are fitted to it, as SPELL Protected Set Loader "
                                                    f"fits them).")
            try:
                files = images_inside(folder_paths.get_input_directory(), folder)
                if not files:
                    raise StorageError(f"folder {folder!r} under ComfyUI's input directory holds no images")
                pick = np.unique(np.linspace(0, len(files) - 1, min(len(files), FOLDER_SAMPLE)).round().astype(int))
                parts.append(torch.from_numpy(np.stack([read_image(files[k], width, height, resize) for k in pick])))
                source = (f"\nfrom folder {folder}: {len(pick)} of its {len(files)} images"
                          + (" (evenly spaced by name)" if len(pick) < len(files) else "")
                          + f", fitted to {width}x{height} ({resize})")
            except StorageError as e:
                raise SpellInputError(self.NODE_ID, f"{e}; choose another folder.") from e
        if images is not None:
            parts.append(fit(images) if sized else images)
        if not parts:
            raise SpellInputError(self.NODE_ID, "no protected images: connect images or choose their folder.")
        if distinct_images is not None and sized:
            distinct_images = fit(distinct_images)
        return torch.cat([p.float() for p in parts]), distinct_images, source

    def check(self, images, copies_per_image, distinct_images):
        n = images.shape[0]
        if distinct_images is None and n < 2:
            raise SpellInputError(self.NODE_ID, f"got {n} image; without distinct_images each protected image is "
                                                f"compared with its nearest other one: connect at least 2 images, or "
                                                f"connect distinct_images.")
        if n * copies_per_image < MIN_COPIES:
            raise SpellInputError(self.NODE_ID, f"{n} images x {copies_per_image} copies = {n * copies_per_image} "
                                                f"near-copies, too few to place a 95% quantile; raise copies_per_image "
                                                f"to at least {-(-MIN_COPIES // n)}.")
        if distinct_images is not None and tuple(distinct_images.shape[1:3]) != tuple(images.shape[1:3]):
            (h, w), (dh, dw) = images.shape[1:3], distinct_images.shape[1:3]
            raise SpellInputError(self.NODE_ID, f"distinct_images are {dw}x{dh} but the protected images {w}x{h}; "
                                                f"resize them to {w}x{h} (e.g. Upscale Image) so both encode to "
                                                f"latents of one shape.")


NODES = [SpellShieldCalibration]
