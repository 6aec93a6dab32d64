"""No file outside ComfyUI's folders is read or written, through the real nodes and ComfyUI's executor: a
memory, count, heads or set name that is a symbolic link (inside the pack's folder) to a file elsewhere, and an
index whose shard list points out of its folder, are refused with the node named, and the outside file is
byte-identical afterwards. Names the file system cannot hold are refused with the node named, not as OSError."""
import json
import os
from pathlib import Path

import folder_paths
import pytest
import torch

from spell_core.index import ReferenceIndex, build_shards, read_header
from spell_core.storage import save_latents
from tools.workflow import Executor


@pytest.fixture
def outside(tmp_path):
    """A folder outside ComfyUI's base directory, with a file in it that must never change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)
    return path


def user_path(*parts) -> Path:
    return Path(folder_paths.get_user_directory(), "spell", *parts)


def preview(node, output=0):
    """PreviewAny (a core output node) on one output, so that the node runs."""
    return {"99": {"class_type": "PreviewAny", "inputs": {"source": [node, output]}}}


def refused(result, node_id):
    assert not result.success, "a path outside ComfyUI's folders was accepted"
    assert f"{node_id}:" in result.error and "outside" in result.error, result.error


@pytest.mark.parametrize("clear", [False, True], ids=["memory", "memory+clear"])
def test_memory_name_linked_outside_is_refused_and_the_target_kept(comfy, outside, clear):
    target = outside / "precious.safetensors"
    save_latents(target, torch.randn(3, 4, 8, 8), {"kind": "batch_memory"})
    before = target.read_bytes()
    link(user_path("memory", "linked_out.safetensors"), target)
    g = {"6": {"class_type": "SpellBatchMemory", "inputs": {"name": "linked_out", "capacity": 5}}}
    if clear:
        g["7"] = {"class_type": "SpellBatchMemoryClear", "inputs": {"memory": ["6", 0]}}
    g.update(preview("7" if clear else "6"))
    refused(Executor().run(g), "SpellBatchMemory")
    assert target.read_bytes() == before


def test_memory_link_inside_the_memory_folder_is_allowed(comfy):
    real = user_path("memory", "real_mem.safetensors")
    real.parent.mkdir(parents=True, exist_ok=True)
    real.unlink(missing_ok=True)
    link(user_path("memory", "alias_mem.safetensors"), Path("real_mem.safetensors"))
    g = {"6": {"class_type": "SpellBatchMemory", "inputs": {"name": "alias_mem", "capacity": 5}}, **preview("6")}
    result = Executor().run(g)
    assert result.success, result.error


def test_count_name_linked_outside_is_refused_with_reset_on(comfy, outside):
    target = outside / "precious.json"
    target.write_text(json.dumps({"format": "spell-fairness-count/1", "classes": ["a", "b"], "counts": [3, 4],
                                  "runs": 2}))
    before = target.read_bytes()
    link(user_path("fairness", "linked_out.json"), target)
    for reset in (True, False):
        g = {"7": {"class_type": "SpellFairnessCount", "inputs": {"name": "linked_out", "reset": reset}},
             **preview("7")}
        refused(Executor().run(g), "SpellFairnessCount")
        assert target.read_bytes() == before


def test_heads_file_linked_outside_is_refused(comfy, outside):
    target = outside / "heads.safetensors"
    save_latents(target, torch.randn(2, 4), {"kind": "attribute_heads"})
    link(Path(folder_paths.get_folder_paths("spell_heads")[0], "linked_out.safetensors"), target)
    g = {"1": {"class_type": "SpellAttributeHeadLoader", "inputs": {"heads_file": "linked_out.safetensors"}},
         **preview("1", 1)}
    refused(Executor().run(g), "SpellAttributeHeadLoader")


def loader_graph(set_file):
    return {"1": {"class_type": "SpellProtectedSetLoader", "inputs": {
        "folder": "(none)", "set_file": set_file, "width": 64, "height": 64, "resize": "center crop"}},
        **preview("1", 1)}


def test_set_file_linked_outside_is_refused(comfy, outside):
    target = outside / "set.safetensors"
    save_latents(target, torch.randn(3, 4, 8, 8), {"kind": "protected_set"})
    before = target.read_bytes()
    link(Path(folder_paths.get_folder_paths("spell_sets")[0], "linked_out.safetensors"), target)
    refused(Executor().run(loader_graph("linked_out.safetensors")), "SpellProtectedSetLoader")
    assert target.read_bytes() == before


def test_index_whose_shard_list_points_outside_is_refused(comfy, outside):
    """models/spell_sets/<name>/index.safetensors listing ../../../../outside/shard-00000.safetensors."""
    files = build_shards([torch.randn(32, 4, 8, 8)], outside, shard_size=32)
    folder = Path(folder_paths.get_folder_paths("spell_sets")[0], "escaping_index")
    ReferenceIndex.build(files).save(folder)
    listed = json.loads(read_header(folder / "index.safetensors")[0]["__metadata__"]["shards"])
    assert listed[0].startswith("..")  # the index really lists a path out of its folder
    before = files[0].read_bytes()
    refused(Executor().run(loader_graph("escaping_index/")), "SpellProtectedSetLoader")
    assert files[0].read_bytes() == before
    # the same shards inside the folder load
    inner = Path(folder_paths.get_folder_paths("spell_sets")[0], "contained_index")
    ReferenceIndex.build(build_shards([torch.randn(32, 4, 8, 8)], inner, shard_size=32)).save(inner)
    result = Executor().run(loader_graph("contained_index/"))
    assert result.success, result.error


@pytest.mark.parametrize("name, message", [("bad\x00name", "NUL byte"), ("x" * 300, "at most 255 bytes")],
                         ids=["nul", "long"])
def test_save_names_the_file_system_cannot_hold_name_the_node(comfy, name, message):
    g = {"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "1": {"class_type": "SpellProtectedSetLoader", "inputs": {
             "folder": "(none)", "set_file": "(none)", "width": 64, "height": 64, "resize": "center crop",
             "latent": ["4", 0]}},
         "2": {"class_type": "SpellProtectedSetSave", "inputs": {"references": ["1", 0], "name": name,
                                                                 "overwrite": False}}}
    result = Executor().run(g)
    assert not result.success and "SpellProtectedSetSave:" in result.error and message in result.error, result.error
    assert "embedded null byte" not in result.error and "File name too long" not in result.error


def test_index_builder_refuses_links_out_of_its_folder(comfy, outside):
    from PIL import Image

    images = Path(folder_paths.get_input_directory(), "containment_images")
    images.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.new("RGB", (64, 64), (40 * k, 80, 120)).save(images / f"{k}.png")
    target = outside / "source.json"
    target.write_text("{}")
    before = target.read_bytes()
    out = Path(folder_paths.get_folder_paths("spell_sets")[0], "linked_index")
    link(out / "source.json", target)
    g = {"1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
         "2": {"class_type": "SpellProtectedSetIndexBuilder", "inputs": {
             "folder": "containment_images", "vae": ["1", 1], "name": "linked_index", "width": 64, "height": 64,
             "resize": "center crop", "batch_size": 2, "backend": "auto", "overwrite": True}}}
    refused(Executor().run(g), "SpellProtectedSetIndexBuilder")
    assert target.read_bytes() == before and os.path.islink(out / "source.json")


@pytest.mark.parametrize("name, message", [("bad\x00name", "NUL byte"), ("y" * 300, "at most 255 bytes")],
                         ids=["nul", "long"])
def test_index_names_the_file_system_cannot_hold_name_the_node(comfy, name, message):
    from PIL import Image

    images = Path(folder_paths.get_input_directory(), "containment_images")
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (10, 80, 120)).save(images / "0.png")
    g = {"1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
         "2": {"class_type": "SpellProtectedSetIndexBuilder", "inputs": {
             "folder": "containment_images", "vae": ["1", 1], "name": name, "width": 64, "height": 64,
             "resize": "center crop", "batch_size": 2, "backend": "auto", "overwrite": False}}}
    result = Executor().run(g)
    assert not result.success and "SpellProtectedSetIndexBuilder:" in result.error and message in result.error, \
        result.error
    assert "embedded null byte" not in result.error and "File name too long" not in result.error


def test_input_image_linked_outside_is_refused(comfy, outside):
    from PIL import Image

    target = outside / "private.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(target)
    folder = Path(folder_paths.get_input_directory(), "linked_images")
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (10, 10, 200)).save(folder / "0.png")  # an image of its own, and one linked out
    link(folder / "1.png", target)
    g = {"1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
         "2": {"class_type": "SpellProtectedSetLoader", "inputs": {
             "folder": "linked_images", "set_file": "(none)", "width": 64, "height": 64, "resize": "center crop",
             "vae": ["1", 1]}}, **preview("2", 1)}
    refused(Executor().run(g), "SpellProtectedSetLoader")
