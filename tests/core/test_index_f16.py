"""float16 index shards: stored as float16, read as their exact float32 upcasts everywhere, so the index over them
gives exactly the pairs (and distances) a brute force over the same stored values gives."""
import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spell_core.build import build_index_folder
from spell_core.index import (BACKENDS, LatentStore, ReferenceIndex, Shard, build_shards, faiss, main, read_header,
                              shard_dtype)
from spell_core.repellency import flat32, rms_cdist
from spell_core.storage import StorageError, save_latents
from support import assert_same, brute

SHAPE = (2, 4, 4)
EXACT = [b for b in BACKENDS if b != "auto" and (b != "faiss" or faiss is not None)]


def clustered(n, seed, centres=6, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    c = 3 * torch.randn(centres, *SHAPE, generator=g)
    return c[torch.randint(0, centres, (n,), generator=g)] + spread * torch.randn(n, *SHAPE, generator=g)


def halves(z):
    """The values a float16 shard stores, as float32."""
    return z.half().float()


def test_float16_index_folder_matches_brute_force_on_the_stored_values(tmp_path):
    """build_index_folder(dtype="float16") -> F16 shards (half the bytes) -> save -> load: every backend gives the
    pairs and distances of a brute force over the float16 values upcast, at radii equal to a stored distance."""
    z = clustered(900, 1)
    zs = halves(z)
    assert not torch.equal(zs, z)  # the rounding is real: a float32 brute force would be the wrong reference
    record = {"files": 1, "digest": "clustered", "settings": {"seed": 1}}
    out = tmp_path / "f16"
    _, what = build_index_folder(lambda start: iter([z[start:]]), len(z), out, record, shard_size=256,
                                 dtype="float16")
    assert what == "built"
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 4 and {read_header(p)[0]["latents"]["dtype"] for p in shards} == {"F16"}
    assert {Shard(p).dtype for p in shards} == {"float16"}
    f32 = build_shards([z], tmp_path / "f32", shard_size=256)
    assert sum(p.stat().st_size for p in shards) < 0.55 * sum(p.stat().st_size for p in f32)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"
    assert json.loads((out / "source.json").read_text())["settings"] == {"seed": 1, "dtype": "float16"}

    loaded = ReferenceIndex.load(out, within=out)
    assert torch.equal(loaded.get(torch.arange(len(z))), zs)
    x = torch.cat([zs[:6] + 0.05 * torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(2)),
                   zs[400:402]])
    d = rms_cdist(flat32(x), flat32(zs))
    kth = float(d[1].sort().values[5])  # a radius equal to a stored distance, and one float above one
    radii = [0.3, kth, float(torch.nextafter(d[0, 3], torch.tensor(math.inf)))]
    for backend in EXACT:
        idx = ReferenceIndex.load(out, backend=backend)
        for r in radii:
            assert_same(idx.range_search(x, r), brute(x, zs, r))
    # a second build of the same record opens it as is
    again, what = build_index_folder(lambda start: iter([z[start:]]), len(z), out, record, shard_size=256,
                                     dtype="float16")
    assert what.startswith("already built") and len(again) == len(z)


def test_every_read_of_a_float16_shard_returns_float32_upcasts(tmp_path):
    """take, read, rows, get (sorted or not), get_sorted, chunks and sample give float32 copies of the stored values."""
    z = clustered(300, 3)
    zs = flat32(halves(z))
    files = build_shards([z], tmp_path, shard_size=128, dtype=torch.float16)
    s = Shard(files[1])
    assert s.dtype == "float16" and len(s) == 128
    got = s.take(np.array([0, 1, 2, 7, 100]))
    assert got.dtype == np.float32 and np.array_equal(got, zs[[128, 129, 130, 135, 228]].numpy())
    out = np.zeros((3, zs.shape[1]), np.float32)
    assert s.take(np.array([5, 6, 9]), out) is out and np.array_equal(out, zs[[133, 134, 137]].numpy())
    r = s.read(10, 20)
    assert r.dtype == torch.float32 and torch.equal(r, zs[138:148])
    rows = s.rows
    assert rows.dtype == np.float32 and rows.shape == (128, zs.shape[1]) and len(rows) == 128
    assert rows[3].dtype == np.float32 and np.array_equal(rows[3], zs[131].numpy())
    assert np.array_equal(np.asarray(rows), zs[128:256].numpy())
    store = LatentStore.from_files(files)
    assert store.dtypes == ["float16"] * 3
    for k in ([299, 0, 299, 128, 127], list(range(100, 200)), [5]):
        g = store.get(torch.tensor(k))
        assert g.dtype == torch.float32 and torch.equal(g, zs[k])
    buf = torch.empty(10, zs.shape[1])
    kn = np.array([1, 127, 128, 255, 256, 299])
    assert torch.equal(store.get_sorted(kn, buf), zs[kn])
    chunks = list(store.chunks(100))
    assert [a for a, _ in chunks] == [0, 100, 128, 228, 256]
    assert all(c.dtype == torch.float32 for _, c in chunks) and torch.equal(torch.cat([c for _, c in chunks]), zs)
    smp = store.sample(50, seed=4)
    assert smp.dtype == torch.float32 and smp.shape == (50, zs.shape[1])
    assert all(bool((zs == row).all(1).any()) for row in smp)


def test_truncated_float16_shard_is_rejected(tmp_path):
    """Size checks use float16's 2 bytes: whole F16 shards open, one byte short or a header claiming fewer bytes does
    not; a truncated shard behind an index fails the load; a resume rewrites it."""
    z = clustered(200, 5)
    files = build_shards([z], tmp_path / "s", shard_size=100, dtype="float16")
    ReferenceIndex.build(files).save(tmp_path / "i")
    _, start = read_header(files[1])
    assert os.path.getsize(files[1]) == start + 2 * 100 * math.prod(SHAPE)
    with open(files[1], "r+b") as f:
        f.truncate(os.path.getsize(files[1]) - 1)
    with pytest.raises(StorageError, match="truncated"):
        Shard(files[1])
    with pytest.raises(StorageError, match="shard-00001.*truncated"):
        ReferenceIndex.load(tmp_path / "i")
    # a header whose offsets hold 4-byte elements for an F16 tensor of that shape is inconsistent
    n = math.prod((100, *SHAPE))
    bad = tmp_path / "bad.safetensors"
    head = json.dumps({"latents": {"dtype": "F16", "shape": [100, *SHAPE], "data_offsets": [0, 4 * n]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * (4 * n))
    with pytest.raises(StorageError, match="truncated"):
        Shard(bad)
    (tmp_path / "s" / "manifest.json").unlink()
    files = build_shards([z], tmp_path / "s", shard_size=100, dtype="float16")
    assert torch.equal(Shard(files[1]).read(0, 100), flat32(halves(z[100:])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int32])
def test_other_shard_dtypes_are_refused_clearly(tmp_path, dtype):
    p = tmp_path / "shard-00000.safetensors"
    save_file({"latents": torch.zeros(4, *SHAPE, dtype=dtype)}, str(p))
    with pytest.raises(StorageError, match=r"shard-00000.*dtype '(BF16|F64|I32)'.*F32 or F16.*--dtype"):
        Shard(p)
    with pytest.raises(ValueError, match="float32.*float16"):
        build_shards([torch.zeros(4, *SHAPE)], tmp_path / "o", dtype="bfloat16")
    with pytest.raises(ValueError, match="float32.*float16"):
        save_latents(tmp_path / "x.safetensors", torch.zeros(2, *SHAPE), dtype=dtype)
    assert shard_dtype(torch.float16) == "float16" and shard_dtype("float32") == "float32"


def test_mixed_dtypes_across_shards_are_read_and_searched_exactly(tmp_path):
    """Shards of both dtypes in one set (allowed): each is read as its own float32 upcast, and the index over them
    matches brute force over those values."""
    z = clustered(400, 6)
    a = build_shards([z[:150]], tmp_path / "a", shard_size=150)
    b = build_shards([z[150:]], tmp_path / "b", shard_size=250, dtype="float16")
    stored = torch.cat([flat32(z[:150]), flat32(halves(z[150:]))]).reshape(z.shape)
    index = ReferenceIndex.build(a + b, dim=4)
    assert index.store.dtypes == ["float32", "float16"]
    assert torch.equal(index.get(torch.arange(400)), stored)
    x = stored[[3, 160, 399]] + 0.05
    for backend in EXACT:
        assert_same(index.with_backend(backend).range_search(x, 0.4), brute(x, stored, 0.4))
    index.save(tmp_path / "i")
    assert_same(ReferenceIndex.load(tmp_path / "i").range_search(x, 0.4), brute(x, stored, 0.4))


def test_resume_in_another_dtype_rewrites_the_shards(tmp_path):
    """Shards of another dtype count as missing, so a build ends with one dtype; a complete manifest of another
    dtype is not returned as is."""
    z = clustered(300, 7)
    build_shards([z[:200]], tmp_path, shard_size=100)  # two float32 shards, "complete" for 200 rows
    (tmp_path / "manifest.json").unlink()
    starts = []

    def source(start):
        starts.append(start)
        yield z[start:]

    files = build_shards(source, tmp_path, shard_size=100, dtype="float16")
    assert starts == [0] and [Shard(f).dtype for f in files] == ["float16"] * 3
    files = build_shards(source, tmp_path, shard_size=100)  # complete float16 manifest, float32 asked: rewritten
    assert starts == [0, 0] and [Shard(f).dtype for f in files] == ["float32"] * 3
    assert torch.equal(LatentStore.from_files(files).get(torch.arange(300)), flat32(z))
    assert build_shards(source, tmp_path, shard_size=100) == files and starts == [0, 0]  # complete: no work


def test_float16_resume_after_interruption_writes_the_same_shards(tmp_path):
    z = clustered(500, 8)

    def source(start, fail_at=None):
        for a in range(start, 500, 50):
            if fail_at is not None and a >= fail_at:
                raise KeyboardInterrupt
            yield z[a:a + 50]

    with pytest.raises(KeyboardInterrupt):
        build_shards(lambda s: source(s, fail_at=250), tmp_path / "r", shard_size=100, dtype="float16")
    files = build_shards(source, tmp_path / "r", shard_size=100, dtype="float16")
    whole = build_shards(source, tmp_path / "w", shard_size=100, dtype="float16")
    assert [f.name for f in files] == [f.name for f in whole] and [Shard(f).dtype for f in files] == ["float16"] * 5
    for f, w in zip(files, whole):  # (the header's metadata order varies between writes, so values, not bytes)
        assert np.array_equal(Shard(f).take(np.arange(100)), Shard(w).take(np.arange(100)))
    assert torch.equal(LatentStore.from_files(files).get(torch.arange(500)), flat32(halves(z)))


def test_values_beyond_float16_range_are_refused(tmp_path):
    z = torch.zeros(10, *SHAPE)
    z[7, 0, 0, 0] = 7e4
    with pytest.raises(StorageError, match=r"latents 0\.\.10 exceed float16's range.*dtype float32"):
        build_shards([z], tmp_path, shard_size=4, dtype="float16")
    assert len(build_shards([z], tmp_path / "f32", shard_size=4)) == 3  # float32 holds them


def test_float32_builds_are_unchanged(tmp_path):
    """The default writes F32 shards and a source.json without a dtype (folders built before float16 existed stay
    the same source); the other dtype over the same files is refused with a message naming the fix."""
    z = clustered(120, 9)
    record = {"files": 1, "digest": "d", "settings": {"n": 120}}
    out = tmp_path / "o"
    build_index_folder(lambda s: iter([z[s:]]), 120, out, record, shard_size=64)
    assert json.loads((out / "source.json").read_text()) == record
    assert {read_header(p)[0]["latents"]["dtype"] for p in out.glob("shard-*")} == {"F32"}
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(StorageError, match="same files with float32 shards, not float16.*overwrite"):
        build_index_folder(lambda s: iter([z[s:]]), 120, out, record, shard_size=64, dtype="float16")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    index, what = build_index_folder(lambda s: iter([z[s:]]), 120, out, record, shard_size=64, dtype="float16",
                                     overwrite=True)
    assert what == "built" and index.store.dtypes == ["float16"] * 2
    with pytest.raises(StorageError, match="same files with float16 shards, not float32.*overwrite"):
        build_index_folder(lambda s: iter([z[s:]]), 120, out, record, shard_size=64)


def test_cli_build_float16(tmp_path):
    src = tmp_path / "latents"
    src.mkdir()
    z = clustered(90, 10)
    for j in range(3):
        save_latents(src / f"part{j}.safetensors", z[30 * j:30 * j + 30])
    out = tmp_path / "out"
    assert main(["build", "--latents-dir", str(src), "--out", str(out), "--shard-size", "40",
                 "--dtype", "float16"]) == 0
    index = ReferenceIndex.load(out)
    assert index.store.dtypes == ["float16"] * 3
    assert torch.equal(index.get(torch.arange(90)), halves(z))
    x = halves(z[:4]) + 0.03
    assert_same(index.range_search(x, 0.35), brute(x, halves(z), 0.35))
    with pytest.raises(SystemExit):
        main(["build", "--latents-dir", str(src), "--out", str(tmp_path / "o2"), "--dtype", "bfloat16"])


def test_shards_rewritten_in_another_dtype_refuse_their_index(tmp_path):
    """The index records its shards' dtypes: shards rewritten in the other dtype under an existing index (other
    stored values than its features were computed from) are refused at load; an index saved without the record
    (before dtypes were recorded: float32 shards) still opens."""
    import json

    from safetensors.torch import load_file, save_file

    z = clustered(300, 8)
    folder = tmp_path / "set"
    files = build_shards([z], folder, shard_size=100)
    ReferenceIndex.build(files, dim=4).save(folder)
    assert json.loads(read_header(folder / "index.safetensors")[0]["__metadata__"]["dtypes"]) == ["float32"] * 3
    ReferenceIndex.load(folder)
    index_file = folder / "index.safetensors"
    meta = read_header(index_file)[0]["__metadata__"]
    old = {k: v for k, v in meta.items() if k != "dtypes"}
    save_file(load_file(str(index_file)), str(index_file), metadata=old)  # as an older pack wrote it
    assert len(ReferenceIndex.load(folder)) == 300
    save_file(load_file(str(index_file)), str(index_file), metadata=meta)
    build_shards([z], tmp_path / "half", shard_size=100, dtype="float16")
    for f in files:  # raw shard rewrite in float16 under the existing index
        (tmp_path / "half" / f.name).replace(f)
    with pytest.raises(StorageError, match="stored as .*float16.*rebuild the index"):
        ReferenceIndex.load(folder)
