"""Fair generation nodes: attribute heads on U-Net h-space, distribution guidance, running counts, a report.

Hooks (all on clones; the input MODEL is never changed):
- h-space patch (``comfy/ldm/modules/diffusionmodules/openaimodel.py: UNetModel.forward``, ``patch_h_space``):
  the middle block's output ``h``, through ``middle_block_after_patch`` where ComfyUI has it (0.20+), else an
  output block patch acting only when ``transformer_options["block"] == ("output", 0)``. Reads
  ``transformer_options["cond_or_uncond"]`` (which chunk is the conditional one) and ``["sigmas"]``. The trainer
  uses it to capture h; the guidance uses it to replace h by h − η ∇_h L on the conditional chunks.
- SAMPLER_SAMPLE wrapper (``comfy/samplers.py: CFGGuider.inner_sample``): starts one ``spell_core.fairness.FairRun``
  per sampling run in the run's own ``model_options["transformer_options"]``, and after a complete run measures
  the final latents with the heads (one conditional model call at σ_min, through ``comfy.samplers.calc_cond_batch``)
  and adds the predicted classes to the running count.

Maths lives in ``spell_core/fairness.py`` (Parihar et al., CVPR 2024; Shen et al., ICLR 2024).
"""
from __future__ import annotations

import math
import os
import re
import uuid
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import folder_paths
import torch

from ..spell_core import charts
from ..spell_core.fairness import (DIVERGENCES, LOSSES, AttributeHeads, FairConfig, FairRun, bias, bucket_sigmas,
                                   open_count, parse_target, pool_features, train_heads)
from ..spell_core.references import list_images, read_image
from ..spell_core.run import RunHistory
from ..spell_core.paths import PathRefused, contained, find_in
from ..spell_core.storage import StorageError, inside
from .common import SpellInputError, check_numbers, stored_state, user_folder
from .report import image_batch

HEADS = "spell_heads"
NONE = "(none)"
HISTORY_KEY = "spell_fairness_history"
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
if HEADS not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[HEADS] = ([os.path.join(folder_paths.models_dir, HEADS)], {".safetensors"})


def check_unet(node_id, model):
    """Refuses models without a U-Net middle block (DiT: SD3, Flux), whose h-space this guidance cannot reach."""
    net = getattr(model.model, "diffusion_model", None)
    if getattr(net, "middle_block", None) is None or not hasattr(net, "output_blocks"):
        raise SpellInputError(node_id, f"this model ({type(net).__name__}) has no U-Net middle block: fair guidance "
                                       f"works on SD1.x/SDXL-style U-Nets only, not on DiT models (SD3, Flux).")


def check_name(node_id, name, what):
    if not NAME_RULE.match(name) or ".." in name:
        raise SpellInputError(node_id, f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '-', '.'.")


def class_folders(base) -> list[str]:
    """Sub-folders of ComfyUI's input directory that hold class sub-folders of images."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(
        q.is_dir() and list_images(q) for q in p.iterdir()))


def patch_h_space(model, on_h, hook=None):
    """Has ``on_h(h, transformer_options) -> h`` called on the U-Net middle block's output of every model call.

    Through ``set_model_middle_block_after_patch`` where ComfyUI has it (0.20+; called once per call, after the
    middle block's ControlNet residual), else through an output block patch acting at ("output", 0) only, which
    sees the same h. ``hook`` forces one ("middle_block_after" or "output_block"), for tests."""
    hook = hook or ("middle_block_after" if hasattr(model, "set_model_middle_block_after_patch") else "output_block")
    if hook == "middle_block_after":
        def middle_block_after(args):
            return {**args, "h": on_h(args["h"], args["transformer_options"])}
        model.set_model_middle_block_after_patch(middle_block_after)
        return

    def output_block(h, hsp, transformer_options):
        if transformer_options.get("block") != ("output", 0):
            return h, hsp
        return on_h(h, transformer_options), hsp
    model.set_model_output_block_patch(output_block)


def cond_chunks(h, transformer_options):
    """[(index, chunk)] of h's conditional chunks, and the list of all chunks."""
    order = transformer_options.get("cond_or_uncond") or [0]
    chunks = list(h.chunk(len(order)))
    return [(i, c) for i, (c, kind) in enumerate(zip(chunks, order)) if kind == 0], chunks


class FeatureSampler(comfy.samplers.Sampler):
    """A 'sampler' that only runs the model on given noised latents so the capture patch sees their h.
    jobs: [(x0 [b, ...] model space, sigma [b], noise [b, ...])]; step(done) after each job."""

    def __init__(self, jobs, step):
        self.jobs, self.step = jobs, step

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling
        for n, (x0, sigma, eps) in enumerate(self.jobs):
            comfy.model_management.throw_exception_if_processing_interrupted()
            dev = noise.device
            x = sampling.noise_scaling(sigma.to(dev), eps.to(dev), x0.to(dev))
            model_wrap(x, sigma.to(dev), model_options=extra_args["model_options"], seed=extra_args.get("seed"))
            self.step(n + 1)
        return latent_image


def capture_features(model, positive, latents, sigmas_per_level, grid, seed, progress):
    """Pooled h [S, N, F] of model-space latents [N, ...] noised at each level's σ [S, N] (conditional only)."""
    captured, channels = [], set()

    def keep(h, transformer_options):
        for _, c in cond_chunks(h, transformer_options)[0]:
            channels.add(c.shape[1])
            captured.append(pool_features(c.detach().float(), grid).cpu().clone())
        return h

    m = model.clone()
    patch_h_space(m, keep)
    g = torch.Generator().manual_seed(seed)
    chunk = 64
    jobs = []
    for sig in sigmas_per_level:
        for i in range(0, latents.shape[0], chunk):
            x0 = latents[i:i + chunk]
            jobs.append((x0, sig[i:i + chunk].float(), torch.randn(x0.shape, generator=g)))
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    sampler = FeatureSampler(jobs, progress)
    empty = torch.zeros((min(chunk, latents.shape[0]),) + tuple(latents.shape[1:]))
    guider.sample(empty, empty, sampler, torch.tensor([float(sigmas_per_level.max()), 0.0]), seed=seed)
    feats = torch.cat(captured)
    return feats.view(len(sigmas_per_level), latents.shape[0], -1), channels.pop()


def ordered_classes(names) -> list[str]:
    """The distinct class names, numbers in numeric order first, then the rest alphabetically."""
    return sorted(set(names), key=lambda c: (len(c), c) if c.isdigit() else (math.inf, c))


def labelled_examples(node_id, folder, width, height, images, labels):
    """(pixels [N, H, W, 3], class names [N]) of labelled examples: a folder under ComfyUI's input directory with one
    sub-folder of images per class, and/or an IMAGE batch with one class name per image (the trainers' convention)."""
    pixels, names = [], []
    if folder != NONE:
        try:
            base = inside(folder_paths.get_input_directory(), folder)
        except StorageError as e:
            raise SpellInputError(node_id, str(e)) from e
        if not base.is_dir():
            raise SpellInputError(node_id, f"folder {folder!r} does not exist under ComfyUI's input directory.")
        for sub in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in list_images(sub):
                try:
                    f = inside(folder_paths.get_input_directory(), f"{folder}/{sub.name}/{f.name}")  # linked out: refused
                    pixels.append(torch.from_numpy(read_image(f, width, height, "center crop")))
                except StorageError as e:
                    raise SpellInputError(node_id, f"{sub.name}/{e}") from e
                names.append(sub.name)
    if images is not None:
        given = [t.strip() for t in re.split(r"[,\n]", labels or "") if t.strip()]
        if len(given) != images.shape[0]:
            raise SpellInputError(node_id, f"{images.shape[0]} images but {len(given)} labels; give one class "
                                                f"name per image, separated by commas.")
        if images.shape[1:3] != (height, width):
            raise SpellInputError(node_id, f"the images are {images.shape[2]}x{images.shape[1]}, the "
                                                f"generation size is {width}x{height}; resize them first.")
        pixels += list(images.detach().float().cpu())
        names += given
    elif labels:
        raise SpellInputError(node_id, "labels are connected but no images; connect the IMAGE batch too.")
    if not pixels:
        raise SpellInputError(node_id, "no examples: choose a folder of class sub-folders or connect images "
                                            "and labels.")
    return torch.stack(pixels), names


class SpellAttributeHeadTrainer:
    NODE_ID = "SpellAttributeHeadTrainer"
    DISPLAY_NAME = "SPELL Attribute Head Trainer"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = (
        "Trains attribute heads for SPELL Distribution Guidance: small linear classifiers (one per noise level) on "
        "the U-Net's middle-block features h of labelled examples, noised at the model's own noise levels. Examples: "
        "a folder under ComfyUI's input folder with one sub-folder per class, and/or an IMAGE batch with labels. "
        "Saves models/spell_heads/<name>.safetensors and reports held-out accuracy per noise level."
    )
    RETURN_TYPES = ("SPELL_ATTRIBUTE_HEADS", "STRING")
    RETURN_NAMES = ("heads", "report")
    OUTPUT_TOOLTIPS = ("The trained heads, for SPELL Distribution Guidance and SPELL Fairness Report.",
                       "Classes, example counts and held-out accuracy per noise level.")
    FUNCTION = "train"
    OUTPUT_NODE = True
    SEARCH_ALIASES = ["SPELL", "fairness", "attribute classifier", "h-space"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The U-Net model you will guide (SD1.x/SDXL-style; not DiT)."}),
                "vae": ("VAE", {"tooltip": "That model's VAE, to encode the examples."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt you will generate with; h is read under it."}),
                "folder": ([NONE] + class_folders(folder_paths.get_input_directory()), {"tooltip":
                    "A folder under ComfyUI's input directory holding one sub-folder of images per class (the "
                    "sub-folder's name is the class name)."}),
                "name": ("STRING", {"default": "attribute", "tooltip":
                    "File name of the heads: models/spell_heads/<name>.safetensors."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip":
                    "Generation width: folder images are centre-cropped and resized to it."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip": "Generation height."}),
                "noise_levels": ("INT", {"default": 8, "min": 1, "max": 50, "tooltip":
                    "How many heads, one per equal share of the schedule; guidance interpolates between them."}),
                "pool_grid": ("INT", {"default": 4, "min": 1, "max": 16, "tooltip":
                    "h is average-pooled to a grid x grid map before the head (1 = global mean; larger keeps layout "
                    "but needs more examples)."}),
                "held_out": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.5, "step": 0.05, "tooltip":
                    "Share of each class held out to measure accuracy (0 = no report)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Noise draws and split."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing heads file of this name."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Labelled examples (fitted to width x height)."}),
                "labels": ("STRING", {"forceInput": True, "tooltip":
                    "One class name per image of the batch, separated by commas or new lines."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder, **kwargs):
        base = Path(folder_paths.get_input_directory(), folder)
        stamp = [(str(p), p.stat().st_mtime_ns) for p in sorted(base.rglob("*"))] if folder != NONE and base.is_dir() else []
        return str(stamp)

    def train(self, model, vae, positive, folder, name, width, height, noise_levels, pool_grid, held_out, seed,
              overwrite, images=None, labels=None):
        check_unet(self.NODE_ID, model)
        check_numbers(self.NODE_ID, held_out=held_out)
        check_name(self.NODE_ID, name, "name")
        try:
            path = contained(folder_paths.get_folder_paths(HEADS)[0], f"{name}.safetensors", "heads file",
                             "remove that link or choose another name")
        except PathRefused as e:
            raise SpellInputError(self.NODE_ID, f"{e}.") from e
        if path.exists() and not overwrite:
            raise SpellInputError(self.NODE_ID, f"{path.name} already exists; switch overwrite on or choose another name.")
        pixels, names = labelled_examples(self.NODE_ID, folder, width, height, images, labels)
        classes = ordered_classes(names)
        if len(classes) < 2:
            raise SpellInputError(self.NODE_ID, f"need examples of at least 2 classes, got {classes}.")
        y = torch.tensor([classes.index(n) for n in names])
        latents = torch.cat([vae.encode(pixels[i:i + 32]).detach().float().cpu() for i in range(0, len(pixels), 32)])
        latents = model.model.process_latent_in(latents)
        sampling = model.get_model_object("model_sampling")
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(noise_levels, len(y), generator=g) * 0.96 + 0.02
        per_item = torch.tensor([[float(sampling.percent_to_sigma(float((s + u[s, i]) / noise_levels)))
                                  for i in range(len(y))] for s in range(noise_levels)])
        jobs = noise_levels * math.ceil(len(y) / 64)
        bar = comfy.utils.ProgressBar(jobs + noise_levels)
        feats, channels = capture_features(model, positive, latents, per_item, pool_grid, seed, lambda d: bar.update_absolute(d))
        comfy.model_management.throw_exception_if_processing_interrupted()
        heads = train_heads(feats, y, bucket_sigmas(sampling.percent_to_sigma, noise_levels), classes, pool_grid,
                            channels,
                            held_out=held_out, seed=seed, progress=lambda d, t: bar.update_absolute(jobs + d))
        heads.save(path)
        report = f"saved models/{HEADS}/{path.name}; {len(y)} examples\n" + heads.describe()
        return {"ui": {"text": [report]}, "result": (heads, report)}


class SpellAttributeHeadLoader:
    NODE_ID = "SpellAttributeHeadLoader"
    DISPLAY_NAME = "SPELL Attribute Head Loader"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = "Loads attribute heads saved by SPELL Attribute Head Trainer (models/spell_heads)."
    RETURN_TYPES = ("SPELL_ATTRIBUTE_HEADS", "STRING")
    RETURN_NAMES = ("heads", "summary")
    OUTPUT_TOOLTIPS = ("The heads.", "Classes, noise levels and held-out accuracy (also shown on the node).")
    FUNCTION = "load_and_show"
    SEARCH_ALIASES = ["SPELL", "fairness", "attribute heads"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"heads_file": (folder_paths.get_filename_list(HEADS) or [NONE], {"tooltip":
            "A heads file in models/spell_heads."})}}

    @classmethod
    def IS_CHANGED(cls, heads_file):
        try:
            path = heads_path(heads_file)
        except PathRefused:
            return heads_file  # the node itself runs and reports it
        return os.stat(path).st_mtime_ns if path and os.path.exists(path) else heads_file

    def load(self, heads_file):
        try:
            path = heads_path(heads_file)
        except PathRefused as e:
            raise SpellInputError(self.NODE_ID, f"{e}.") from e
        if path is None or not path.is_file():
            raise SpellInputError(self.NODE_ID, f"heads file {heads_file!r} not found in models/{HEADS}; train one "
                                                f"with SPELL Attribute Head Trainer.")
        try:
            heads = AttributeHeads.load(path)
        except ValueError as e:
            raise SpellInputError(self.NODE_ID, str(e)) from e
        return (heads, heads.describe())

    def load_and_show(self, heads_file):
        """What ComfyUI calls: ``load``, with the summary also shown on the node."""
        heads, summary = self.load(heads_file)
        return {"ui": {"text": [summary]}, "result": (heads, summary)}


def heads_path(heads_file) -> Path | None:
    """The real path of a heads file in ComfyUI's spell_heads folders; PathRefused when it leads out of its folder."""
    return find_in(folder_paths.get_folder_paths(HEADS), heads_file, "heads file",
                   f"remove that link: heads files must lie in models/{HEADS} itself")


def count_path(node_id, name) -> Path:
    check_name(node_id, name, "count name")
    try:  # a count file that is a symlink leading out of user/spell/fairness is refused (read, update and reset)
        return contained(user_folder("fairness"), f"{name}.json", "count file",
                         "remove that link or choose another count name")
    except PathRefused as e:
        raise SpellInputError(node_id, f"{e}.") from e


class SpellFairnessCount:
    NODE_ID = "SpellFairnessCount"
    DISPLAY_NAME = "SPELL Fairness Running Count"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = (
        "A named running count of the attribute classes of earlier outputs (user/spell/fairness/<name>.json). "
        "Connected to SPELL Distribution Guidance, each batch is steered toward what brings the cumulative "
        "distribution closest to the target, so the target holds over many small batches."
    )
    RETURN_TYPES = ("SPELL_FAIRNESS_COUNT",)
    RETURN_NAMES = ("count",)
    OUTPUT_TOOLTIPS = ("The count, read and updated by SPELL Distribution Guidance at sampling time.",)
    FUNCTION = "open"
    SEARCH_ALIASES = ["SPELL", "fairness", "running count", "memory"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "name": ("STRING", {"default": "default", "tooltip": "Which count: one file per name. Use one per "
                                                                 "project and target."}),
            "reset": ("BOOLEAN", {"default": False, "tooltip": "Empty the count every time the workflow runs "
                                                               "(switch it off again to accumulate)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, name, reset):
        """reset: an action, run on every queue (a fresh NaN: ComfyUI's signature compares the shared math.nan
        equal to itself). Else the count file's state: after a run added to it, this node and everything
        downstream (guidance, sampler) run again instead of being served from ComfyUI's output cache."""
        if reset:
            return float("nan")
        try:
            return stored_state(count_path(cls.NODE_ID, name))
        except SpellInputError:
            return name  # a bad name: the node itself runs and reports it

    def open(self, name, reset):
        count = open_count(count_path(self.NODE_ID, name))
        if reset:
            count.reset()
        return (count,)


class SpellDistributionGuidance:
    NODE_ID = "SpellDistributionGuidance"
    DISPLAY_NAME = "SPELL Distribution Guidance"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = (
        "Steers a batch toward a target distribution of an attribute (e.g. 'young: 0.75, old: 0.25') by nudging the "
        "U-Net's middle-block features h along the gradient of a distribution loss on attribute heads; the U-Net "
        "itself is never differentiated. Works on SD1.x/SDXL-style U-Nets. Place it anywhere in the MODEL chain "
        "before the sampler; it chains with other output-block patches and SPELL Sparse Repellency."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with distribution guidance applied when it samples.",)
    FUNCTION = "patch"
    SEARCH_ALIASES = ["SPELL", "fairness", "distribution guidance", "debias", "balance"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (the one the heads were trained on)."}),
                "heads": ("SPELL_ATTRIBUTE_HEADS", {"tooltip": "Attribute heads from the trainer or loader."}),
                "target": ("STRING", {"default": "", "multiline": False, "tooltip":
                    "Target shares per class, e.g. 'young: 0.75, old: 0.25' (or 75%). Shares ≥ 0 summing to 1; "
                    "classes left out get 0."}),
                "strength": ("FLOAT", {"default": 100.0, "min": 0.0, "max": 10000.0, "step": 1.0, "tooltip":
                    "η: how far h moves per model call, in logits of the heads per unit of loss gradient. 0 = off. "
                    "Tune this first: raise it until the report's distribution follows the target, lower it if "
                    "images degrade. Demo model: 100 for the per-image losses; the batch mean needs ~10x more."}),
                "loss": (list(LOSSES), {"default": "per-image assignment", "tooltip":
                    "batch mean: Distribution Guidance (Parihar et al. 2024), matches the mean prediction of the "
                    "batch (needs large batches). per-image assignment: Shen et al. 2024, gives the batch whole seats "
                    "per class nearest the target (leftover seats by the seed) and each image the seat nearest its "
                    "current class, so the batch matches exactly. per-image draw: classifier guidance to a class drawn at "
                    "random per image (the baseline)."}),
                "temperature": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip":
                    "T of the batch-mean loss's softmax (paper: 8)."}),
                "divergence": (list(DIVERGENCES), {"default": "chi-square", "tooltip":
                    "Batch mean: chi-square (face model in the paper) or KL (its SD version)."}),
            },
            "optional": {
                "count": ("SPELL_FAIRNESS_COUNT", {"tooltip": "A running count: steer each batch so the cumulative "
                                                              "distribution approaches the target."}),
            },
        }

    def patch(self, model, heads, target, strength, loss, temperature, divergence, count=None):
        check_numbers(self.NODE_ID, strength=strength, temperature=temperature)
        check_unet(self.NODE_ID, model)
        try:
            p = parse_target(target, heads.classes)
            config = FairConfig(loss, strength, temperature, divergence)
            if count is not None:
                count.counts(heads.classes)
        except ValueError as e:
            raise SpellInputError(self.NODE_ID, str(e)) from e
        key = f"spell_fair_{uuid.uuid4().hex[:8]}"
        history = RunHistory()
        patched = model.clone()

        def fair_sampler_sample(executor, *args, **kwargs):
            """Starts a FairRun; after a complete run measures the outputs and updates the count."""
            guider, sigmas, extra_args, noise = args[0], args[1], args[2], args[4]
            complete = float(sigmas[-1]) == 0  # read first: some samplers overwrite sigmas in place
            counts = count.counts(heads.classes) if count is not None else None
            run = FairRun(heads, p, config, noise.shape[0], counts, seed=extra_args.get("seed") or 0)
            options = extra_args["model_options"]
            options.setdefault("transformer_options", {})[key] = run
            out = executor(*args, **kwargs)
            if complete:
                measure(guider, run, out, options)
                if count is not None:
                    count.add(heads.classes, run.log.final_classes())
            history.add(run.log)
            return out

        def fair_h(h, transformer_options):
            run = transformer_options.get(key)
            if run is None:
                return h
            sigma = float(transformer_options["sigmas"].max())
            guided, chunks = cond_chunks(h, transformer_options)
            for i, c in guided:
                chunks[i] = run.step(c, sigma)
            return torch.cat(chunks) if guided else h

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, key, fair_sampler_sample)
        patch_h_space(patched, fair_h)
        patched.model_options.setdefault("transformer_options", {}).setdefault(HISTORY_KEY, []).append(history)
        return (patched,)


def measure(guider, run, x, model_options):
    """Heads' predictions on final latents x (model space): one conditional model call at σ_min."""
    sampling = guider.inner_model.model_sampling
    sigma = torch.full((x.shape[0],), max(float(sampling.sigma_min), 1e-3), device=x.device)
    run.measuring = True
    try:
        comfy.samplers.calc_cond_batch(guider.inner_model, [guider.conds.get("positive")], x, sigma, model_options)
    finally:
        run.measuring = False
    run.log.finished = True


def tallies(log, classes, count=None):
    """(this run's outputs per class [K] or None if not measured, the running count per class [K] or None)."""
    final = log.final_classes()
    got = torch.bincount(torch.tensor(final, dtype=torch.long), minlength=len(classes)).double() if final else None
    return got, count.counts(classes) if count is not None else None


def describe(log, classes, count=None) -> str:
    """Target, this run's batch target and outputs, and the running count, per class."""
    got, running = tallies(log, classes, count)
    lines = [f"{'class':>10} {'target':>7} {'batch target':>13} {'outputs':>8}" + (f" {'running':>8}" if count else "")]
    for k, c in enumerate(classes):
        row = f"{c:>10} {100 * log.target[k]:6.1f}% {100 * log.batch_target[k]:12.1f}%"
        row += f" {int(got[k]):8d}" if got is not None else f" {'-':>8}"
        if running is not None:
            share = running[k] / max(float(running.sum()), 1)
            row += f" {100 * share:7.1f}%"
        lines.append(row)
    lines += summary(log, got, running, count)
    return "\n".join(lines)


def summary(log, got, running, count) -> list[str]:
    """Bias and distance to the target of this batch and of the running count, one line each."""
    lines = []
    if got is not None:
        freq = got / got.sum()
        tv = 0.5 * float((freq - torch.tensor(log.target)).abs().sum())
        lines.append(f"this batch ({int(got.sum())} outputs): bias {bias(freq):.3f}, distance to target (TV) {tv:.3f}")
    else:
        lines.append("this run was partial (leftover noise): outputs not measured")
    if running is not None and running.sum() > 0:
        freq = running / running.sum()
        tv = 0.5 * float((freq - torch.tensor(log.target)).abs().sum())
        lines.append(f"running count {count.name!r}: {int(running.sum())} outputs over {count.runs()} runs, bias "
                     f"{bias(freq):.3f}, distance to target (TV) {tv:.3f}")
    return lines


def chart(log, classes, count=None):
    """Per class, target share against this batch's outputs (and the running share) as grouped bars, [H, W, 3]."""
    got, running = tallies(log, classes, count)
    outputs = (got / got.sum()).tolist() if got is not None else None
    shares = (running / running.sum()).tolist() if running is not None and running.sum() > 0 else None
    runs = count.runs() if shares is not None else 0
    label = f"running share ({int(running.sum())} outputs, {runs} run{'s' * (runs != 1)})" if shares is not None else ""
    return charts.fairness_chart(classes, log.target, outputs, shares, label,
                                 subtitle="\n".join(summary(log, got, running, count)),
                                 output_counts=got.tolist() if got is not None else None)


class SpellFairnessReport:
    NODE_ID = "SpellFairnessReport"
    DISPLAY_NAME = "SPELL Fairness Report"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = (
        "Shows the attribute distribution of the last run's outputs (the heads' predictions on the final latents) "
        "against the target, and the running count if connected. Connect the guided model and the sampler's LATENT. "
        "The chart output shows the same as grouped bars: connect it to Preview Image."
    )
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "chart")
    OUTPUT_TOOLTIPS = ("The report as text (also shown on the node).",
                       "Per class, the target share against this batch's outputs (and the running share when a "
                       "count is connected) as a bar chart, 768x512. Connect it to Preview Image.")
    FUNCTION = "report"
    OUTPUT_NODE = True
    SEARCH_ALIASES = ["SPELL", "fairness", "report", "distribution"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model from SPELL Distribution Guidance that the sampler used."}),
            "heads": ("SPELL_ATTRIBUTE_HEADS", {"tooltip": "The heads the guidance used (class names)."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output; it orders this node after sampling."}),
        }, "optional": {
            "count": ("SPELL_FAIRNESS_COUNT", {"tooltip": "The running count, to show the cumulative distribution."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # reads state left by the last run (a fresh NaN: the shared math.nan equals itself)

    def report(self, model, heads, samples, count=None):
        histories = model.model_options.get("transformer_options", {}).get(HISTORY_KEY, [])
        if not histories:
            raise SpellInputError(self.NODE_ID, "this model has no distribution guidance; connect the MODEL output "
                                                "of SPELL Distribution Guidance.")
        log = histories[-1].latest()
        if log is None:
            text = "no sampling run yet"
        elif log.final_probs and len(log.final_probs) != samples["samples"].shape[0]:
            text = (f"the last guided run had batch {len(log.final_probs)}, these samples "
                    f"{samples['samples'].shape[0]}: not from this model")
        else:
            try:
                text, picture = describe(log, heads.classes, count), chart(log, heads.classes, count)
            except ValueError as e:
                raise SpellInputError(self.NODE_ID, str(e)) from e
            return {"ui": {"text": [text]}, "result": (text, image_batch([picture]))}
        picture = charts.message_chart("SPELL Fairness Report", text)
        return {"ui": {"text": [text]}, "result": (text, image_batch([picture]))}


class SpellDemoDigitExamples:
    NODE_ID = "SpellDemoDigitExamples"
    DISPLAY_NAME = "SPELL Demo Digit Examples"
    CATEGORY = "SPELL/demo"
    DESCRIPTION = (
        "Labelled examples for the demo model: training images of scikit-learn's digits as 64x64 IMAGEs with their "
        "digit as label, for SPELL Attribute Head Trainer (images + labels)."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "labels")
    OUTPUT_TOOLTIPS = ("Digit images, 64x64.", "Their classes, comma-separated (the node shows how many).")
    FUNCTION = "load_and_show"
    SEARCH_ALIASES = ["SPELL", "demo", "digits", "labelled examples"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"per_class": ("INT", {"default": 40, "min": 2, "max": 140, "tooltip":
            "Examples per digit (from the demo's training split)."})}}

    def load(self, per_class):
        from ..demo.data import digits_split

        images16, labels = digits_split()["train"]
        keep = torch.cat([(labels == d).nonzero().flatten()[:per_class] for d in range(10)])
        grey = (images16[keep] + 1) / 2
        big = torch.nn.functional.interpolate(grey, scale_factor=4, mode="nearest")[:, 0, :, :, None]
        return (big.expand(-1, -1, -1, 3).contiguous(), ", ".join(str(int(v)) for v in labels[keep]))

    def load_and_show(self, per_class):
        """What ComfyUI calls: ``load``, with how many examples it gave shown on the node."""
        images, names = self.load(per_class)
        shown = f"{len(images)} labelled digit images (64x64), up to {per_class} per digit 0-9; labels: {names[:40]}..."
        return {"ui": {"text": [shown]}, "result": (images, names)}


NODES = [SpellAttributeHeadTrainer, SpellAttributeHeadLoader, SpellFairnessCount, SpellDistributionGuidance,
         SpellFairnessReport, SpellDemoDigitExamples]
