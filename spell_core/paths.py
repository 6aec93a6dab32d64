"""The one containment rule for every path the pack opens or writes.

A path is given as a base folder (one of ComfyUI's folders: ``input/``, ``user/spell/...``,
``models/spell_sets``, ``models/spell_heads``, an index folder) and a name relative to it: typed by the user, or
read from the pack's own files (index manifests, shard lists). ``contained`` returns the name's real path
(symbolic links followed, ``..`` resolved; for a name that does not exist yet its existing part is resolved) and
refuses it when that real path is not inside the base's own real path. The base itself may be a symbolic link
(ComfyUI's ``models/`` linked to another disk): its real path is the reference, so what lies in it is inside.

Names the file system cannot hold (empty, a NUL byte, a component over 255 bytes, a whole path over 4095
bytes) are refused with the same kind of message instead of ``embedded null byte`` / ``File name too long``.

Plain Python: never imports ComfyUI. Nodes wrap ``PathRefused`` with their id (``nodes.common.SpellInputError``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import StorageError

NAME_MAX = 255  # bytes per path component (ext4, XFS, Btrfs, APFS, NTFS in UTF-16 units)
PATH_MAX = 4095  # bytes of a whole path (Linux PATH_MAX minus the terminating NUL)
FIX = "give a plain name inside that folder (no '..', no absolute path, no symbolic link that leads out of it)"


class PathRefused(StorageError):
    """A name that resolves outside its folder, or that the file system cannot hold; the message names the
    path, the folder and the fix."""


def check_name(name, what: str = "name") -> str:
    """name as a str; PathRefused when it is empty, holds a NUL byte, or has a component too long to store."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str):
        raise PathRefused(f"{what} must be text, got {type(name).__name__}")
    if not name.strip():
        raise PathRefused(f"{what} is empty; give a name")
    if "\x00" in name:
        raise PathRefused(f"{what} {name!r} holds a NUL byte (\\x00), which no file name can hold; remove it")
    for part in name.replace("\\", "/").split("/"):
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise PathRefused(f"{what} {shorten(name)} has a part of {size} bytes; the file system holds at most "
                              f"{NAME_MAX} bytes per file or folder name: use a shorter name")
    return name


def shorten(name: str, keep: int = 60) -> str:
    return repr(name) if len(name) <= keep else repr(name[:keep]) + f"... ({len(name)} characters)"


def real_base(base: str | os.PathLike) -> Path:
    """The base folder's own real path (the reference for what is inside it)."""
    return Path(os.path.realpath(os.fspath(base)))


def is_within(path: str | os.PathLike, base_real: str | os.PathLike) -> bool:
    """Whether the real path ``path`` is base_real or lies under it (both already real)."""
    path, base_real = os.fspath(path), os.fspath(base_real)
    return path == base_real or path.startswith(base_real.rstrip(os.sep) + os.sep)


def contained(base: str | os.PathLike, name: str | os.PathLike, what: str = "path", fix: str = FIX) -> Path:
    """The real path of base/name (symlinks followed, '..' resolved, the existing part of a name that does not
    exist yet resolved); PathRefused when it is not inside base's own real path, or when the name cannot be
    held by the file system. For reads, writes and removals alike."""
    name = check_name(name, what)
    root = real_base(base)
    target = Path(os.path.realpath(os.path.join(root, name)))
    if not is_within(target, root):
        raise PathRefused(f"{what} {shorten(name)} resolves to {target}, outside {root}; {fix}")
    if len(os.fsencode(os.fspath(target))) > PATH_MAX:
        raise PathRefused(f"{what} {shorten(name)} makes a path of more than {PATH_MAX} bytes; use a shorter name")
    return target


def find_in(bases: Iterable[str | os.PathLike], name: str, what: str = "file", fix: str = FIX) -> Path | None:
    """The contained real path of name in the first of bases (e.g. ComfyUI's folders for one kind of model)
    where it exists (a dangling symbolic link counts, so that it is refused rather than skipped); None if in none."""
    name = check_name(name, what)
    for base in bases:
        if os.path.lexists(os.path.join(os.fspath(base), name)):
            return contained(base, name, what, fix)
    return None
