"""Hostile files give a clear error naming the file and the fix, never a raw exception: an image whose header
claims 20000 x 20000 px (Pillow's DecompressionBombError before), set files of the wrong rank or with metadata
that is not a JSON object (a bare ValueError / TypeError before)."""
import json
import struct
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from spell_core.references import MAX_IMAGE_PIXELS, ReferenceSet, read_image
from spell_core.storage import FORMAT, StorageError, load_latents


def huge_png(path, width, height):
    """A small PNG whose header claims width x height (a decompression bomb as Pillow sees it on open)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_image_over_the_size_limit_is_refused_with_the_limit_stated(tmp_path):
    path = tmp_path / "big.png"
    huge_png(path, 10000, 10000)  # over Pillow's limit, under twice it: Pillow only warns
    with pytest.raises(StorageError, match=r"big.png is 10000 x 10000 px \(100.0 megapixels\); the largest image "
                                           r"read is 89.5 megapixels"):
        read_image(path, 64, 64, "center crop")
    path = tmp_path / "bomb.png"
    huge_png(path, 20000, 20000)  # over twice: Pillow refuses at open
    with pytest.raises(StorageError, match=r"bomb.png is too large .*400000000 pixels.*; the largest image read is "
                                           r"89.5 megapixels"):
        read_image(path, 64, 64, "center crop")


def test_image_at_the_limit_is_read(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (300, 200), (255, 0, 0)).save(path)
    assert MAX_IMAGE_PIXELS >= 300 * 200
    assert read_image(path, 64, 64, "stretch").shape == (64, 64, 3)


@pytest.mark.parametrize("shape", [(5, 16), (5,), (5, 4, 8)])
def test_set_file_of_the_wrong_rank_is_refused(tmp_path, shape):
    path = tmp_path / "flat.safetensors"
    save_file({"latents": torch.zeros(shape)}, str(path), metadata={"format": FORMAT, "meta": "{}"})
    with pytest.raises(StorageError, match=r"flat.safetensors holds latents of shape .*; a SPELL set holds latents "
                                           r"\[N, channels, height, width\]"):
        ReferenceSet.load(path)


@pytest.mark.parametrize("meta", [[1, 2], "text", 3])
def test_set_file_with_metadata_that_is_not_an_object_is_refused(tmp_path, meta):
    path = tmp_path / "meta.safetensors"
    save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(path), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    with pytest.raises(StorageError, match=f"meta.safetensors has metadata of type {type(meta).__name__}, not a JSON "
                                           f"object"):
        load_latents(path)
