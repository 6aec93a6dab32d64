"""Inter-process locks and change stamps for the files the pack rewrites (batch memories, running counts, index
folders): ``filelock`` locks in ``<name>.lock`` beside the data, released by the operating system when their
holder dies. Writers wait up to ``LOCK_TIMEOUT_S`` and then raise ``LockTimeout`` naming the file, having written
nothing; readers never wait (atomic renames make every read safe without the lock)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .storage import StorageError

LOCK_TIMEOUT_S = 60.0  # how long a writer waits for another process's write of the same file


class LockTimeout(StorageError):
    """Another process held a file's lock for longer than the timeout; nothing was written."""


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of a data file: ``<name>.lock`` beside it (kept; it is not litter)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def file_lock(path: str | os.PathLike, what: str, timeout: float | None = None, *, for_read: bool = False):
    """Holds the inter-process lock of path; yields True. Writers wait up to ``timeout`` (``LOCK_TIMEOUT_S``)
    and then raise LockTimeout naming the file. Readers (``for_read``) never wait: atomic renames make a read
    safe without the lock, so when it is busy or cannot be made (a read-only folder) they yield False and read
    anyway (and leave temporaries to the holder)."""
    path = Path(path)
    wait = LOCK_TIMEOUT_S if timeout is None else timeout
    if not for_read:
        path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file(path)), timeout=0 if for_read else wait)
    try:
        lock.acquire()
    except Timeout as e:
        if not for_read:
            raise LockTimeout(
                f"{what}: {path} is being written by another process (its lock {lock_file(path).name} was not "
                f"free within {wait:g} s); nothing was written and the file is unchanged. Run again when the "
                f"other run has finished"
            ) from e
        locked = False
    except OSError as e:
        if not for_read:
            raise StorageError(f"{what}: cannot create the lock file {lock_file(path)} ({e}); nothing was "
                               f"written") from e
        locked = False
    else:
        locked = True
    try:
        yield locked
    finally:
        if locked:
            lock.release()


def file_stamp(path: str | os.PathLike) -> tuple | None:
    """What changes whenever a file is written, replaced or removed: (size, mtime_ns, inode), None if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino
