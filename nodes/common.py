"""What the node modules share: errors that name the node and the fix, the pack's folders, and the state of
files that runs change (for ``IS_CHANGED``)."""
from __future__ import annotations

import math
from pathlib import Path

import folder_paths

from ..spell_core.memory import file_stamp


class SpellInputError(ValueError):
    """Bad input to a node; the message starts with the node's id."""

    def __init__(self, node_id: str, message: str):
        super().__init__(f"{node_id}: {message}")


def check_numbers(node_id: str, **values: float) -> None:
    """NaN and ±inf pass ComfyUI's min/max check of a FLOAT input (every comparison with NaN is false) and would
    fail deep inside the sampler; refused here, before sampling, by name."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise SpellInputError(node_id, f"{name} must be a finite number, got {value}; type a number into the "
                                           f"widget (or fix the node that feeds it).")


def user_folder(*parts: str) -> Path:
    """A folder under ComfyUI's user directory, created on demand; its real path must stay inside the user
    directory's own (``spell_core.paths.contained``: a ``user/spell/...`` folder linked elsewhere is refused)."""
    from ..spell_core.paths import contained

    path = contained(folder_paths.get_user_directory(), "/".join(("spell",) + parts), "folder",
                     "remove that symbolic link (the pack keeps its files inside ComfyUI's user directory)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_state(path) -> str:
    """What changes whenever a file is written, replaced or removed (``spell_core.memory.file_stamp``)."""
    stamp = file_stamp(path)
    return "missing" if stamp is None else ":".join(map(str, stamp))


_SEEN: dict[str, tuple[str, int]] = {}  # file -> (last state seen, how many changes seen in this process)


def stored_state(path) -> str:
    """For ``IS_CHANGED`` of nodes whose state is a file that runs change (batch memory, running count): the
    file's state with a count of changes, so that a state never repeats within a process (a file emptied again
    is not the empty file of an earlier run, whose cached outputs an LRU cache may still hold)."""
    state = file_state(path)
    last, changes = _SEEN.get(str(path), (None, 0))
    if state != last:
        changes += 1
        _SEEN[str(path)] = (state, changes)
    return f"{state}#{changes}"
