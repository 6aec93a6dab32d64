"""spell_core.build: index folders from a folder of images through an encoder, streamed, resumable, and never
replacing an index built from another source."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spell_core.build import SOURCE_FILE, build_from_images, owned_files
from spell_core.index import ReferenceIndex, main
from spell_core.storage import StorageError, save_latents


def encode(pixels):
    """A stand-in encoder: [b, H, W, 3] -> [b, 3, H/8, W/8] block means (any deterministic map will do)."""
    b, h, w, _ = pixels.shape
    return pixels.permute(0, 3, 1, 2).reshape(b, 3, h // 8, 8, w // 8, 8).mean((3, 5))


def images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    return folder


def test_images_build_resume_and_reopen(tmp_path):
    src = images(tmp_path / "imgs", 30)
    seen = []

    def counting(pixels, stop_after=None):
        seen.append(len(pixels))
        if stop_after is not None and len(seen) > stop_after:
            raise KeyboardInterrupt
        return encode(pixels)

    with pytest.raises(KeyboardInterrupt):
        build_from_images(src, tmp_path / "idx", 32, 32, "center crop", lambda p: counting(p, 3), "enc",
                          batch=4, shard_size=8)
    seen.clear()
    stages = []
    index, what = build_from_images(src, tmp_path / "idx", 32, 32, "center crop", counting, "enc", batch=4,
                                    shard_size=8, progress=lambda *a: stages.append(a))
    assert what == "resumed an interrupted build" and sum(seen) == 30 - 8
    assert stages[-1] == ("index", 30, 30) and ("encode", 30, 30) in stages
    full, _ = build_from_images(src, tmp_path / "fresh", 32, 32, "center crop", encode, "enc", batch=7)
    assert torch.equal(index.get(torch.arange(30)), full.get(torch.arange(30)))
    seen.clear()
    again, what = build_from_images(src, tmp_path / "idx", 32, 32, "center crop", counting, "enc", shard_size=8)
    assert what.startswith("already built") and seen == [] and len(again) == 30
    assert json.loads((tmp_path / "idx" / SOURCE_FILE).read_text())["files"] == 30


@pytest.mark.parametrize("change", ["file", "encoder", "size"])
def test_another_source_is_refused_and_left_intact(tmp_path, change):
    src = images(tmp_path / "imgs", 6)
    build_from_images(src, tmp_path / "idx", 32, 32, "stretch", encode, "enc")
    before = {p.name: p.read_bytes() for p in owned_files(tmp_path / "idx")}
    args = dict(width=32, encoder="enc")
    if change == "file":
        images(src, 7, seed=1)
    elif change == "encoder":
        args["encoder"] = "other"
    else:
        args["width"] = 48
    with pytest.raises(StorageError, match="another source.*overwrite"):
        build_from_images(src, tmp_path / "idx", args["width"], 32, "stretch", encode, args["encoder"])
    assert {p.name: p.read_bytes() for p in owned_files(tmp_path / "idx")} == before
    index, what = build_from_images(src, tmp_path / "idx", args["width"], 32, "stretch", encode, args["encoder"],
                                    overwrite=True)
    assert what == "built" and len(index) == len(list(src.glob("*.png")))
    assert ReferenceIndex.load(tmp_path / "idx").item_shape == index.item_shape


def test_empty_folder_and_bad_encoder_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="holds no images"):
        build_from_images(tmp_path / "empty", tmp_path / "idx", 32, 32, "stretch", encode, "enc")
    src = images(tmp_path / "imgs", 3)
    with pytest.raises(StorageError, match="NaN"):
        build_from_images(src, tmp_path / "idx2", 32, 32, "stretch", lambda p: encode(p) * float("nan"), "enc")
    with pytest.raises(StorageError, match="returned 1 latents for 3 images"):
        build_from_images(src, tmp_path / "idx3", 32, 32, "stretch", lambda p: encode(p)[:1], "enc")


def test_cli_refuses_another_source_unless_overwrite(tmp_path, capsys):
    src = tmp_path / "latents"
    src.mkdir()
    save_latents(src / "a.safetensors", torch.randn(20, 4, 4, 4))
    out = str(tmp_path / "out")
    assert main(["build", "--latents-dir", str(src), "--out", out]) == 0
    save_latents(src / "b.safetensors", torch.randn(5, 4, 4, 4))
    with pytest.raises(SystemExit, match="another source"):
        main(["build", "--latents-dir", str(src), "--out", out])
    assert len(ReferenceIndex.load(out)) == 20
    assert main(["build", "--latents-dir", str(src), "--out", out, "--overwrite"]) == 0
    assert len(ReferenceIndex.load(out)) == 25


def test_a_build_that_failed_before_its_first_shard_can_be_queued_again_after_the_fix(tmp_path):
    """One bad image stops the build before any shard is written; with the image removed (another source now),
    queueing again builds, and no temporary of the failed build is left."""
    src = images(tmp_path / "imgs", 6)
    (src / "002.png").write_bytes(b"not an image")
    with pytest.raises(StorageError, match="002.png is not a readable image"):
        build_from_images(src, tmp_path / "idx", 32, 32, "stretch", encode, "enc")
    assert not any(p.name.startswith("shard-") for p in (tmp_path / "idx").iterdir())
    (src / "002.png").unlink()
    index, what = build_from_images(src, tmp_path / "idx", 32, 32, "stretch", encode, "enc")
    assert what == "built" and len(index) == 5
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.endswith(".tmp")]


def test_variants_rows_resume_mid_image_and_record(tmp_path):
    """With variants every image is that many rows, image-major (row i·V + v is version v of image i, as
    ``variants.make`` orders them); a build interrupted after a shard that ends inside an image's versions resumes
    to the same rows as a fresh build; the variants are part of the source, so a folder built plainly is refused."""
    from spell_core.references import read_image
    from spell_core.variants import make, preset

    src = images(tmp_path / "imgs", 5)
    spec = preset("shifts")  # 9 versions; shards of 8 rows end inside images 0..4
    calls = []

    def counting(pixels, stop_after=None):
        calls.append(len(pixels))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return encode(pixels)

    with pytest.raises(KeyboardInterrupt):
        build_from_images(src, tmp_path / "idx", 32, 32, "stretch", lambda p: counting(p, 8), "enc", batch=4,
                          shard_size=8, variants_name="shifts")
    assert max(calls) <= 4  # batch counts rows given to the encoder, versions included
    calls.clear()
    index, what = build_from_images(src, tmp_path / "idx", 32, 32, "stretch", counting, "enc", batch=4,
                                    shard_size=8, variants_name="shifts")
    # the interruption came inside image 2's versions, so images 0 and 1 (18 rows) were delivered and 2 shards
    # (16 rows) kept: the resume starts in image 1 (rows 9..17), encodes it whole and drops its first 7 rows;
    # image 0 is not read again
    assert what == "resumed an interrupted build" and sum(calls) == 4 * 9
    files = sorted(src.glob("*.png"))
    pixels = torch.from_numpy(np.stack([read_image(p, 32, 32, "stretch") for p in files]))
    expected = encode(make(pixels, spec))
    assert len(index) == 5 * 9 and torch.allclose(index.get(torch.arange(45)), expected, atol=1e-6)
    assert torch.allclose(index.get(torch.arange(0, 45, 9)), encode(pixels), atol=1e-6)  # version 0: the image
    fresh, _ = build_from_images(src, tmp_path / "fresh", 32, 32, "stretch", encode, "enc", batch=5,
                                 variants_name="shifts")
    assert torch.equal(fresh.get(torch.arange(45)), index.get(torch.arange(45)))
    assert json.loads((tmp_path / "idx" / SOURCE_FILE).read_text())["settings"]["variants"] == "shifts"
    with pytest.raises(StorageError, match="another source.*overwrite"):
        build_from_images(src, tmp_path / "idx", 32, 32, "stretch", encode, "enc")
    assert len(ReferenceIndex.load(tmp_path / "idx")) == 45
    plain, _ = build_from_images(src, tmp_path / "plain", 32, 32, "stretch", encode, "enc")
    assert "variants" not in json.loads((tmp_path / "plain" / SOURCE_FILE).read_text())["settings"]
    with pytest.raises(ValueError, match="unknown variants"):
        build_from_images(src, tmp_path / "bad", 32, 32, "stretch", encode, "enc", variants_name="flips")
