"""Fair by construction: a LoRA finetuned with the distributional alignment loss (Shen et al., ICLR 2024) or on
the model's own images resampled to the target, and the latent attribute classifier its training needs. The maths
is in ``spell_core/finetune.py`` and ``spell_core/resampled.py``; here ComfyUI's model, conditioning, schedules,
folders, progress bar and Cancel are adapted to it.

- SPELL Latent Classifier Trainer: a small CNN on the model's latents from labelled images (a folder of class
  sub-folders under input/, and/or IMAGE + labels: the head trainer's convention) ->
  models/spell_classifiers/<name>.safetensors. It is what the training steers by; judge the result with
  something else (the demo's benchmark uses the demo's own evaluator on decoded pixels).
- SPELL Fair LoRA Trainer: trains a LoRA on the U-Net's attention projections, through the sampling chain
  (adjusted DFT) or (``method`` "resampled own images") by denoising on the frozen model's own images drawn at the
  rates the target asks of their classes, so that the prompt alone, at batch 1 and with any sampler, gives the
  target distribution.
  Writes models/loras/<name>.safetensors (the EMA weights, of the last iteration or, with ``result`` "lowest
  validation bias", of the validation with the lowest bias, in the key format of ComfyUI's stock LoraLoader and
  LoraLoaderModelOnly), models/loras/<name>.training.json (settings, every iteration's losses and gradient norm,
  the validation bias), and a checkpoint user/spell/training/<name>.safetensors every ``checkpoint_every``
  iterations and on Cancel; with ``resume`` on, a later run continues from it. The training runs on the model's
  own denoiser (``BaseModel.apply_model``) with the LoRA added by forward hooks that are removed afterwards: the
  input MODEL is not changed; the output MODEL is a clone with the trained LoRA applied by ComfyUI's own loader.
"""
from __future__ import annotations

import json
import logging
import math
import os

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..spell_core import charts
from ..spell_core.fairness import bias, parse_target
from ..spell_core.finetune import (DRAWS, GRADIENTS, FairLoRAConfig, FairLoRATask, FairTrainer, LatentClassifier,
                                   LoRA, attention_linears, sample_chain, train_classifier, write_log)
from ..spell_core.paths import PathRefused, contained
from ..spell_core.resampled import ResampledTrainer, start_resampled
from ..spell_core.storage import StorageError, atomic_save
from .common import SpellInputError, check_numbers, file_state, user_folder
from .fairness import NONE, check_name, check_unet, class_folders, labelled_examples, ordered_classes
from .report import image_batch

CLASSIFIERS = "spell_classifiers"
METHOD_NAMES = {"distributional alignment": "alignment", "resampled own images": "resampled"}
RESULTS = ("last", "lowest validation bias")  # which EMA weights SPELL Fair LoRA Trainer writes
if CLASSIFIERS not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[CLASSIFIERS] = ([os.path.join(folder_paths.models_dir, CLASSIFIERS)],
                                                        {".safetensors"})
log = logging.getLogger("spell")


def file_in(node_id: str, kind: str, name: str, what: str):
    """models/<kind>/<name> under the containment rule; refusal names the node."""
    try:
        return contained(folder_paths.get_folder_paths(kind)[0], name, what, "remove that link or choose another name")
    except PathRefused as e:
        raise SpellInputError(node_id, f"{e}.") from e


def latents_of(model, vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [N, H, W, 3] -> latents in the model's own space (what the sampler's x̂0 is in)."""
    latents = torch.cat([vae.encode(pixels[i:i + 32]).detach().float().cpu() for i in range(0, len(pixels), 32)])
    return model.model.process_latent_in(latents).clone()


class SpellLatentClassifierTrainer:
    NODE_ID = "SpellLatentClassifierTrainer"
    DISPLAY_NAME = "SPELL Latent Classifier Trainer"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = (
        "Trains the attribute classifier that SPELL Fair LoRA Trainer steers by: a small CNN on the model's latents, "
        "from labelled images (a folder under input/ with one sub-folder per class, and/or an IMAGE batch with "
        "labels). Saves models/spell_classifiers/<name>.safetensors and reports held-out accuracy."
    )
    RETURN_TYPES = ("SPELL_LATENT_CLASSIFIER", "STRING")
    RETURN_NAMES = ("classifier", "report")
    OUTPUT_TOOLTIPS = ("The trained classifier, for SPELL Fair LoRA Trainer.", "Classes, examples, held-out accuracy.")
    FUNCTION = "train"
    OUTPUT_NODE = True
    SEARCH_ALIASES = ["SPELL", "fairness", "attribute classifier", "latent classifier"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model whose LoRA you will train (its latent space is used)."}),
                "vae": ("VAE", {"tooltip": "That model's VAE, to encode the examples."}),
                "folder": ([NONE] + class_folders(folder_paths.get_input_directory()), {"tooltip":
                    "A folder under ComfyUI's input directory holding one sub-folder of images per class."}),
                "name": ("STRING", {"default": "attribute", "tooltip":
                    "File name: models/spell_classifiers/<name>.safetensors."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip":
                    "Generation width: folder images are centre-cropped and resized to it."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip": "Generation height."}),
                "epochs": ("INT", {"default": 40, "min": 1, "max": 1000, "tooltip": "Passes over the examples."}),
                "held_out": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.5, "step": 0.05, "tooltip":
                    "Share of each class held out to measure accuracy (then the classifier is refitted on all)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing classifier of this name."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Labelled examples (at width x height)."}),
                "labels": ("STRING", {"forceInput": True, "tooltip": "One class name per image, comma-separated."}),
                "robustness": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                    "Adversarial training radius (RMS change per latent value, in standard deviations; 0: off). "
                    "A robust classifier is harder to move without changing the attribute, so the LoRA trained "
                    "through it fools it less (the demo's fair LoRA: 0.2). About 3x this node's training time."}),
                "members": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip":
                    "How many classifiers to train (seeds seed, seed + 1, ...) and read as one, by their mean class "
                    "probability. The LoRA trained through an ensemble can only move its reading by moving every "
                    "member's, so patterns that fool one network count less. Training time grows in proportion."}),
            },
        }

    def train(self, model, vae, folder, name, width, height, epochs, held_out, seed, overwrite, images=None,
              labels=None, robustness=0.0, members=1):
        check_numbers(self.NODE_ID, held_out=held_out, robustness=robustness)
        check_name(self.NODE_ID, name, "name")
        path = file_in(self.NODE_ID, CLASSIFIERS, f"{name}.safetensors", "classifier file")
        if path.exists() and not overwrite:
            raise SpellInputError(self.NODE_ID, f"{path.name} already exists; switch overwrite on or choose another name.")
        pixels, names = labelled_examples(self.NODE_ID, folder, width, height, images, labels)
        classes = ordered_classes(names)
        if len(classes) < 2:
            raise SpellInputError(self.NODE_ID, f"need examples of at least 2 classes, got {classes}.")
        y = torch.tensor([classes.index(n) for n in names])
        latents = latents_of(model, vae, pixels)
        bar = comfy.utils.ProgressBar(epochs * (2 if held_out > 0 else 1))
        net = train_classifier(latents, y, classes, epochs=epochs, held_out=held_out, seed=seed,
                               progress=lambda d, t: bar.update_absolute(d, t), robustness=robustness,
                               members=members)
        net.meta.update(width=width, height=height)
        path.parent.mkdir(parents=True, exist_ok=True)
        net.save(path)
        acc = net.meta.get("held_out_accuracy")
        report = (f"saved models/{CLASSIFIERS}/{path.name}: classes {', '.join(classes)}; {len(y)} examples, latent "
                  f"shape {tuple(latents.shape[1:])}; held-out accuracy "
                  + (f"{acc:.3f} on {net.meta['held_out']}" if acc is not None else "not measured (held_out 0)")
                  + (f" (mean of {members} members)" if members > 1 and acc is not None else "")
                  + (f", {net.meta['held_out_attacked_accuracy']:.3f} attacked at robustness {robustness:g}"
                     if "held_out_attacked_accuracy" in net.meta else ""))
        return {"ui": {"text": [report]}, "result": (net, report)}


class SpellLatentClassifierLoader:
    NODE_ID = "SpellLatentClassifierLoader"
    DISPLAY_NAME = "SPELL Latent Classifier Loader"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = "Loads a classifier saved by SPELL Latent Classifier Trainer (models/spell_classifiers)."
    RETURN_TYPES = ("SPELL_LATENT_CLASSIFIER", "STRING")
    RETURN_NAMES = ("classifier", "summary")
    FUNCTION = "load"
    SEARCH_ALIASES = ["SPELL", "fairness", "attribute classifier"]

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list(CLASSIFIERS)
        return {"required": {"classifier_file": (files or [NONE], {"tooltip": "A file in models/spell_classifiers."})}}

    @classmethod
    def IS_CHANGED(cls, classifier_file):
        try:
            return file_state(file_in(cls.NODE_ID, CLASSIFIERS, classifier_file, "classifier file"))
        except SpellInputError:
            return classifier_file  # the node itself runs and reports it

    def load(self, classifier_file):
        if classifier_file == NONE:
            raise SpellInputError(self.NODE_ID, "no classifier in models/spell_classifiers; train one with SPELL Latent "
                                                "Classifier Trainer first.")
        path = file_in(self.NODE_ID, CLASSIFIERS, classifier_file, "classifier file")
        try:
            net = LatentClassifier.load(path)
        except StorageError as e:
            raise SpellInputError(self.NODE_ID, f"{e}.") from e
        summary = f"{classifier_file}: classes {', '.join(net.classes)}; held-out accuracy {net.meta.get('held_out_accuracy')}"
        return {"ui": {"text": [summary]}, "result": (net, summary)}


def prompts_of(node_id: str, conditioning, what: str) -> list[torch.Tensor]:
    """One cross-attention tensor [1, T, D] per entry of a CONDITIONING (Conditioning Combine makes several)."""
    out = []
    for entry in conditioning or []:
        out.append(entry[0][:1].detach().float().clone())
    if not out:
        raise SpellInputError(node_id, f"{what} holds no prompt; connect a text encoder's CONDITIONING.")
    return out


def usable_weights(net: torch.nn.Module) -> None:
    """Parameters and buffers created under inference mode (ComfyUI loads models inside it) cannot take part in
    a backward pass: replaced by ordinary copies of the same values (same dtype and device)."""
    with torch.inference_mode(False):
        for module in net.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()


class ComfyDenoiser:
    """The model's own denoiser with CFG, one prompt per batch, as ``spell_core.finetune`` wants it."""

    def __init__(self, model, negative: torch.Tensor, cfg: float, lora: LoRA):
        self.base, self.negative, self.cfg, self.lora = model.model, negative, cfg, lora
        self.device = comfy.model_management.get_torch_device()
        self.dtype = model.model.get_dtype()

    def __call__(self, prompt: torch.Tensor, lora_on: bool):
        def denoise(x: torch.Tensor, sigma) -> torch.Tensor:  # sigma: one σ, or one per image [B]
            self.lora.enabled = lora_on
            b = x.shape[0]
            both = torch.cat([x, x]).to(self.device)
            s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b)
            sig = torch.cat([s, s]).to(self.device)
            cond = torch.cat([prompt.expand(b, -1, -1), self.negative.expand(b, -1, -1)]).to(self.device, self.dtype)
            out = self.base.apply_model(both, sig, c_crossattn=cond).float()
            pos, neg = out.chunk(2)
            return (neg + self.cfg * (pos - neg)).to(x.device)
        return denoise


def training_files(node_id: str, name: str):
    lora = file_in(node_id, "loras", f"{name}.safetensors", "LoRA file")
    log_file = file_in(node_id, "loras", f"{name}.training.json", "training log")
    try:
        checkpoint = contained(user_folder("training"), f"{name}.safetensors", "training checkpoint",
                               "remove that link or choose another name")
    except PathRefused as e:
        raise SpellInputError(node_id, f"{e}.") from e
    return lora, log_file, checkpoint


def drawn(bar, done: int, total: int) -> None:
    """Progress of drawing the resampled method's images; Cancel stops it (nothing is kept yet)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    bar.update_absolute(done, total)


class SpellFairLoRATrainer:
    NODE_ID = "SpellFairLoRATrainer"
    DISPLAY_NAME = "SPELL Fair LoRA Trainer"
    CATEGORY = "SPELL/fairness"
    DESCRIPTION = (
        "Finetunes a LoRA so that the prompt alone generates the target distribution of an attribute, at batch 1, "
        "with any sampler and no extra sampling cost. Two methods: distributional alignment (Shen et al., ICLR "
        "2024: the classifier's loss through the sampling chain, adjusted DFT) and resampled own images (the "
        "model's own images of the prompt, weighted by the class the classifier reads so the classes follow the "
        "target, learned with the model's denoising loss; the demo's LoRA). Writes models/loras/<name>.safetensors "
        "for ComfyUI's LoraLoader, a training log beside it, and checkpoints that Cancel keeps and resume "
        "continues from."
    )
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "report", "chart")
    OUTPUT_TOOLTIPS = ("The input model with the trained LoRA applied (strength 1).",
                       "What was trained, losses and the validation bias.",
                       "Loss, gradient norm and validation bias over the iterations.")
    FUNCTION = "train"
    OUTPUT_NODE = True
    SEARCH_ALIASES = ["SPELL", "fairness", "LoRA", "finetune", "debias", "train lora"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The U-Net model to finetune (SD1.x-style cross-attention conditioning)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt(s) to debias (several through Conditioning "
                                                         "Combine: each batch holds one)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt of classifier-free guidance."}),
                "classifier": ("SPELL_LATENT_CLASSIFIER", {"tooltip": "The classifier the training steers by."}),
                "target": ("STRING", {"default": "", "tooltip":
                    "Target shares per class, e.g. 'young: 0.75, old: 0.25' (as SPELL Distribution Guidance)."}),
                "name": ("STRING", {"default": "fair_lora", "tooltip": "models/loras/<name>.safetensors."}),
                "iterations": ("INT", {"default": 600, "min": 1, "max": 1000000, "tooltip":
                    "Training iterations (in total: a resumed run continues up to this number)."}),
                "batch_size": ("INT", {"default": 20, "min": 2, "max": 512, "tooltip":
                    "Images of one prompt per iteration; the target is matched over each batch."}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 100, "tooltip":
                    "Sampling steps during training: each iteration draws from steps..steps+4."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank (paper: 50 on SD1.5)."}),
                "learning_rate": ("FLOAT", {"default": 0.003, "min": 0.0, "max": 1.0, "step": 0.0001}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "resume": ("BOOLEAN", {"default": True, "tooltip":
                    "Continue from the checkpoint of this name (same settings) instead of starting afresh."}),
                "checkpoint_every": ("INT", {"default": 50, "min": 1, "max": 100000}),
            },
            "optional": {
                "keep": ("CONDITIONING", {"tooltip": "Prompts whose images must not change (several through "
                                                     "Conditioning Combine): kept close to the frozen model's."}),
                "draw": (list(DRAWS), {"default": "stratified", "tooltip":
                    "Target labels of a batch: stratified (whole seats per class, the fractional ones drawn; small "
                    "batches), iid (the paper's random draws) or carried (the fractional seats carried over from "
                    "batch to batch: every image's label certain; for targets like 30 % that do not divide the "
                    "batch)."}),
                "gradient": (list(GRADIENTS), {"default": "adjusted", "tooltip":
                    "adjusted DFT (the paper's: detached inputs, scaled steps) or naive (exact gradient)."}),
                "preservation": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 1000.0, "step": 0.5, "tooltip":
                    "Weight of the semantics preservation loss (1 - cosine to the frozen model's image of the same "
                    "noise; the paper's 8). Higher keeps images closer to the base model's."}),
                "class_prompts": ("CONDITIONING", {"tooltip": "Optional: one prompt per class of the classifier, in its "
                    "class order (Conditioning Combine), e.g. 'a photo of a female doctor', 'a photo of a male "
                    "doctor'. An image the training moves to another class is then kept close to the frozen model's "
                    "image of that class's prompt from the same noise, instead of being pushed through the "
                    "classifier alone (which a LoRA can fool with patterns that do not change the attribute)."}),
                "pool": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                    "Match the target over the batch and the class probabilities of this many recent images of the "
                    "prompt (only the batch is trained), e.g. 180 with batch 20 for a 10-class target: a batch that "
                    "happens to hold too many of one class is not pushed to change them. 0: each batch alone (the "
                    "paper's)."}),
                "ema_warmup": ("BOOLEAN", {"default": False, "tooltip":
                    "Warm the EMA up (decay (1+k)/(10+k), up to 0.996) instead of a constant 0.996 from the untrained "
                    "LoRA. Off by default: on the demo the constant decay gave the better LoRA (docs/fairness_finetune.md)."}),
                "result": (list(RESULTS), {"default": "last", "tooltip":
                    "Which weights the LoRA file holds: the EMA weights at the last iteration, or those of the "
                    "validation (every checkpoint_every iterations, validation_seeds fixed seeds, through the "
                    "classifier) with the lowest bias: a run that goes past its best is then written at its best."}),
                "method": (list(METHOD_NAMES), {"default": "distributional alignment", "tooltip":
                    "distributional alignment: the paper's loss through the sampling chain and the classifier. "
                    "resampled own images: draws own_images images of the prompt with the frozen model, weights "
                    "each by the class the classifier reads in it so that the classes follow the target, and trains "
                    "the LoRA with the model's own denoising loss on them (one prompt; draw, gradient, pool and "
                    "class_prompts do not apply). Nothing is optimised against the classifier, so the LoRA cannot "
                    "fool it; on the demo it gives the lower bias (docs/fairness_finetune.md)."}),
                "own_images": ("INT", {"default": 4000, "min": 10, "max": 1000000, "tooltip":
                    "resampled: the frozen model's images of the prompt to weight and learn (drawn in 2 x steps "
                    "steps); the rarest class needs enough confident ones."}),
                "rounds": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip":
                    "resampled: between rounds, own_images / 4 images of the LoRA are classified and each class's "
                    "weight multiplied by target / share (at most x2 a round), so what the LoRA under-learns is "
                    "asked for more. 1: the weights stay."}),
                "confidence": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "The confidence C (the paper's 0.8). alignment: only images whose assigned label is at least this "
                    "sure are pushed; resampled: only images the classifier reads with at least this probability "
                    "are learned (higher keeps the clearer images of each class)."}),
                "validation_seeds": ("INT", {"default": 64, "min": 8, "max": 4096, "tooltip":
                    "Images of the prompt (fixed seeds) each validation counts. 64 labels drawn from a uniform "
                    "10-class target themselves give a bias of about 0.044: more seeds tell smaller differences "
                    "apart, at the cost of sampling them every checkpoint_every iterations."}),
            },
        }

    def train(self, model, positive, negative, classifier, target, name, iterations, batch_size, steps, cfg, rank,
              learning_rate, seed, resume, checkpoint_every, keep=None, draw="stratified", gradient="adjusted",
              preservation=8.0, ema_warmup=False, class_prompts=None, pool=0, result="last",
              validation_seeds=64, method="distributional alignment", own_images=4000, rounds=4,
              confidence=0.8):
        if method not in METHOD_NAMES:
            raise SpellInputError(self.NODE_ID, f"method must be one of {', '.join(METHOD_NAMES)}, got {method!r}.")
        resampled = METHOD_NAMES[method] == "resampled"
        if not 8 <= int(validation_seeds) <= 4096:
            raise SpellInputError(self.NODE_ID, f"validation_seeds must be between 8 and 4096, got {validation_seeds}.")
        if result not in RESULTS:
            raise SpellInputError(self.NODE_ID, f"result must be one of {', '.join(RESULTS)}, got {result!r}.")
        check_numbers(self.NODE_ID, cfg=cfg, learning_rate=learning_rate, preservation=preservation,
                      confidence=confidence)
        check_unet(self.NODE_ID, model)
        if getattr(model.model, "adm_channels", 0):
            raise SpellInputError(self.NODE_ID, "this model also takes a pooled text embedding (SDXL-style); the trainer "
                                                "handles cross-attention conditioning only (SD1.x-style) for now.")
        check_name(self.NODE_ID, name, "name")
        try:
            q = parse_target(target, classifier.classes)
        except ValueError as e:
            raise SpellInputError(self.NODE_ID, str(e)) from e
        lora_path, log_path, ckpt_path = training_files(self.NODE_ID, name)
        prompts = prompts_of(self.NODE_ID, positive, "positive")
        negatives = prompts_of(self.NODE_ID, negative, "negative")
        kept = prompts_of(self.NODE_ID, keep, "keep") if keep is not None else []
        per_class = prompts_of(self.NODE_ID, class_prompts, "class_prompts") if class_prompts is not None else []
        if per_class and len(per_class) != len(classifier.classes):
            raise SpellInputError(self.NODE_ID, f"class_prompts holds {len(per_class)} prompts, the classifier "
                                                f"{len(classifier.classes)} classes ({', '.join(classifier.classes)}); "
                                                f"combine one prompt per class, in that order, or disconnect it.")
        config = FairLoRAConfig(iterations=iterations, batch=batch_size, steps=(steps, steps + 4), rank=rank,
                                lr=learning_rate, draw=draw, gradient=gradient, seed=seed,
                                keep_weight=preservation, ema_warmup=ema_warmup, class_reference=bool(per_class),
                                pool=pool, method=METHOD_NAMES[method], own_images=own_images, rounds=rounds,
                                threshold=confidence)
        if resampled and len(prompts) != 1:
            raise SpellInputError(self.NODE_ID, f"method 'resampled own images' trains one prompt; positive holds "
                                                f"{len(prompts)}. Train one LoRA per prompt, or use distributional "
                                                f"alignment.")
        try:
            config.check()
        except ValueError as e:
            raise SpellInputError(self.NODE_ID, str(e)) from e
        comfy.model_management.load_models_gpu([model])
        net = model.model.diffusion_model
        usable_weights(net)
        sampling = model.get_model_object("model_sampling")
        lora = LoRA(attention_linears(net), rank, seed=seed).to(comfy.model_management.get_torch_device())
        classifier = classifier.to(comfy.model_management.get_torch_device()).requires_grad_(False)
        task = FairLoRATask(
            denoiser=ComfyDenoiser(model, negatives[0], cfg, lora),
            sigmas=lambda n: comfy.samplers.calculate_sigmas(sampling, "normal", n).float().cpu(),
            schedule_sigmas=sampling.sigmas.float().cpu(), shape=(model.model.latent_format.latent_channels,
                                                                   *self.latent_size(model, classifier)),
            classify=lambda z: classifier(z.to(next(classifier.parameters()).device)).cpu(),
            target=q, prompts=prompts, keep=kept, class_prompts=per_class)
        can_resume = resume and ckpt_path.is_file()
        if not resampled:
            trainer = FairTrainer(task, lora, config)
        elif can_resume:  # the checkpoint holds the drawn images and their weights
            trainer = ResampledTrainer(task, lora, config, torch.zeros(1, *task.shape), torch.zeros(1),
                                       torch.ones(1), torch.zeros(len(kept), 1, *task.shape) if kept else None)
        else:
            drawing = comfy.utils.ProgressBar(own_images + 64 * len(kept))
            try:
                with torch.inference_mode(False):
                    trainer = start_resampled(task, lora, config, 2 * steps, progress=lambda done, total: drawn(drawing, done, total))
            except ValueError as e:
                raise SpellInputError(self.NODE_ID, f"{e}.") from e
        resumed = 0
        if can_resume:
            try:
                extra = trainer.load_checkpoint(ckpt_path)
            except StorageError as e:
                raise SpellInputError(self.NODE_ID, f"{e}.") from e
            if extra.get("validation_seeds", 64) != validation_seeds:
                raise SpellInputError(self.NODE_ID, f"the checkpoint {ckpt_path.name} was validated on "
                                                    f"{extra.get('validation_seeds', 64)} seeds; set validation_seeds "
                                                    f"to that to resume it, or switch resume off.")
            resumed = trainer.iteration
        validation = torch.Generator().manual_seed(10_000 + seed)
        val_noise = torch.randn((validation_seeds, *task.shape), generator=validation)
        extra = {"validation_seeds": validation_seeds}
        bar = comfy.utils.ProgressBar(iterations)
        lora.attach()
        try:
            with torch.inference_mode(False):
                if not trainer.log or "validation_bias" not in trainer.log[-1]:
                    self.validate(trainer, task, val_noise, steps)
                while trainer.iteration < iterations:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    row = trainer.step()
                    if resampled and trainer.round_due():
                        share = trainer.probe(max(64, own_images // 4), 2 * steps, 20_000 + seed)
                        trainer.correct(share)
                        log.info("%s: round %d at iteration %d: the LoRA's shares %s", self.NODE_ID,
                                 len(trainer.rounds), trainer.iteration, [round(x, 3) for x in share.tolist()])
                    if trainer.iteration % checkpoint_every == 0 or trainer.iteration == iterations:
                        self.validate(trainer, task, val_noise, steps)
                        trainer.save_checkpoint(ckpt_path, extra)
                    bar.update_absolute(trainer.iteration, iterations)
                    if trainer.iteration % 10 == 0:
                        log.info("%s: iteration %d/%d, loss %.4f, %s %.4f", self.NODE_ID, trainer.iteration,
                                 iterations, row["total"], *(("denoising", row["denoise"]) if resampled
                                                             else ("alignment", row["align"])))
        except comfy.model_management.InterruptProcessingException:
            trainer.save_checkpoint(ckpt_path, extra)  # Cancel keeps what was trained; resume continues from it
            raise
        finally:
            lora.detach_hooks()
        best = result == RESULTS[1] and trainer.best is not None
        sd = trainer.best_state_dict() if best else trainer.ema_state_dict()
        written = trainer.best["iteration"] if best else trainer.iteration
        meta = {"spell_fair_lora": json.dumps({"classes": classifier.classes, "target": q.tolist(),
                                               "iterations": trainer.iteration, "written_iteration": written,
                                               "rank": rank})}
        lora_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(sd, lora_path, meta)
        summary = self.summary(trainer, classifier.classes, q, resumed, validation_seeds)
        if resampled:
            summary = (f"resampled own images: {len(trainer.data)} drawn, {int((trainer.weights > 0).sum())} read "
                       f"confidently, {len(trainer.rounds)} corrections; " + summary)
        if best:
            summary += (f"; written: the EMA weights of iteration {written} (lowest validation bias, "
                        f"{trainer.best['bias']:.3f})")
        write_log(log_path, trainer.log, {"settings": trainer.config.__dict__, "classes": classifier.classes,
                                          "target": q.tolist(), "resumed_from": resumed, "lora": lora_path.name,
                                          "result": result, "written_iteration": written,
                                          "validation_seeds": validation_seeds, "method": method,
                                          **({"rounds": trainer.rounds} if resampled else {})})
        patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_path)), 1.0, 0.0)
        report = f"saved models/loras/{lora_path.name} (log {log_path.name}); " + summary
        return {"ui": {"text": [report]}, "result": (patched, report, image_batch([charts.training_chart(
            trainer.log, part=("denoise", "denoising loss") if resampled else ("align", "alignment loss"))]))}

    @staticmethod
    def latent_size(model, classifier) -> tuple[int, int]:
        width, height = classifier.meta.get("width", 512), classifier.meta.get("height", 512)
        return height // 8, width // 8

    @staticmethod
    def validate(trainer, task, noise, steps):
        """Bias of the classifier's classes on fixed validation noise, with the EMA weights (the result)."""
        saved = trainer.use_ema()
        try:
            sig = task.sigmas(steps + 2)
            pred = torch.cat([task.classify(sample_chain(task.denoiser(task.prompts[0], True), n, sig, None)).argmax(1)
                              for n in noise.split(32)])
        finally:
            trainer.restore(saved)
        share = torch.bincount(pred, minlength=len(task.target)).double() / len(pred)
        row = trainer.log[-1] if trainer.log else {"iteration": 0}
        if not trainer.log:
            trainer.log.append(row)
        row.update(validation_bias=bias(share), validation_share=share.tolist())
        trainer.note_validation(row["validation_bias"])

    @staticmethod
    def summary(trainer, classes, q, resumed, seeds) -> str:
        first = next((r for r in trainer.log if "validation_bias" in r), {})
        last = next((r for r in reversed(trainer.log) if "validation_bias" in r), {})
        share = ", ".join(f"{c}: {s:.2f}" for c, s in zip(classes, last.get("validation_share", [])))
        return (f"{trainer.iteration} iterations" + (f" (resumed at {resumed})" if resumed else "")
                + f"; validation bias (training classifier, {seeds} fixed seeds) {first.get('validation_bias', math.nan):.3f}"
                f" -> {last.get('validation_bias', math.nan):.3f}; shares {share}; target "
                + ", ".join(f"{c}: {t:.2f}" for c, t in zip(classes, q.tolist())))


NODES = [SpellLatentClassifierTrainer, SpellLatentClassifierLoader, SpellFairLoRATrainer]
