"""What the node modules share: errors that name the node and the fix, and the pack's folders."""
from __future__ import annotations

from pathlib import Path

import folder_paths


class SpellInputError(ValueError):
    """Bad input to a node; the message starts with the node's id."""

    def __init__(self, node_id: str, message: str):
        super().__init__(f"{node_id}: {message}")


def user_folder(*parts: str) -> Path:
    """A folder under ComfyUI's user directory, created on demand."""
    path = Path(folder_paths.get_user_directory(), "spell", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
