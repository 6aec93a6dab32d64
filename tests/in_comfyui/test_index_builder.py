"""SPELL Protected Set Index Builder: a folder of images through the VAE into an index folder, streamed in
shards, resumable after a cancel, refusing to replace another set's index, listed by the loader."""
import shutil
from pathlib import Path

import comfy.model_management as mm
import comfy.utils as comfy_utils
import folder_paths
import pytest
import torch
from PIL import Image


def image_folder(name, n, seed=0):
    folder = Path(folder_paths.get_input_directory(), name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    return folder


class CountingVAE:
    """The demo VAE, counting encoded images; optionally presses Cancel after `cancel_after` encode calls."""

    def __init__(self, vae, cancel_after=None):
        self.vae, self.cancel_after, self.images, self.calls = vae, cancel_after, 0, 0

    def encode(self, pixels):
        self.calls += 1
        self.images += len(pixels)
        if self.calls == self.cancel_after:
            mm.interrupt_current_processing(True)
        return self.vae.encode(pixels)

    def get_sd(self):
        return self.vae.get_sd()


def build(comfy, folder, vae, name="idx", overwrite=False, batch_size=4):
    node = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetIndexBuilder"]()
    return node.build(folder, vae, name, 64, 64, "center crop", batch_size, "auto", overwrite)["result"]


def test_build_resumes_after_cancel_and_reopens(comfy, pack, monkeypatch):
    monkeypatch.setattr(pack.nodes.references, "SHARD_ROWS", 8)
    folder = image_folder("index-src", 37)
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    bar = []
    previous_hook = comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bar.append((value, total)))
    try:
        first = CountingVAE(vae, cancel_after=3)  # 12 images encoded: one complete shard of 8
        with pytest.raises(mm.InterruptProcessingException):
            build(comfy, "index-src", first)
        mm.interrupt_current_processing(False)
        out = Path(folder_paths.get_folder_paths("spell_sets")[0], "idx")
        assert not (out / "index.safetensors").exists() and (out / "shard-00000.safetensors").exists()

        second = CountingVAE(vae)
        refs, summary = build(comfy, "index-src", second)
    finally:
        mm.interrupt_current_processing(False)  # never leave Cancel pressed for the tests after this one
        comfy_utils.set_progress_bar_global_hook(previous_hook)
    assert summary.startswith("resumed") and second.images == 37 - 8
    assert bar[-1][0] == bar[-1][1] and all(a[0] <= b[0] for a, b in zip(bar, bar[1:]) if a[1] == b[1])
    direct = torch.cat([vae.encode(torch.from_numpy(pack.spell_core.references.read_image(p, 64, 64, "center crop"))[None])
                        for p in sorted(folder.glob("*.png"))])
    assert len(refs) == 37 and torch.equal(refs.index.get(torch.arange(37)), direct.float())

    third = CountingVAE(vae)
    again, summary = build(comfy, "index-src", third)
    assert third.images == 0 and summary.startswith("already built") and len(again) == 37
    # the folder holds the build's files and its lock, nothing else (no temporary, hidden or not, after a cancel)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [
        "index.safetensors", "index.safetensors.lock", "manifest.json", "source.json"]

    loader = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]
    assert "idx/" in loader.INPUT_TYPES()["required"]["set_file"][0]
    loaded = loader().load("(none)", "idx/", 64, 64, "center crop")[0]
    assert torch.equal(loaded.index.get(torch.arange(37)), direct.float())
    x = direct[:3] + 0.01
    assert {(int(i), int(k)) for i, k, _ in zip(*loaded.index.range_search(x, 0.05))} == {(0, 0), (1, 1), (2, 2)}


def test_another_source_is_refused_and_kept_unless_overwrite(comfy):
    image_folder("index-a", 5, seed=1)
    image_folder("index-b", 6, seed=2)
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    build(comfy, "index-a", vae, name="shared")
    out = Path(folder_paths.get_folder_paths("spell_sets")[0], "shared")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="SpellProtectedSetIndexBuilder: .*another source.*overwrite"):
        build(comfy, "index-b", vae, name="shared")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    node = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetIndexBuilder"]
    stamp = node.IS_CHANGED("index-b", "shared")
    refs, summary = build(comfy, "index-b", vae, name="shared", overwrite=True)
    assert len(refs) == 6 and summary.startswith("built")
    assert node.IS_CHANGED("index-b", "shared") != stamp  # a rebuilt (or removed) index re-runs the node
    for bad in ("../escape", "a/b", " "):
        with pytest.raises(ValueError, match="SpellProtectedSetIndexBuilder: .*plain folder name"):
            build(comfy, "index-a", vae, name=bad)
    with pytest.raises(ValueError, match="SpellProtectedSetIndexBuilder: .*does not exist"):
        build(comfy, "no-such-folder", vae)


def test_command_line_builds_from_images_through_a_vae(tmp_path):
    """python -m tools.build_index (its own ComfyUI process) writes the index the node would."""
    import subprocess
    import sys

    from spell_core.index import ReferenceIndex

    src = image_folder("index-cli", 9, seed=3)
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "tools.build_index", "--images", str(src), "--vae", "demo", "--width", "64",
           "--height", "64", "--out", str(tmp_path / "cli"), "--shard-size", "4"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "built: 9 latents of shape (4, 8, 8)" in done.stderr
    index = ReferenceIndex.load(tmp_path / "cli")
    assert len(index) == 9 and len(list((tmp_path / "cli").glob("shard-*.safetensors"))) == 3
    cmd[cmd.index(str(tmp_path / "cli"))] = str(tmp_path / "cli-variants")
    done = subprocess.run(cmd + ["--variants", "shifts"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "built: 81 latents of shape (4, 8, 8)" in done.stderr, done.stderr[-2000:]
    varied = ReferenceIndex.load(tmp_path / "cli-variants")
    assert torch.allclose(varied.get(torch.arange(0, 81, 9)), index.get(torch.arange(9)), atol=1e-5)


def test_index_with_variants_through_the_executor_holds_every_version(comfy, executor):
    """The builder with variants "shifts" in a graph run by ComfyUI's executor: 9 rows per image, the same
    latents as the loader's folder with the same variants (image-major, version 0 the image itself), the
    summary says so, and the loader opens the index folder; another variants choice is another source (refused,
    the index kept); an unknown one is refused naming the node."""
    image_folder("index-variants", 4, seed=5)
    graph = {"1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
             "2": {"class_type": "SpellProtectedSetIndexBuilder", "inputs": {
                 "folder": "index-variants", "vae": ["1", 1], "name": "variants-idx", "width": 64, "height": 64,
                 "resize": "center crop", "batch_size": 4, "backend": "auto", "overwrite": True,
                 "variants": "shifts"}}}
    result = executor.run(graph)
    assert result.success, result.error
    refs, summary = result.outputs["2"]
    assert len(refs) == 4 * 9 and "36 references" in summary and "9 versions of each image" in summary
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    loader = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]()
    folder_set, _ = loader.load("index-variants", "(none)", 64, 64, "center crop", vae=vae, variants="shifts")
    assert torch.allclose(refs.index.get(torch.arange(36)), folder_set.latents, atol=1e-5)
    opened, _ = loader.load("(none)", "variants-idx/", 64, 64, "center crop")
    assert len(opened) == 36
    out = Path(folder_paths.get_folder_paths("spell_sets")[0], "variants-idx")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    graph["2"]["inputs"].update(overwrite=False, variants="shifts + zoom")
    refused = executor.run(graph)
    assert not refused.success and "another source" in refused.error and "overwrite" in refused.error, refused.error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    graph["2"]["inputs"]["variants"] = "sideways"
    refused = executor.run(graph)
    assert not refused.success and "SpellProtectedSetIndexBuilder" in refused.error and "sideways" in refused.error, \
        refused.error
