"""An index folder whose features live in Milvus (engine.json, milvus-lite engine.db), opened by SPELL Protected
Set Loader and sampled through ComfyUI's KSampler: the same shielded outputs, bit for bit, as the local index."""
import json
import shutil
from pathlib import Path

import folder_paths
import pytest
import torch

from helpers import last_log, sample, spell
from test_sampling import nearest64, shield_case

pytest.importorskip("pymilvus", reason="the engine needs pymilvus and milvus-lite (requirements-dev.txt)")


def test_loader_searches_through_the_recorded_engine(comfy, toy_models, conds):
    from spell_core.index import ReferenceIndex, main

    model = toy_models["flow"]
    refs, r = shield_case(comfy, model, conds)
    g = torch.Generator().manual_seed(8)
    filler = refs.latents[:1] + 3.0 * torch.randn((3000,) + refs.latents.shape[1:], generator=g)
    latents = torch.cat([refs.latents, filler])
    folder = Path(folder_paths.get_folder_paths("spell_sets")[0]) / "engine_index"
    shutil.rmtree(folder, ignore_errors=True)
    ReferenceIndex.build(latents).save(folder)
    loader = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]()
    local = loader.load("(none)", "engine_index/", 64, 64, "center crop")[0]
    assert local.index.engine is None
    assert main(["engine", str(folder)]) == 0  # the command an administrator runs once
    assert json.loads((folder / "engine.json").read_text())["rows"] == len(latents)
    remote, summary = loader.load("(none)", "engine_index/", 64, 64, "center crop")
    assert remote.index.engine is not None and "Milvus engine" in summary
    outs = []
    for refs_in in (local, remote):
        patched = spell(comfy, model, r, references=refs_in)
        outs.append(sample(comfy, patched, conds, 4, sampler="dpmpp_2m"))
        assert last_log(patched).n_static == len(latents)
    assert remote.index.engine.requests > 0  # the engine answered the searches
    assert torch.equal(outs[0], outs[1])
    assert (nearest64(model, outs[1], latents) >= r).all()


def test_a_stale_engine_record_is_a_loader_error(comfy):
    from spell_core.index import ReferenceIndex

    folder = Path(folder_paths.get_folder_paths("spell_sets")[0]) / "stale_engine"
    shutil.rmtree(folder, ignore_errors=True)
    ReferenceIndex.build(torch.randn(300, 4, 8, 8)).save(folder)
    (folder / "engine.json").write_text(json.dumps({"engine": "milvus", "uri": "engine.db", "collection": "spell_x",
                                                    "fingerprint": "0" * 64, "rows": 300, "dim": 33}))
    loader = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]()
    with pytest.raises(Exception, match="SpellProtectedSetLoader: .*upload them again"):
        loader.load("(none)", "stale_engine/", 64, 64, "center crop")
