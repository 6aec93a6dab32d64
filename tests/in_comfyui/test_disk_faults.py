"""A full disk and a read-only folder under a batch memory, for real: a small tmpfs mounted on
user/spell/memory/ (needs the right to mount, as root in this project's CI; skipped with the reason where the
machine does not allow it). The run that cannot store its outputs fails naming the memory node and its file, and
the memory stored before is byte-identical afterwards."""
import os
import subprocess
from pathlib import Path

import folder_paths
import pytest


def memory_graph(name, seed):
    return {
        "1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
        "2": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "any digit"}},
        "3": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "(empty)"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "SpellBatchMemory", "inputs": {"name": name, "capacity": 64}},
        "10": {"class_type": "SpellRepellency", "inputs": {
            "model": ["1", 0], "radius": 0.5, "overcompensation": 1.6, "in_batch": "mutual", "start_percent": 0.0,
            "end_percent": 1.0, "enforce_shield": True, "memory": ["6", 0]}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "14": {"class_type": "SpellReport", "inputs": {"model": ["10", 0], "samples": ["11", 0]}},
    }


@pytest.fixture()
def small_memory_folder():
    """user/spell/memory/ on its own 256 kB tmpfs; unmounted afterwards."""
    folder = Path(folder_paths.get_user_directory(), "spell", "memory")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'}): the full-disk "
                    f"and read-only cases need it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_and_read_only_folder_lose_nothing_and_name_the_memory(executor, small_memory_folder):
    name = "disk-fault"
    first = executor.run(memory_graph(name, seed=1))
    assert first.success, first.error
    stored = (small_memory_folder / f"{name}.safetensors").read_bytes()

    filler = small_memory_folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # take what is left, so the next write runs out of space
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    full = executor.run(memory_graph(name, seed=2))
    assert not full.success
    assert "SpellBatchMemory: could not store this run's outputs in" in full.error, full.error
    assert f"{name}.safetensors" in full.error and "No space left on device" in full.error
    assert (small_memory_folder / f"{name}.safetensors").read_bytes() == stored
    filler.unlink()

    subprocess.run(["mount", "-o", "remount,ro", str(small_memory_folder)], check=True)
    read_only = executor.run(memory_graph(name, seed=3))
    assert not read_only.success
    assert "SpellBatchMemory: could not store this run's outputs in" in read_only.error, read_only.error
    assert "Read-only file system" in read_only.error
    assert (small_memory_folder / f"{name}.safetensors").read_bytes() == stored
    assert sorted(p.name for p in small_memory_folder.iterdir() if not p.name.endswith(".lock")) == [
        f"{name}.safetensors"]  # no temporary left behind
    os.sync()
