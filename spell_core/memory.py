"""Batch memory: earlier outputs kept on disk as references for later runs (SPELL's dynamic mode across
batches, arXiv 2410.06025 §3).

State lives in files, one per memory name, and in the registry ``MEMORIES`` keyed by the file's path, so
ComfyUI's node caching and ``clone()`` deep copies cannot drop it, and a restart reads it back.
Eviction: first in, first out; the oldest outputs leave when capacity is exceeded.

Several processes (two ComfyUI servers, a server and a script) may append to one memory: every append takes an
inter-process lock (``filelock``, the file ``<name>.safetensors.lock`` beside the memory; the operating system
releases it when its holder dies), re-reads the file under it, appends, writes atomically and releases. A writer
that cannot get the lock within ``LOCK_TIMEOUT_S`` raises ``LockTimeout`` naming the file: nothing is written and
what the file holds stays as it was. Readers re-read the file whenever it changed (size, mtime, inode).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .locking import LOCK_TIMEOUT_S, LockTimeout, file_lock, file_stamp, lock_file  # noqa: F401 (re-exported)
from .storage import StorageError, check_finite, load_latents, remove_stale_temporaries, save_latents


class BatchMemory:
    """Latents [M, ...] in the VAE's space (as LATENT["samples"] holds them), oldest first."""

    def __init__(self, path: str | os.PathLike, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        self.path = Path(path)
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._latents: torch.Tensor | None = None
        self._seen: tuple | None = None  # the file's (size, mtime, inode) when _latents was read or written
        self._read_once = False  # the first read always goes through the lock (and removes stale temporaries)

    @property
    def name(self) -> str:
        return self.path.stem

    def _refresh(self) -> None:
        """Re-reads the file if it changed since it was last read or written here (self._lock held)."""
        stamp = file_stamp(self.path)
        if stamp != self._seen:
            self._latents = None if stamp is None else load_latents(self.path)[0]
            self._seen = stamp
        self._read_once = True

    def latents(self) -> torch.Tensor | None:
        """Everything stored, as the file holds it now (re-read when another process changed it); None when
        the memory is empty."""
        with self._lock:
            if not self._read_once or file_stamp(self.path) != self._seen:
                with file_lock(self.path, f"batch memory {self.name!r}", for_read=True) as locked:
                    if locked:
                        remove_stale_temporaries(self.path)
                    self._refresh()
            return self._latents

    def __len__(self) -> int:
        x = self.latents()
        return 0 if x is None else x.shape[0]

    def _check(self, x: torch.Tensor | None, item_shape: tuple) -> None:
        if x is not None and tuple(x.shape[1:]) != tuple(item_shape):
            raise StorageError(
                f"batch memory {self.name!r} holds latents of shape {tuple(x.shape[1:])}, this run makes "
                f"{tuple(item_shape)} (another model family or size): use another memory name, or clear it"
            )

    def check_compatible(self, item_shape: tuple) -> None:
        """Raises before sampling if stored latents have another per-item shape; nothing is changed."""
        self._check(self.latents(), item_shape)

    def append(self, samples: torch.Tensor, timeout: float | None = None) -> int:
        """Adds samples [B, ...], evicts the oldest beyond capacity, writes atomically; returns the size.
        Under the file's inter-process lock the file is re-read first, so appends of other processes are kept;
        LockTimeout (nothing written) when the lock is not free within timeout (``LOCK_TIMEOUT_S``)."""
        samples = samples.detach().to("cpu", torch.float32)
        check_finite(samples, f"outputs appended to batch memory {self.name!r}")
        self.check_compatible(tuple(samples.shape[1:]))
        with self._lock, file_lock(self.path, f"batch memory {self.name!r}", timeout):
            self._refresh()
            self._check(self._latents, tuple(samples.shape[1:]))
            x = samples if self._latents is None else torch.cat([self._latents, samples])
            x = x[-self.capacity:].clone()
            save_latents(self.path, x, {"kind": "batch_memory", "capacity": self.capacity})
            self._latents, self._seen = x, file_stamp(self.path)
            return x.shape[0]

    def clear(self, timeout: float | None = None) -> None:
        with self._lock, file_lock(self.path, f"batch memory {self.name!r}", timeout):
            remove_stale_temporaries(self.path)
            if self.path.exists():
                self.path.unlink()
            self._latents, self._seen = None, None


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
