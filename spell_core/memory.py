"""Batch memory: earlier outputs kept on disk as references for later runs (SPELL's dynamic mode across
batches, arXiv 2410.06025 §3).

State lives in files, one per memory name, and in the registry ``MEMORIES`` keyed by the file's path, so
ComfyUI's node caching and ``clone()`` deep copies cannot drop it, and a restart reads it back.
Eviction: first in, first out; the oldest outputs leave when capacity is exceeded.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .storage import StorageError, check_finite, load_latents, save_latents


class BatchMemory:
    """Latents [M, ...] in the VAE's space (as LATENT["samples"] holds them), oldest first."""

    def __init__(self, path: str | os.PathLike, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        self.path = Path(path)
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._latents: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    def latents(self) -> torch.Tensor | None:
        """Everything stored (read from disk on first use); None when the memory is empty."""
        with self._lock:
            if self._latents is None and self.path.exists():
                self._latents, _ = load_latents(self.path)
            return self._latents

    def __len__(self) -> int:
        x = self.latents()
        return 0 if x is None else x.shape[0]

    def check_compatible(self, item_shape: tuple) -> None:
        """Raises before sampling if stored latents have another per-item shape; nothing is changed."""
        x = self.latents()
        if x is not None and tuple(x.shape[1:]) != tuple(item_shape):
            raise StorageError(
                f"batch memory {self.name!r} holds latents of shape {tuple(x.shape[1:])}, this run makes "
                f"{tuple(item_shape)} (another model family or size): use another memory name, or clear it"
            )

    def append(self, samples: torch.Tensor) -> int:
        """Adds samples [B, ...], evicts the oldest beyond capacity, writes atomically; returns the size."""
        samples = samples.detach().to("cpu", torch.float32)
        check_finite(samples, f"outputs appended to batch memory {self.name!r}")
        self.check_compatible(tuple(samples.shape[1:]))
        with self._lock:
            x = samples if self._latents is None else torch.cat([self._latents, samples])
            x = x[-self.capacity:].clone()
            save_latents(self.path, x, {"kind": "batch_memory", "capacity": self.capacity})
            self._latents = x
            return x.shape[0]

    def clear(self) -> None:
        with self._lock:
            if self.path.exists():
                self.path.unlink()
            self._latents = None


MEMORIES: dict[str, BatchMemory] = {}


def open_memory(path: str | os.PathLike, capacity: int) -> BatchMemory:
    """The one BatchMemory for this file in this process (capacity updated to the latest request)."""
    key = str(Path(path).resolve())
    mem = MEMORIES.get(key)
    if mem is None:
        mem = MEMORIES[key] = BatchMemory(key, capacity)
    else:
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        mem.capacity = int(capacity)
    return mem


def forget_loaded() -> None:
    """Drops every in-process copy (what a ComfyUI restart does); files stay."""
    MEMORIES.clear()
