"""The pack's search aliases as the front end extension reads them on servers that do not send them.

ComfyUI 0.3.75 leaves the V1 ``SEARCH_ALIASES`` class attribute out of ``/object_info``, so ``web/spell.js``
falls back to ``web/search_aliases.json``. That file is written from the node classes' source (no ComfyUI
import needed): ``.venv/bin/python tests/browser/aliases.py`` rewrites it; a browser test fails when it drifts.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
ALIASES_JSON = PACK / "web" / "search_aliases.json"


def node_aliases() -> dict[str, list[str]]:
    """``{NODE_ID: SEARCH_ALIASES}`` for every node class under nodes/ that has both as literals."""
    out = {}
    for path in sorted((PACK / "nodes").glob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text())):
            if not isinstance(cls, ast.ClassDef):
                continue
            values = {s.targets[0].id: s.value for s in cls.body if isinstance(s, ast.Assign)
                      and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)}
            if "NODE_ID" in values and "SEARCH_ALIASES" in values:
                out[ast.literal_eval(values["NODE_ID"])] = list(ast.literal_eval(values["SEARCH_ALIASES"]))
    return dict(sorted(out.items()))


def render() -> str:
    return json.dumps(node_aliases(), indent=2) + "\n"


if __name__ == "__main__":
    ALIASES_JSON.write_text(render())
    print(f"wrote {ALIASES_JSON.relative_to(PACK)}")
