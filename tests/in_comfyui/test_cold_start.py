"""Cold start through SPELL Protected Set Loader: opening an index folder whose files are not in the page cache (as
after a reboot) starts reading them in the background, says so in its summary, and says why when the folder is
too large for the memory available (then nothing is read)."""
import importlib
import shutil
from pathlib import Path

import folder_paths
import torch
from support import evict_or_skip


def pagecache(pack):
    """The pack's own spell_core.index.pagecache (the module its loader uses)."""
    return importlib.import_module(f"{pack.__name__}.spell_core.index.pagecache")


def index_folder(name, n=12000):
    from spell_core.index import ReferenceIndex

    folder = Path(folder_paths.get_folder_paths("spell_sets")[0], name)
    shutil.rmtree(folder, ignore_errors=True)
    ReferenceIndex.build(torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(3))).save(folder)
    return folder


def test_loader_reads_an_evicted_index_folder_ahead(comfy, pack):
    pc = pagecache(pack)
    folder = index_folder("cold_index")
    shards = sorted(folder.glob("shard-*.safetensors"))
    evict_or_skip(shards + [folder / "index.safetensors"], pc)
    refs, summary = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]().load("(none)", "cold_index/", 64, 64,
                                                                                "center crop")
    assert "read into the page cache in the background" in summary, summary
    assert refs.index.warmup.wait(60) and refs.index.warmup.error is None
    assert pc.resident_fraction(shards) >= 0.99


def test_loader_says_why_a_folder_too_large_is_not_read_ahead(comfy, pack, monkeypatch):
    pc = pagecache(pack)
    folder = index_folder("cold_index_large")
    shards = sorted(folder.glob("shard-*.safetensors"))
    cold = evict_or_skip(shards, pc)
    monkeypatch.setattr(pc, "WARM_SHARE", 1e-9)  # the limit: a billionth of the memory available
    refs, summary = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]().load("(none)", "cold_index_large/", 64, 64,
                                                                                "center crop")
    assert "not read ahead: more than" in summary, summary
    assert refs.index.warmup.thread is None
    assert pc.resident_fraction(shards) <= cold + 0.01
    assert len(refs.index.range_search(refs.index.get(torch.arange(2)), 0.01)[0]) == 2  # searched from disk
