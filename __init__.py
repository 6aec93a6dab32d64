"""ComfyUI SPELL: sparse repellency for diverse, shielded generation. Gathers the node lists of nodes/."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
