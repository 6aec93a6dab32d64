"""The demo's shipped digit split (demo/weights/demo_digits.safetensors) is scikit-learn's split, bit for bit,
and the example inputs are written once into a fresh input folder and never over an existing one."""
import torch

from demo.data import digits_split, sklearn_split, to_images16
from demo.example_inputs import PROTECTED_COUNT, PROTECTED_FOLDER, ensure_protected_digits


def test_shipped_split_is_sklearns():
    shipped, fresh = digits_split(), sklearn_split()
    for part in ("train", "test"):
        images, labels = shipped[part]
        assert torch.equal(labels, fresh[f"{part}_labels"].long())
        assert torch.equal(images, to_images16(fresh[f"{part}_images"].numpy().astype("float32")))
    assert len(shipped["train"][1]) == 1437 and len(shipped["test"][1]) == 360


def test_example_inputs_written_once_and_never_over_a_users_folder(tmp_path):
    folder = ensure_protected_digits(tmp_path)
    assert folder == tmp_path / PROTECTED_FOLDER
    assert len(list(folder.glob("*.png"))) == PROTECTED_COUNT
    (folder / "000.png").write_bytes(b"the user's own file")
    assert ensure_protected_digits(tmp_path) is None
    assert (folder / "000.png").read_bytes() == b"the user's own file"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / PROTECTED_FOLDER).symlink_to(elsewhere)
    assert ensure_protected_digits(tmp_path / "other") is None
    assert list(elsewhere.iterdir()) == []
