"""The Milvus engine (spell_core.index.engine) as the candidate stage of ReferenceIndex: exact against brute
force through a real milvus-lite database and a real milvus-lite gRPC server (the client's path to a cluster),
full answers asked again with a larger limit, loud failures (answers past the largest limit, stale records,
missing collections, no server)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from spell_core.index import ReferenceIndex, main
from spell_core.index.engine import (ENGINE_FILE, EngineError, MilvusEngine, collection_name, fingerprint,
                                     upload_folder)
from support import brute

pytest.importorskip("pymilvus", reason="the engine's tests need pymilvus and milvus-lite (requirements-dev.txt)")

SHAPE = (4, 8, 8)


def structured(n, seed=0, groups=40):
    """Smooth fields (upsampled 2x2 noise) in groups of near-duplicates: PCA bounds work, neighbours exist."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.randn(groups, 4, 2, 2, generator=g), size=SHAPE[1:], mode="bilinear")
    return base[torch.arange(n) % groups] + 0.05 * torch.randn(n, *SHAPE, generator=g)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An index folder of 2,000 references with its features uploaded to milvus-lite (engine.db inside it)."""
    d = tmp_path_factory.mktemp("engine") / "set"
    z = structured(2000)
    ReferenceIndex.build(z).save(d)
    upload_folder(ReferenceIndex.load(d, engine=False), d)
    return d, z


def test_load_attaches_the_recorded_engine_and_matches_brute_force(folder):
    d, z = folder
    rec = json.loads((d / ENGINE_FILE).read_text())
    assert rec["uri"] == "engine.db" and rec["rows"] == len(z) and (d / "engine.db").is_dir()
    index = ReferenceIndex.load(d)
    assert isinstance(index.engine, MilvusEngine)
    local = ReferenceIndex.load(d, engine=False)
    assert local.engine is None
    matches_brute_force(index, z, seed=3, local=local)


def matches_brute_force(index, z, seed, local=None):
    """Queries near 8 references, radii from none to all: every answer equals brute force's (and the local
    index's); the radii reach real neighbours, not only empty answers."""
    g = torch.Generator().manual_seed(seed)
    x = z[torch.randint(0, len(z), (8,), generator=g)] + 0.08 * torch.randn(8, *SHAPE, generator=g)
    found = 0
    for r in (0.01, 0.06, 0.1, 0.3, 2.0):
        got, want = index.range_search(x, r), brute(x, z, r)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"pairs differ from brute force at r={r}"
        assert torch.equal(got[2], want[2])
        if local is not None:
            assert all(torch.equal(a, b) for a, b in zip(got, local.range_search(x, r)))
        found += len(got[0])
    assert found > 100


def test_full_answers_are_asked_again_not_cut(folder):
    """A first limit of 4 hits per query: queries with 50 neighbours each still get all of them."""
    d, z = folder
    index = ReferenceIndex.load(d)
    index.engine.page = 4
    x = z[:4] + 0.01
    before = index.engine.requests
    got, want = index.range_search(x, 0.5), brute(x, z, 0.5)
    assert min(int((want[0] == q).sum()) for q in range(4)) > 16  # more than the first limit for every query
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert index.engine.requests - before >= 3  # asked again with larger limits


def test_more_candidates_than_milvus_returns_fail_loudly(tmp_path):
    """More candidates for one query than the largest limit: an error, never a cut answer."""
    z = torch.cat([torch.zeros(40, *SHAPE), structured(200)])
    ReferenceIndex.build(z).save(tmp_path)
    index = ReferenceIndex.load(tmp_path, engine=False)
    eng = upload_folder(index, tmp_path)
    eng.page, eng.max_limit = 2, 32
    with pytest.raises(EngineError, match="would be cut"):
        index.range_search(torch.zeros(1, *SHAPE), 0.01)
    eng.max_limit = 64  # room for the 40: the same query is answered exactly
    got, want = index.range_search(torch.zeros(1, *SHAPE), 0.01), brute(torch.zeros(1, *SHAPE), z, 0.01)
    assert torch.equal(got[1], want[1]) and len(want[1]) == 40


def test_a_rebuilt_folder_refuses_its_stale_record(tmp_path):
    ReferenceIndex.build(structured(300, seed=1)).save(tmp_path)
    upload_folder(ReferenceIndex.load(tmp_path, engine=False), tmp_path)
    ReferenceIndex.build(structured(300, seed=2)).save(tmp_path)  # other images, same folder
    with pytest.raises(EngineError, match="upload them again"):
        ReferenceIndex.load(tmp_path)
    assert ReferenceIndex.load(tmp_path, engine=False).engine is None  # still opens locally


def test_a_missing_collection_is_an_error_not_a_local_fallback(tmp_path):
    ReferenceIndex.build(structured(300)).save(tmp_path)
    index = ReferenceIndex.load(tmp_path, engine=False)
    upload_folder(index, tmp_path)
    rec = json.loads((tmp_path / ENGINE_FILE).read_text())
    rec["collection"] = "spell_missing"
    (tmp_path / ENGINE_FILE).write_text(json.dumps(rec))
    with pytest.raises(EngineError, match="no collection spell_missing"):
        ReferenceIndex.load(tmp_path)


def test_an_unreachable_server_names_the_uri(tmp_path):
    ReferenceIndex.build(structured(100)).save(tmp_path)
    index = ReferenceIndex.load(tmp_path, engine=False)
    with pytest.raises(EngineError, match="127.0.0.1:9"):
        upload_folder(index, tmp_path, uri="http://127.0.0.1:9")
    assert not (tmp_path / ENGINE_FILE).exists()


def test_a_database_outside_the_folder_is_refused(tmp_path):
    ReferenceIndex.build(structured(100)).save(tmp_path / "set")
    index = ReferenceIndex.load(tmp_path / "set", engine=False)
    with pytest.raises(EngineError, match="inside the index folder"):
        upload_folder(index, tmp_path / "set", uri="../elsewhere.db")
    with pytest.raises(EngineError, match="ending in .db"):
        upload_folder(index, tmp_path / "set", uri="engine.sqlite")


def test_an_interrupted_upload_is_written_again(tmp_path):
    """A collection holding fewer rows than the index (a killed upload) is dropped and uploaded whole."""
    z = structured(500)
    ReferenceIndex.build(z).save(tmp_path)
    index = ReferenceIndex.load(tmp_path, engine=False)
    y = index.reference_features()
    uri = str(tmp_path / "engine.db")
    MilvusEngine.upload(y[:100], index.item_shape, uri, collection=collection_name(fingerprint(y, index.item_shape)))
    eng = upload_folder(index, tmp_path)
    assert eng.rows == 500
    x = z[:3] + 0.02
    got, want = ReferenceIndex.load(tmp_path).range_search(x, 0.2), brute(x, z, 0.2)
    assert torch.equal(got[1], want[1]) and len(want[1]) > 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_uri_through_the_command_line(tmp_path):
    """A milvus-lite gRPC server in its own process stands in for a cluster: the command uploads through its
    URI, and the folder then searches through it exactly."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "srv"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"milvus-lite server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.3)
        z = structured(800, seed=5)
        ReferenceIndex.build(z).save(tmp_path / "set")
        uri = f"http://127.0.0.1:{port}"
        assert main(["engine", str(tmp_path / "set"), "--uri", uri]) == 0
        rec = json.loads((tmp_path / "set" / ENGINE_FILE).read_text())
        assert rec["uri"] == uri and not (tmp_path / "set" / "engine.db").exists()
        index = ReferenceIndex.load(tmp_path / "set")
        assert index.engine.uri == uri
        x = z[:8] + 0.05
        got, want = index.range_search(x, 0.15), brute(x, z, 0.15)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and len(want[0]) > 8
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(not os.environ.get("SPELL_MILVUS_URI"),
                    reason="needs a Milvus server: set SPELL_MILVUS_URI (e.g. http://127.0.0.1:19530 from "
                           "`pip install milvus==2.3.5` and `milvus-server`); CI has milvus-lite only")
def test_a_milvus_server_answers_exactly_right_after_the_upload(tmp_path):
    """A real Milvus server (standalone or cluster): searched at Bounded consistency straight after the upload,
    every radius matches brute force (the Strong count(*) at upload is what makes that safe)."""
    uri = os.environ["SPELL_MILVUS_URI"]
    z = structured(3000, seed=int(time.time()) % 10_000)  # a fresh fingerprint: a new collection each run
    ReferenceIndex.build(z).save(tmp_path / "set")
    assert main(["engine", str(tmp_path / "set"), "--uri", uri]) == 0
    index = ReferenceIndex.load(tmp_path / "set")
    assert index.engine.uri == uri
    try:
        matches_brute_force(index, z, seed=4)
    finally:
        index.engine.client.drop_collection(index.engine.collection)


def test_step_reuse_searches_at_r_where_the_engine_cannot_return_the_widened_answer(tmp_path):
    """StepReuse widens its searches to r + δ; where the engine would have to cut that answer it searches at r
    instead: every call still matches brute force, and an image whose widened answer fits is reused again."""
    from spell_core.shield import IndexPart, Shield, StepReuse

    z = torch.cat([torch.zeros(40, *SHAPE), structured(400, seed=7)])
    ReferenceIndex.build(z).save(tmp_path)
    index = ReferenceIndex.load(tmp_path, engine=False)
    eng = upload_folder(index, tmp_path)
    eng.page, eng.max_limit = 8, 128  # zero's 40 copies fit an answer at r; its 257 references within r + δ do not
    r, delta = 0.05, 0.75
    for start, narrowed in ((torch.zeros(1, *SHAPE), True), (torch.full((1, *SHAPE), 3.0), False)):
        reuse = StepReuse(Shield([IndexPart(index, 1.0, 0.0)]), delta=delta)
        x = start
        for step in range(4):
            x = x + 0.001 * step
            i, k, d, _ = reuse.pairs(x, r)
            bi, bk, _ = brute(x, z, r)
            assert sorted(zip(i.tolist(), k.tolist())) == sorted(zip(bi.tolist(), bk.tolist()))
        if narrowed:  # searched at r at every call, never kept
            assert len(bi) == 40 and reuse.narrowed_rows == 4 and reuse.reused_rows == 0
        else:  # far from every reference: the widened answer fits and is reused
            assert reuse.narrowed_rows == 0 and reuse.reused_rows == 3
