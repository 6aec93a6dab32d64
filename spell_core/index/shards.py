"""Memory-mapped safetensors shards of the index: ``read_header``, ``Shard`` (one file of reference latents) and
``LatentStore`` (all references, in memory or over shards), and the names of the index folder's files.

Full latents live in memory or in memory-mapped safetensors shards; files are safetensors, never pickles. Shards
store float32 or float16 (``SHARD_DTYPES``); every read returns float32, so a float16 shard is searched, exactly,
as the float32 values its float16 entries denote.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..storage import StorageError

INDEX_FORMAT = "spell-index/1"
INDEX_FILE = "index.safetensors"
MANIFEST = "manifest.json"

ProgressFn = Callable[[int, int], None]
# safetensors dtype of a shard's "latents" -> numpy dtype of the stored values; every read upcasts to float32,
# so the index compares queries with exactly the float32 values of what is stored (float16: half the disk)
SHARD_DTYPES = {"F32": np.float32, "F16": np.float16}
DTYPE_NAMES = {"float32": "F32", "float16": "F16"}
# How ``Shard.take`` reads candidate rows. "willneed": first every run of rows the page cache holds is read without
# waiting (preadv2 with RWF_NOWAIT, Linux 4.14+), then the runs it could not serve are all announced with
# POSIX_FADV_WILLNEED before the first blocking read, so the disk serves them concurrently instead of one wait
# per row, and a warm read costs what a plain one does; "none": plain positioned reads, one after the other. Where
# RWF_NOWAIT is missing every run is announced; where os.posix_fadvise is missing (not Linux) reads are plain.
# Measured side by side in docs/cold_rows.md.
READ_HINTS = "willneed"
READ_HINT_MODES = ("none", "willneed")
_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED")
_NOWAIT = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None


def read_header(path: Path) -> tuple[dict, int]:
    """Parses a safetensors header -> (header dict, byte offset of the data); raises StorageError if broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StorageError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise StorageError(f"{path} is truncated or corrupt (header length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{path} is not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise StorageError(f"{path} has a corrupt safetensors header")
    return header, 8 + n


class _Upcast:
    """Read-only float32 view of a float16 memory map: indexing returns float32 copies of the rows."""

    dtype = np.dtype(np.float32)

    def __init__(self, mm: np.memmap):
        self.mm = mm
        self.shape = mm.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.mm[key], dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.mm, dtype=dtype or np.float32)


class Shard:
    """One safetensors file holding {"latents": [n, ...]} stored as float32 or float16 (``dtype``); every read
    returns float32 (float16 rows upcast exactly). Rows are fetched with positioned reads (``take``), so only
    the page cache holds them and the process' resident memory does not grow with the rows touched (a memory
    map, ``rows``, is still available)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise StorageError(f"shard {self.path} does not exist")
        header, start = read_header(self.path)
        info = header.get("latents")
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or "data_offsets" not in info:
            raise StorageError(f"shard {self.path} holds no 'latents' tensor")
        if info.get("dtype") not in SHARD_DTYPES:
            raise StorageError(f"shard {self.path} holds 'latents' of dtype {info.get('dtype')!r}; index shards hold "
                               "F32 or F16: rebuild the index (python -m spell_core.index build ... --dtype float32 "
                               "or float16)")
        self.stored = np.dtype(SHARD_DTYPES[info["dtype"]])  # on disk; reads give float32
        self.dtype = self.stored.name  # "float32" | "float16"
        self.shape = tuple(int(s) for s in info["shape"])
        begin, end = info["data_offsets"]
        expected = self.stored.itemsize * math.prod(self.shape)
        if end - begin != expected or self.path.stat().st_size < start + end:
            raise StorageError(f"shard {self.path} is truncated: expected {start + end} bytes for {self.dtype} shape "
                               f"{self.shape}, found {self.path.stat().st_size}")
        self.offset = start + begin
        self._mm = None
        self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def rows(self):
        """[n, D] float32 memory map (float16 shards: a map whose rows come back as float32 copies)."""
        if self._mm is None:
            d = math.prod(self.shape[1:])
            mm = np.memmap(self.path, self.stored, "r", self.offset, (self.shape[0], d))
            if hasattr(mmap, "MADV_RANDOM"):  # candidate rows are scattered: no readahead around them
                mm._mmap.madvise(mmap.MADV_RANDOM)
            self._mm = mm if self.stored == np.float32 else _Upcast(mm)
        return self._mm

    def _open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    @staticmethod
    def _runs(local: np.ndarray) -> list[tuple[int, int, int]]:
        """Runs (a, b, 0) of consecutive rows in sorted local: positions [a, b), no byte of them read yet."""
        cut = np.flatnonzero(np.diff(local) != 1) + 1
        return [(a, b, 0) for a, b in zip(np.concatenate([[0], cut]).tolist(),
                                          np.concatenate([cut, [len(local)]]).tolist())]

    def _advise(self, local: np.ndarray, runs: list[tuple[int, int, int]]) -> None:
        """POSIX_FADV_WILLNEED for the bytes of each run (a, b, done) not read yet; returns without waiting."""
        if not _FADVISE:
            return
        rb = self.stored.itemsize * math.prod(self.shape[1:])
        for a, b, done in runs:
            os.posix_fadvise(self._fd, self.offset + int(local[a]) * rb + done, (b - a) * rb - done,
                             os.POSIX_FADV_WILLNEED)

    def prefetch(self, local: np.ndarray) -> None:
        """Asks the OS to start reading rows local [P] (sorted ascending) into the page cache and returns without
        waiting (POSIX_FADV_WILLNEED per run of rows; nothing where posix_fadvise is missing)."""
        if len(local):
            self._open()
            self._advise(local, self._runs(local))

    def _read(self, local: np.ndarray, raw: np.ndarray, runs: list[tuple[int, int, int]], nowait: bool = False):
        """Reads the rest of each run (a, b, done) into raw -> the runs left: none, or with nowait (RWF_NOWAIT)
        those the page cache could not serve at once, with what was read of them."""
        global _NOWAIT
        rb = self.stored.itemsize * math.prod(self.shape[1:])
        buf = memoryview(raw).cast("B")
        left = []
        for j, (a, b, done) in enumerate(runs):
            at, want, view = self.offset + int(local[a]) * rb + done, (b - a) * rb - done, buf[a * rb + done:b * rb]
            if nowait:
                try:
                    got = os.preadv(self._fd, [view], at, _NOWAIT)
                except BlockingIOError:
                    got = 0
                except OSError as e:  # a filesystem or kernel without RWF_NOWAIT: plain reads from now on
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    _NOWAIT = None
                    return left + runs[j:]
                if got < want:
                    left.append((a, b, done + got))
                continue
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [view], at)
            else:  # pragma: no cover - platforms without preadv
                data = os.pread(self._fd, want, at)
                got = len(data)
                view[:got] = data
            if got != want:
                raise StorageError(f"shard {self.path} is truncated: short read at row {int(local[a])}")
        return left

    def _start(self, local: np.ndarray, out: np.ndarray):
        """First half of take: the rows the page cache holds read at once (READ_HINTS "willneed") -> state for
        ``_finish`` (the runs still to read are state[3])."""
        hints = READ_HINTS
        if hints not in READ_HINT_MODES:
            raise ValueError(f"READ_HINTS must be one of {READ_HINT_MODES}, got {hints!r}")
        self._open()
        # float16: read the stored bytes into a scratch array, then upcast into out in one pass
        raw = out if self.stored == np.float32 else np.empty(out.shape, self.stored)
        runs = self._runs(local)
        if hints == "willneed" and len(runs) > 1 and _NOWAIT is not None:
            runs = self._read(local, raw, runs, nowait=True)
        return local, out, raw, runs

    def _finish(self, state) -> np.ndarray:
        local, out, raw, runs = state
        self._read(local, raw, runs)
        if raw is not out:
            out[...] = raw
        return out

    def take(self, local: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows local [P] (sorted ascending for sequential access) -> [P, D] float32 (into out, a C-contiguous
        [P, D] float32 array, if given), one positioned read per run of consecutive rows (see READ_HINTS)."""
        d = math.prod(self.shape[1:])
        out = np.empty((len(local), d), np.float32) if out is None else out
        if len(local) == 0:
            return out
        read_parts([(self, local, out)])
        return out

    def read(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b as a float32 [b − a, D] tensor, read (not mapped: streaming leaves no resident pages)."""
        d = math.prod(self.shape[1:])
        x = np.fromfile(self.path, self.stored, (b - a) * d, offset=self.offset + self.stored.itemsize * a * d)
        if len(x) != (b - a) * d:
            raise StorageError(f"shard {self.path} is truncated: short read at rows {a}..{b}")
        if self.stored != np.float32:
            x = x.astype(np.float32)
        return torch.from_numpy(x.reshape(b - a, d))


def read_parts(parts: Sequence[tuple["Shard", np.ndarray, np.ndarray]]) -> None:
    """Reads rows local (sorted) of each shard into its out [P, D] float32 (READ_HINTS): "willneed" reads what the
    page cache holds at once and announces every other run, of all the shards, before the first read waits."""
    states = [(shard, shard._start(local, out)) for shard, local, out in parts]
    if READ_HINTS == "willneed" and sum(len(st[3]) for _, st in states) > 1:
        for shard, st in states:
            shard._advise(st[0], st[3])
    for shard, st in states:
        shard._finish(st)


class LatentStore:
    """Reference latents [N, D] float32, either in memory or spread over memory-mapped shards (stored float32
    or float16, read as float32; shards of both dtypes may be mixed)."""

    def __init__(self, item_shape: tuple, tensor: torch.Tensor | None = None, shards: Sequence[Shard] = ()):
        self.item_shape = tuple(item_shape)
        self.tensor = tensor
        self.shards = list(shards)
        sizes = [len(s) for s in self.shards]
        self.starts = np.cumsum([0] + sizes)
        self.n = tensor.shape[0] if tensor is not None else int(self.starts[-1])

    @classmethod
    def from_files(cls, files: Sequence[str | os.PathLike]) -> "LatentStore":
        shards = [Shard(f) for f in files]
        if not shards:
            raise ValueError("no shard files given")
        shapes = {s.shape[1:] for s in shards}
        if len(shapes) != 1:
            raise StorageError(f"shards hold different item shapes: {sorted(shapes)}")
        return cls(shapes.pop(), shards=shards)

    def __len__(self) -> int:
        return self.n

    @property
    def dtypes(self) -> list[str]:
        """Stored dtypes of the shards, in order ("float32" for latents in memory)."""
        return [s.dtype for s in self.shards] if self.tensor is None else ["float32"]

    @property
    def dim(self) -> int:
        return math.prod(self.item_shape)

    def chunks(self, size: int = 16384) -> Iterable[tuple[int, torch.Tensor]]:
        """Yields (start, rows [n, D] float32) over all references in order."""
        if self.tensor is not None:
            for a in range(0, self.n, size):
                yield a, self.tensor[a:a + size]
            return
        for s, base in zip(self.shards, self.starts):
            for a in range(0, len(s), size):
                yield int(base) + a, s.read(a, min(a + size, len(s)))

    def get(self, k: torch.Tensor) -> torch.Tensor:
        """Rows k [P] -> [P, D] float32."""
        k = k.to("cpu", torch.long)
        if self.tensor is not None:
            return self.tensor[k]
        out = torch.empty(len(k), self.dim)
        if len(k) == 0:
            return out
        kn = k.numpy()
        if len(kn) < 2 or bool((kn[1:] >= kn[:-1]).all()):  # sorted: read straight into the output
            return self.get_sorted(kn, out)
        which = np.searchsorted(self.starts, kn, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            local = kn[sel] - self.starts[s]
            order = np.argsort(local, kind="stable")  # sorted, so consecutive rows are read in one call
            out[torch.from_numpy(sel[order])] = torch.from_numpy(self.shards[s].take(local[order]))
        return out

    def get_sorted(self, kn: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Rows kn [P] (ascending) of the shards read into out [≥ P, D] float32 (contiguous) -> out[:P]."""
        o = out.numpy()
        bounds = np.searchsorted(kn, self.starts)
        read_parts([(shard, kn[bounds[s]:bounds[s + 1]] - self.starts[s], o[bounds[s]:bounds[s + 1]])
                    for s, shard in enumerate(self.shards) if bounds[s + 1] > bounds[s]])
        return out[:len(kn)]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n rows spread over the set (for fitting the projection)."""
        n = min(n, self.n)
        g = np.random.default_rng(seed)
        k = np.sort(g.choice(self.n, n, replace=False))
        return self.get(torch.from_numpy(k))

