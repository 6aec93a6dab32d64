"""ComfyUI SPELL: sparse repellency for diverse, shielded generation. Gathers the node lists of nodes/."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # web/spell.js: text outputs shown on their nodes, search aliases for older front ends

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
