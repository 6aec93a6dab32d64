"""The OS page cache under an index folder's files: how much of a file is resident (``resident``), dropping it
(``evict``, for cold-start measurements) and reading it ahead in the background (``warm_files``).

Shard rows are fetched with positioned reads (``shards.Shard.take``), so they live in the page cache, never in
the process: on a cold cache (after a reboot, or once other files pushed them out) each candidate row of a
search is a random read from disk, and the first sampling run after ComfyUI starts waits on thousands of them
(the first run after a restart paid for it; see docs/shield_e2e.md). ``warm_files`` reads the files into the
page cache from a background thread, so opening a set does not wait for the disk, and only when they fit
comfortably in the memory the kernel reports available (``MemAvailable``): the pages are the kernel's page cache,
reclaimable, and the process' own resident memory does not grow.

Linux only in what it measures (``mincore``, ``/proc/meminfo``); elsewhere ``resident`` and ``mem_available``
return None and ``warm_files`` warms nothing and says why.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Warm only when all the files take at most this share of MemAvailable: the rest stays for the model, the
# sampler and everything else; a set larger than that is read from disk as queries touch it, as before.
WARM_SHARE = 0.5
# The read-ahead thread reads this many bytes a call, checking for ``Warmup.cancel`` between calls.
WARM_CHUNK = 8 << 20

_PAGE = mmap.PAGESIZE
_libc = None


def _c():
    """libc with mmap, mincore and munmap typed (Linux and other POSIX systems that have them), else None."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_long]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def resident_map(path: str | os.PathLike) -> np.ndarray | None:
    """Which pages of a file are in the page cache: bool [pages], by ``mincore`` on a fresh read-only map of it
    (mapping faults nothing in); None where mincore is unavailable."""
    lib = _c()
    if lib is None or not hasattr(mmap, "MAP_SHARED"):
        return None
    size = os.path.getsize(path)
    pages = (size + _PAGE - 1) // _PAGE
    if size == 0:
        return np.zeros(0, bool)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if lib.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
            return (np.frombuffer(vec, np.uint8) & 1).astype(bool)
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)


def resident(path: str | os.PathLike) -> tuple[int, int] | None:
    """(resident pages, pages) of a file in the page cache (``resident_map``); None where mincore is unavailable.
    An empty file is (0, 0)."""
    m = resident_map(path)
    return None if m is None else (int(np.count_nonzero(m)), len(m))


def resident_fraction(paths: Sequence[str | os.PathLike]) -> float | None:
    """Share of the pages of all paths that are in the page cache (None where it cannot be measured)."""
    got = [resident(p) for p in paths]
    if any(g is None for g in got):
        return None
    total = sum(g[1] for g in got)
    return sum(g[0] for g in got) / total if total else 1.0


def evict(paths: Sequence[str | os.PathLike]) -> None:
    """Drops the files' clean pages from the page cache (``POSIX_FADV_DONTNEED``; no root needed). Written data
    is synced first so it is clean; pages still mapped by a process stay (check with ``resident``)."""
    if not hasattr(os, "posix_fadvise"):
        raise OSError("posix_fadvise is not available on this platform: cannot evict files from the page cache")
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def mem_available() -> int | None:
    """Bytes the kernel reports available for new allocations without swapping (``MemAvailable`` in
    /proc/meminfo: free memory plus reclaimable cache), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Warmup:
    """What ``warm_files`` decided and the background read-ahead it started (if any)."""

    files: list[Path]
    bytes: int
    available: int | None
    limit: int | None
    started: bool
    reason: str
    thread: threading.Thread | None = field(default=None, repr=False)
    error: str | None = None
    seconds: float | None = None  # how long the read-ahead calls took, once done
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the read-ahead calls to return (the kernel may still be reading); True if they have."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        self._stop.set()

    def summary(self) -> str:
        """One line for the loader's summary: what is read ahead, or why nothing is."""
        mb = self.bytes / 2 ** 20
        if self.started:
            return f"{mb:.0f} MB read into the page cache in the background ({self.reason})"
        return f"{mb:.0f} MB not read ahead: {self.reason}"


def _resident_chunks(fd: int, size: int, chunk: int) -> list[bool] | None:
    """For each chunk of a file (by open fd): whether every page of it is in the page cache; None where mincore
    is unavailable."""
    lib = _c()
    if lib is None or size == 0:
        return None
    addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = (size + _PAGE - 1) // _PAGE
        vec = (ctypes.c_ubyte * pages)()
        if lib.mincore(addr, size, vec) != 0:
            return None
        per = chunk // _PAGE
        res = np.frombuffer(vec, np.uint8) & 1
        return [bool(res[a:a + per].all()) for a in range(0, pages, per)]
    finally:
        lib.munmap(addr, size)


_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform.startswith("linux") else None


def _populate(fd: int, offset: int, size: int) -> bool:
    """Reads bytes offset..offset + size of a file (offset page-aligned) into the page cache without copying them:
    ``MADV_POPULATE_READ`` on a map of just that range, unmapped at once. False where the kernel or platform
    lacks it (then the caller reads), and from then on without trying again."""
    global _POPULATE_READ
    lib = _c()
    if lib is None or _POPULATE_READ is None:
        return False
    if not hasattr(lib, "_madvise_typed"):
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib._madvise_typed = True
    addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        return False
    try:
        if lib.madvise(addr, size, _POPULATE_READ) == 0:
            return True
        if ctypes.get_errno() == errno.EINVAL:  # before Linux 5.14
            _POPULATE_READ = None
        return False
    finally:
        lib.munmap(addr, size)


def _lower_priority() -> None:
    """Lowers the calling thread's CPU priority by 10 (Linux, where setpriority takes a thread id); elsewhere
    nothing (there it would renice the whole process)."""
    if sys.platform.startswith("linux") and hasattr(threading, "get_native_id"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
        except OSError:
            pass


def warm_files(paths: Sequence[str | os.PathLike], share: float | None = None,
               available: int | None = None) -> Warmup:
    """Reads the files into the page cache in a background thread if their total size is at most share
    (default WARM_SHARE, read at each call; 0: off) × MemAvailable; otherwise touches nothing. Returns at once;
    the result says what was decided (``summary``) and can be waited on. available overrides MemAvailable
    (bytes).

    The thread reads each file in order, WARM_CHUNK bytes at a time, skipping chunks already resident
    (``mincore``): by ``MADV_POPULATE_READ`` on a short-lived map of the chunk (Linux 5.14+: the kernel reads it
    into the cache, nothing is copied, the map is dropped at once), else by a read into one reused buffer; so the
    process' own memory does not grow. It runs at a lower CPU priority (Linux: nice + 10 for that thread only), so
    sampling keeps the cores. Not ``POSIX_FADV_WILLNEED``: Linux reads at most the larger of the device's
    read-ahead window and its largest request per call (8 MB on this project's disk, measured with mincore; often
    well under 1 MB), so one hint over a whole shard leaves most of it on disk."""
    share = WARM_SHARE if share is None else float(share)
    files = [Path(p) for p in paths]
    total = sum(f.stat().st_size for f in files)
    avail = mem_available() if available is None else int(available)
    limit = None if avail is None else int(share * avail)

    def plan(started, reason):
        return Warmup(files, total, avail, limit, started, reason)

    if not files or total == 0:
        return plan(False, "no shard data")
    if share <= 0:
        return plan(False, "read-ahead switched off")
    if limit is None:
        return plan(False, "available memory unknown (no MemAvailable in /proc/meminfo)")
    if total > limit:
        return plan(False, f"more than {share:.0%} of the {avail / 2 ** 30:.1f} GiB of memory available; rows "
                           "are read from disk as searches reach them")
    w = plan(True, f"within {share:.0%} of the {avail / 2 ** 30:.1f} GiB available")

    def run():
        t = time.perf_counter()
        _lower_priority()
        buf = None
        try:
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    cached = _resident_chunks(fh.fileno(), size, WARM_CHUNK)
                    for j, a in enumerate(range(0, size, WARM_CHUNK)):
                        if w._stop.is_set():
                            return
                        if cached is not None and cached[j]:
                            continue
                        if not _populate(fh.fileno(), a, min(WARM_CHUNK, size - a)):
                            buf = buf if buf is not None else memoryview(bytearray(WARM_CHUNK))
                            fh.seek(a)
                            fh.readinto(buf)
        except OSError as e:  # a shard removed or unreadable: searches will report it; warming is best effort
            w.error = str(e)
        finally:
            w.seconds = time.perf_counter() - t

    w.thread = threading.Thread(target=run, name="spell-index-warm", daemon=True)
    w.thread.start()
    return w
