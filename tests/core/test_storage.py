"""Files: set and memory round trips, atomic writes, refusal of bad files, FIFO memory, encoding cache."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from spell_core import BatchMemory, ReferenceSet, StorageError, load_latents, open_memory, save_latents
from spell_core.memory import forget_loaded
from spell_core.references import EncodingCache, encode_folder, fit_image
from spell_core.storage import inside


def test_latents_round_trip_with_meta(tmp_path):
    x = torch.randn(3, 4, 8, 8)
    save_latents(tmp_path / "a.safetensors", x, {"sources": ["x"]})
    y, meta = load_latents(tmp_path / "a.safetensors")
    assert torch.equal(x, y) and meta == {"sources": ["x"]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_unreadable_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(StorageError, match="bad.safetensors"):
        load_latents(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_latents(path, torch.randn(4, 4, 8, 8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StorageError, match="not a readable safetensors"):
        load_latents(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(StorageError, match="not a SPELL latent set"):
        load_latents(tmp_path / "w.safetensors")


def test_nan_refused():
    with pytest.raises(StorageError, match="NaN"):
        ReferenceSet(torch.tensor([[[float("nan")]]]))


def test_paths_stay_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    assert inside(tmp_path, "sub") == (tmp_path / "sub").resolve()
    for bad in ("../x", "/etc", "sub/../../x"):
        with pytest.raises(StorageError, match="outside"):
            inside(tmp_path, bad)
    os.symlink("/tmp", tmp_path / "link")
    with pytest.raises(StorageError, match="outside"):
        inside(tmp_path, "link")


def test_memory_fifo_capacity_and_restart(tmp_path):
    path = tmp_path / "m.safetensors"
    mem = open_memory(path, capacity=5)
    for n in range(3):
        mem.append(torch.full((2, 4, 2, 2), float(n)))
    x = mem.latents()
    assert x.shape[0] == 5 and x[:, 0, 0, 0].tolist() == [0, 1, 1, 2, 2]  # the oldest left first
    forget_loaded()  # what a restart does to the process
    again = open_memory(path, capacity=5)
    assert again is not mem and torch.equal(again.latents(), x)
    again.clear()
    assert len(again) == 0 and not path.exists()


def test_memory_refuses_other_shapes_and_keeps_its_data(tmp_path):
    mem = BatchMemory(tmp_path / "m.safetensors", 10)
    mem.append(torch.zeros(2, 4, 8, 8))
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(StorageError, match="another model family or size"):
        mem.append(torch.zeros(2, 16, 8, 8))
    with pytest.raises(StorageError, match="NaN"):
        mem.append(torch.full((1, 4, 8, 8), float("inf")))
    assert (tmp_path / "m.safetensors").read_bytes() == before


def test_damaged_memory_file_is_reported_not_overwritten(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"garbage")
    mem = BatchMemory(path, 10)
    with pytest.raises(StorageError):
        mem.append(torch.zeros(1, 4, 8, 8))
    assert path.read_bytes() == b"garbage"


def test_fit_image_crop_and_stretch():
    img = Image.fromarray(np.concatenate([np.zeros((10, 10, 3)), np.full((10, 30, 3), 255)], 1).astype(np.uint8))
    crop = fit_image(img, 8, 8, "center crop")
    stretch = fit_image(img, 8, 8, "stretch")
    assert crop.shape == stretch.shape == (8, 8, 3)
    assert crop.min() > 0.9  # the centred 10x10 window is all white
    assert stretch[:, 0].max() < 0.1  # stretching keeps the black left quarter


def test_encoding_cache_skips_known_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * n, np.uint8)).save(folder / f"{n}.png")
    calls = []

    def encode(pixels):
        calls.append(1)
        return pixels.mean(-1)[:, None, ::8, ::8]

    cache = EncodingCache(tmp_path / "cache")
    first, n1 = encode_folder(folder, 16, 16, "stretch", "enc", encode, cache)
    second, n2 = encode_folder(folder, 16, 16, "stretch", "enc", encode, cache)
    assert (n1, n2, len(calls)) == (3, 0, 3) and torch.equal(first, second)
    _, n3 = encode_folder(folder, 16, 16, "stretch", "another-vae", encode, cache)
    assert n3 == 3
    (folder / "junk.png").write_bytes(b"not an image")
    with pytest.raises(StorageError, match="junk.png"):
        encode_folder(folder, 16, 16, "stretch", "enc", encode, cache)


def test_atomic_save_writes_through_its_own_named_temporary_only(tmp_path):
    """Every name that appears in the folder during a save is the target or ``<name>.<pid>-<random>.tmp`` (which
    remove_stale_temporaries can attribute to its writer); safetensors' own ``save_file`` would add a
    ``.tmpXXXXXX`` that a killed process leaves behind."""
    import os
    import re
    import threading

    from spell_core.storage import atomic_save

    seen, done = set(), threading.Event()

    def poll():
        while not done.is_set():
            seen.update(os.listdir(tmp_path))

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        for _ in range(3):
            atomic_save({"x": torch.zeros(8_000_000)}, tmp_path / "big.safetensors", {})
    finally:
        done.set()
        watcher.join()
    own = re.compile(rf"big\.safetensors\.{os.getpid()}-\w+\.tmp")
    assert "big.safetensors" in seen and any(own.fullmatch(n) for n in seen)  # the poll saw the write happen
    assert {n for n in seen if n != "big.safetensors" and not own.fullmatch(n)} == set()
