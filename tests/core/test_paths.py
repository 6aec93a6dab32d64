"""The one containment rule (spell_core.paths.contained) alone: real paths must stay inside the base's own real
path, for names that exist and names that do not yet; names the file system cannot hold are refused clearly."""
import os
from pathlib import Path

import pytest

from spell_core.index import ReferenceIndex, build_shards, folder_within
from spell_core.paths import PathRefused, contained, find_in
from spell_core.storage import StorageError, inside


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "comfy" / "models" / "spell_sets"
    base.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"not yours")
    (base / "own.safetensors").write_bytes(b"ours")
    return base, outside


def test_plain_names_inside_resolve_to_their_real_path(tree):
    base, _ = tree
    assert contained(base, "own.safetensors") == (base / "own.safetensors").resolve()
    assert contained(base, "new_file.safetensors") == base.resolve() / "new_file.safetensors"  # does not exist yet
    assert contained(base, "sub/deeper/new.json") == base.resolve() / "sub" / "deeper" / "new.json"
    assert contained(base, "sub/../own.safetensors") == (base / "own.safetensors").resolve()  # '..' that stays inside


def test_symlink_out_is_refused_for_existing_and_dangling_targets(tree):
    base, outside = tree
    (base / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (base / "dangling.safetensors").symlink_to(outside / "not_yet.safetensors")
    (base / "dir_link").symlink_to(outside, target_is_directory=True)
    for name in ("link.safetensors", "dangling.safetensors", "dir_link/new.safetensors", "dir_link"):
        with pytest.raises(PathRefused, match="outside") as e:
            contained(base, name, "memory file")
        assert "memory file" in str(e.value) and str(outside) in str(e.value) and "symbolic link" in str(e.value)
    assert (outside / "secret.safetensors").read_bytes() == b"not yours"


def test_symlink_inside_the_base_is_allowed(tree):
    base, _ = tree
    (base / "alias.safetensors").symlink_to(base / "own.safetensors")
    (base / "sub").mkdir()
    (base / "sub" / "up.safetensors").symlink_to(Path("..") / "own.safetensors")
    assert contained(base, "alias.safetensors") == (base / "own.safetensors").resolve()
    assert contained(base, "sub/up.safetensors") == (base / "own.safetensors").resolve()


def test_dotdot_and_absolute_paths_out_are_refused(tree):
    base, outside = tree
    for name in ("../x.safetensors", "../../../../etc/passwd", "a/../../x", str(outside / "secret.safetensors"),
                 "/etc/passwd"):
        with pytest.raises(PathRefused, match="outside"):
            contained(base, name)
    # an absolute path that names a file inside the base is inside
    assert contained(base, str(base / "own.safetensors")) == (base / "own.safetensors").resolve()
    # a sibling whose name starts like the base is not inside it
    sibling = base.parent / (base.name + "_evil")
    sibling.mkdir()
    with pytest.raises(PathRefused):
        contained(base, f"../{sibling.name}/x")


def test_names_the_file_system_cannot_hold_are_refused_clearly(tree):
    base, _ = tree
    with pytest.raises(PathRefused, match="NUL byte"):
        contained(base, "bad\x00name.safetensors", "set name")
    with pytest.raises(PathRefused, match="at most 255 bytes"):
        contained(base, "x" * 300 + ".safetensors")
    with pytest.raises(PathRefused, match="at most 255 bytes"):
        contained(base, "é" * 130)  # 260 bytes in UTF-8, 130 characters
    with pytest.raises(PathRefused, match="more than 4095 bytes"):
        contained(base, "/".join(["d" * 200] * 25))
    for empty in ("", "   "):
        with pytest.raises(PathRefused, match="empty"):
            contained(base, empty)
    assert contained(base, "x" * 255) == base.resolve() / ("x" * 255)  # the longest name that fits


def test_a_base_that_is_itself_a_symlink_still_works(tmp_path):
    """ComfyUI's models/ linked to another disk: the base's own real path is the reference."""
    disk = tmp_path / "big_disk" / "models"
    (disk / "spell_sets").mkdir(parents=True)
    (disk / "spell_sets" / "set.safetensors").write_bytes(b"x")
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "models").symlink_to(disk, target_is_directory=True)
    base = comfy / "models" / "spell_sets"
    assert contained(base, "set.safetensors") == disk.resolve() / "spell_sets" / "set.safetensors"
    assert contained(base, "new.safetensors") == disk.resolve() / "spell_sets" / "new.safetensors"
    with pytest.raises(PathRefused):
        contained(base, "../../../ComfyUI/x")  # still nothing outside the real base


def test_inside_and_find_in_use_the_same_rule(tree):
    base, outside = tree
    (base / "link.safetensors").symlink_to(outside / "secret.safetensors")
    with pytest.raises(StorageError, match="outside"):  # PathRefused is a StorageError: callers keep catching it
        inside(base, "link.safetensors")
    with pytest.raises(StorageError, match="NUL"):
        inside(base, "a\x00")
    other = base.parent / "other"
    other.mkdir()
    assert find_in([other, base], "own.safetensors") == (base / "own.safetensors").resolve()
    assert find_in([other, base], "missing.safetensors") is None
    with pytest.raises(PathRefused):
        find_in([other, base], "link.safetensors")  # a link out is refused, not skipped


def test_index_shards_listed_outside_the_folder_are_refused(tmp_path):
    import torch

    outside = tmp_path / "outside"
    files = build_shards([torch.randn(64, 4, 4, 4)], outside, shard_size=64)
    idx = tmp_path / "models" / "spell_sets" / "idx"
    ReferenceIndex.build(files).save(idx)  # its index lists ../../../outside/shard-00000.safetensors
    assert len(ReferenceIndex.load(idx)) == 64  # library use: shards may lie anywhere
    with pytest.raises(PathRefused, match="lists a shard .*outside"):
        ReferenceIndex.load(idx, within=idx)
    with pytest.raises(PathRefused, match="outside"):
        folder_within(idx)
    inner = tmp_path / "inner"
    ReferenceIndex.build(build_shards([torch.randn(64, 4, 4, 4)], inner, shard_size=64)).save(inner)
    assert len(ReferenceIndex.load(inner, within=inner)) == 64
    folder_within(inner)
    os.symlink(outside / "shard-00000.safetensors", inner / "shard-00001.safetensors")
    with pytest.raises(PathRefused, match="outside"):
        folder_within(inner)


def test_the_command_line_build_refuses_a_folder_with_a_link_out_and_touches_nothing(tmp_path):
    import torch

    from spell_core.index import main
    from spell_core.storage import save_latents

    lat = tmp_path / "lat"
    save_latents(lat / "a.safetensors", torch.randn(32, 4, 4, 4))
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shard-00000.safetensors"
    secret.write_bytes(b"not yours")
    out = tmp_path / "idx"
    out.mkdir()
    (out / "shard-00000.safetensors").symlink_to(secret)  # a resumed build would have read or replaced it
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="shard-00000.safetensors.*outside"):
            main(["build", "--latents-dir", str(lat), "--out", str(out), "--shard-size", "16", *extra])
        assert secret.read_bytes() == b"not yours"
        assert sorted(p.name for p in out.iterdir()) == ["index.safetensors.lock", "shard-00000.safetensors"]
