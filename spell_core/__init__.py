"""SPELL, sparse repellency (Kirchhof et al., ICML 2025, arXiv 2410.06025), in plain torch.

Never imports ComfyUI; ``nodes/`` adapts it.
"""
from .memory import BatchMemory, open_memory
from .references import ReferenceSet
from .repellency import in_batch_mask, nearest, project_out, repellency
from .run import RunHistory, RunLog, SpellConfig, SpellRun
from .storage import StorageError, load_latents, save_latents

__all__ = [
    "BatchMemory", "open_memory", "ReferenceSet", "in_batch_mask", "nearest", "project_out", "repellency",
    "RunHistory", "RunLog", "SpellConfig", "SpellRun", "StorageError", "load_latents", "save_latents",
]
