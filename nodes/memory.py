"""SpellBatchMemory and SpellBatchMemoryClear: a named, persistent memory of earlier outputs.

State lives in ``spell_core.memory`` (a registry keyed by file, and the file itself under ComfyUI's user
directory, ``user/spell/memory/<name>.safetensors``), never in the node, so output caching and
``clone()`` cannot lose it; ``SpellRepellency`` reads it at the start of every run and appends to it at
the end. ``SpellBatchMemory.IS_CHANGED`` returns the file's state, so a run after the memory changed
re-executes the memory node and everything downstream even with every widget and the seed unchanged;
a graph whose memory did not change stays cached.
"""
from __future__ import annotations

import re

from ..spell_core import open_memory
from ..spell_core.paths import PathRefused, contained
from .common import SpellInputError, stored_state, user_folder

NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def memory_path(node_id: str, name: str):
    if not NAME_RULE.match(name) or ".." in name:
        raise SpellInputError(node_id, f"memory name {name!r} is not allowed: use 1-64 letters, digits, '_', '-', '.'.")
    try:  # a memory file that is a symlink leading out of user/spell/memory is refused (read, append and clear)
        return contained(user_folder("memory"), f"{name}.safetensors", "memory file",
                         "remove that link or choose another memory name")
    except PathRefused as e:
        raise SpellInputError(node_id, f"{e}.") from e


def memory_for(node_id: str, name: str, capacity: int):
    if capacity < 1:
        raise SpellInputError(node_id, f"capacity must be ≥ 1, got {capacity}.")
    return open_memory(memory_path(node_id, name), capacity)


class SpellBatchMemory:
    NODE_ID = "SpellBatchMemory"
    DISPLAY_NAME = "SPELL Batch Memory"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "A named memory of earlier outputs. Connect it to SPELL Sparse Repellency: every complete sampling run "
        "appends its final latents, and later runs are repelled from them. Kept on disk (survives a restart); "
        "when full, the oldest outputs are dropped first."
    )
    RETURN_TYPES = ("SPELL_MEMORY",)
    OUTPUT_TOOLTIPS = ("The memory, read and filled by SPELL Sparse Repellency at sampling time.",)
    FUNCTION = "open"
    SEARCH_ALIASES = ["SPELL", "memory", "history"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "name": ("STRING", {"default": "default", "tooltip":
                "Which memory: one file per name under ComfyUI's user folder (user/spell/memory/<name>.safetensors). "
                "Use one name per project or model family."}),
            "capacity": ("INT", {"default": 1024, "min": 1, "max": 10_000_000, "tooltip":
                "How many outputs are kept; beyond it the oldest are dropped first."}),
        }}

    @classmethod
    def IS_CHANGED(cls, name, capacity):
        """The memory file's state: after a run appended to it (or it was cleared), this node and everything
        downstream (SPELL, the sampler) run again instead of being served from ComfyUI's output cache."""
        try:
            return stored_state(memory_path(cls.NODE_ID, name))
        except SpellInputError:
            return name  # a bad name: the node itself runs and reports it

    def open(self, name, capacity):
        return (memory_for(self.NODE_ID, name, capacity),)


class SpellBatchMemoryClear:
    NODE_ID = "SpellBatchMemoryClear"
    DISPLAY_NAME = "SPELL Batch Memory Clear"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Empties a batch memory every time the workflow runs, then passes it on. Put it between SPELL Batch Memory "
        "and SPELL Sparse Repellency, run once, then bypass it (Ctrl+B) so that memories accumulate again."
    )
    RETURN_TYPES = ("SPELL_MEMORY",)
    FUNCTION = "clear"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"memory": ("SPELL_MEMORY", {"tooltip": "The memory to empty."})}}

    @classmethod
    def IS_CHANGED(cls, memory):
        # An action, not a value: run on every queue while in the graph. A fresh NaN each time: ComfyUI compares
        # signatures as tuples, where the one shared math.nan object equals itself and would be served from cache.
        return float("nan")

    def clear(self, memory):
        memory.clear()
        return (memory,)


NODES = [SpellBatchMemory, SpellBatchMemoryClear]
