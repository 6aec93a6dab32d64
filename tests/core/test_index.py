"""Exact range search (spell_core.index) against the brute force rms_cdist it must reproduce bit for bit."""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spell_core.index import (BACKENDS, ReferenceIndex, Shard, build_shards, faiss, main, pool_basis)
from spell_core.repellency import flat32, rms_cdist
from spell_core.storage import StorageError
from support import assert_same, brute

SHAPE = (2, 4, 4)
EXACT = [b for b in BACKENDS if b != "auto" and (b != "faiss" or faiss is not None)]


def clustered(n, g, centres=5, spread=0.3):
    c = torch.randn(centres, *SHAPE, generator=g)
    return c[torch.randint(0, centres, (n,), generator=g)] + spread * torch.randn(n, *SHAPE, generator=g)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), b=st.integers(1, 9),
       r=st.floats(0.05, 2.0), backend=st.sampled_from(EXACT), dim=st.integers(1, 12),
       projection=st.sampled_from(["pca", "pool"]), kind=st.sampled_from(["random", "clustered"]))
def test_exact_against_brute_force(seed, n, b, r, backend, dim, projection, kind):
    """Random and clustered sets, every backend and projection: the same pairs and distances as brute force."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *SHAPE, generator=g) if kind == "random" else clustered(n, g)
    x = z[torch.randint(0, n, (b,), generator=g)] + 0.2 * torch.randn(b, *SHAPE, generator=g)
    index = ReferenceIndex.build(z, backend=backend, projection=projection, dim=dim, pool=2, cells=max(1, n // 8))
    assert_same(index.range_search(x, r), brute(x, z, r))


@pytest.mark.parametrize("backend", EXACT)
def test_points_on_the_radius_boundary(backend):
    """References placed at r(1 ± 1e-6) and radii equal to an exact distance or one float above it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *SHAPE, generator=g)
    u = torch.randn(60, *SHAPE, generator=g)
    u = u / flat32(u).norm(dim=1).view(-1, 1, 1, 1) * math.sqrt(math.prod(SHAPE))  # RMS norm 1
    scale = torch.tensor([1 - 1e-6, 1.0, 1 + 1e-6]).repeat(20).view(-1, 1, 1, 1)
    z = torch.cat([x[j] + 0.5 * scale * u for j in range(4)] + [torch.randn(200, *SHAPE, generator=g)])
    index = ReferenceIndex.build(z, backend=backend, dim=4, cells=16)
    d = rms_cdist(flat32(x), flat32(z))
    for r in [0.5, float(d[0, 1]), float(torch.nextafter(d[0, 1], torch.tensor(math.inf))), float(d[2, 125])]:
        assert_same(index.range_search(x, r), brute(x, z, r))


def test_planted_queries_are_all_found():
    """Queries planted strictly inside a ball always find that reference (no false negatives)."""
    g = torch.Generator().manual_seed(2)
    z = clustered(2000, g, centres=40)
    k = torch.randint(0, 2000, (16,), generator=g)
    e = torch.randn(16, *SHAPE, generator=g)
    e = e / flat32(e).norm(dim=1).view(-1, 1, 1, 1) * math.sqrt(math.prod(SHAPE))
    x = z[k] + 0.29 * e
    index = ReferenceIndex.build(z, backend="clusters", dim=6)
    i, kk, _ = index.range_search(x, 0.3)
    assert set(zip(range(16), k.tolist())) <= set(zip(i.tolist(), kk.tolist()))
    assert_same((i, kk, _), brute(x, z, 0.3))


def test_shards_round_trip(tmp_path):
    """build_shards -> build from files -> save -> load gives the same answers and latents as in memory."""
    g = torch.Generator().manual_seed(3)
    z = clustered(700, g)
    x = z[:5] + 0.1
    files = build_shards((z[a:a + 64] for a in range(0, 700, 64)), tmp_path / "shards", shard_size=128)
    assert len(files) == 6 and [len(Shard(f)) for f in files] == [128] * 5 + [60]
    mem = ReferenceIndex.build(z, backend="clusters", dim=5)
    disk = ReferenceIndex.build(files, backend="clusters", dim=5)
    assert torch.equal(disk.get(torch.tensor([0, 129, 699])), z[[0, 129, 699]])
    for index in (disk, mem):
        index.save(tmp_path / "index")
        loaded = ReferenceIndex.load(tmp_path / "index")
        assert len(loaded) == 700 and loaded.item_shape == SHAPE
        for backend in EXACT:
            assert_same(loaded.with_backend(backend).range_search(x, 0.45), brute(x, z, 0.45))


def test_resume_after_interruption(tmp_path):
    """A build killed after two shards resumes at row 2·shard_size and writes the same shards."""
    z = torch.randn(500, *SHAPE, generator=torch.Generator().manual_seed(4))
    starts = []

    def source(start, fail_at=None):
        starts.append(start)
        for a in range(start, 500, 50):
            if fail_at is not None and a >= fail_at:
                raise KeyboardInterrupt
            yield z[a:a + 50]

    with pytest.raises(KeyboardInterrupt):
        build_shards(lambda s: source(s, fail_at=250), tmp_path, shard_size=100)
    assert not (tmp_path / "manifest.json").exists()
    calls = []
    files = build_shards(source, tmp_path, shard_size=100, progress=lambda done, total: calls.append(done))
    assert starts[-1] == 200 and calls == list(range(250, 501, 50))
    assert torch.equal(torch.cat([Shard(f).read(0, len(Shard(f))) for f in files]), flat32(z))
    assert build_shards(source, tmp_path, shard_size=100) == files and starts[-1] == 200  # complete: no work


def test_resume_with_a_plain_iterable_skips_rows(tmp_path):
    """An iterable source (not resumable itself) is read and dropped up to the first missing shard."""
    z = torch.randn(300, *SHAPE, generator=torch.Generator().manual_seed(5))
    build_shards([z[:100]], tmp_path, shard_size=100)
    (tmp_path / "manifest.json").unlink()
    files = build_shards([z[a:a + 30] for a in range(0, 300, 30)], tmp_path, shard_size=100)
    assert torch.equal(torch.cat([Shard(f).read(0, 100) for f in files]), flat32(z))


def test_corrupt_and_truncated_shards_fail_clearly(tmp_path):
    """Truncated data, a broken header and a missing shard raise StorageError naming the file."""
    z = torch.randn(64, *SHAPE)
    files = build_shards([z], tmp_path / "s", shard_size=32)
    ReferenceIndex.build(files).save(tmp_path / "i")
    with open(files[1], "r+b") as f:
        f.truncate(os.path.getsize(files[1]) - 100)
    with pytest.raises(StorageError, match="truncated"):
        ReferenceIndex.load(tmp_path / "i")
    files[0].write_bytes(b"\xff" * 7)
    with pytest.raises(StorageError, match="shard-00000"):
        Shard(files[0])
    files[0].write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(StorageError, match="not a readable"):
        Shard(files[0])
    files[0].unlink()
    with pytest.raises(StorageError, match="does not exist"):
        ReferenceIndex.load(tmp_path / "i")


def test_truncated_shard_is_rewritten_on_resume(tmp_path):
    """A damaged shard counts as missing: resume rewrites it and everything after it."""
    z = torch.randn(300, *SHAPE)
    files = build_shards([z], tmp_path, shard_size=100)
    (tmp_path / "manifest.json").unlink()
    with open(files[1], "r+b") as f:
        f.truncate(200)
    files = build_shards([z], tmp_path, shard_size=100)
    assert torch.equal(Shard(files[1]).read(0, 100), flat32(z[100:200]))


@pytest.mark.parametrize("backend", EXACT + ["auto"])
def test_empty_index(backend, tmp_path):
    """No references: no pairs, for any batch; save and load still work."""
    index = ReferenceIndex.build(torch.zeros(0, *SHAPE), backend=backend)
    assert len(index) == 0 and index.item_shape == SHAPE
    i, k, d = index.range_search(torch.randn(3, *SHAPE), 1.0)
    assert i.numel() == k.numel() == d.numel() == 0 and i.dtype == torch.long and d.dtype == torch.float32
    index.save(tmp_path)
    assert len(ReferenceIndex.load(tmp_path)) == 0


@pytest.mark.parametrize("r", [0.0, -1.0, math.nan, math.inf])
def test_bad_radius_raises(r):
    index = ReferenceIndex.build(torch.randn(10, *SHAPE))
    with pytest.raises(ValueError, match="radius"):
        index.range_search(torch.randn(2, *SHAPE), r)


def test_bad_arguments_raise():
    z = torch.randn(10, *SHAPE)
    with pytest.raises(ValueError, match="backend"):
        ReferenceIndex.build(z, backend="hnsw")
    with pytest.raises(ValueError, match="projection"):
        ReferenceIndex.build(z, projection="random")
    with pytest.raises(ValueError, match="item shape"):
        ReferenceIndex.build(z).range_search(torch.randn(2, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match="shard_size"):
        build_shards([z], "unused", shard_size=0)


def test_pool_basis_is_orthonormal_and_averages():
    """Pooling rows are orthonormal, and W x is the block average times pool."""
    w = pool_basis((2, 4, 4), 2)
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    pooled = torch.nn.functional.avg_pool2d(x, 2).flatten() * 2
    assert torch.allclose(w @ x.flatten(), pooled)


def test_features_are_contractive():
    """||y(a) − y(b)|| ≤ ||a − b|| for the stored features (the lower bound behind exactness)."""
    g = torch.Generator().manual_seed(6)
    z = clustered(400, g)
    index = ReferenceIndex.build(z, backend="torch", dim=6)
    ya, _ = index.features(flat32(z[:200]))
    yb, _ = index.features(flat32(z[200:]))
    assert ((ya - yb).norm(dim=1) <= (flat32(z[:200]) - flat32(z[200:])).double().norm(dim=1) * (1 + 1e-12)).all()


def test_query_dtype_and_get():
    """float16 queries are measured in float32; get returns [P, ...] references."""
    z = torch.randn(50, *SHAPE)
    index = ReferenceIndex.build(z)
    x = z[:3].half()
    assert_same(index.range_search(x, 0.5), brute(x.float(), z, 0.5))
    assert index.get(torch.tensor([4, 2])).shape == (2, *SHAPE)
    with pytest.raises(IndexError):
        index.get(torch.tensor([50]))


def test_cli_build(tmp_path):
    """python -m spell_core.index build over a folder of latent files writes a loadable index."""
    src = tmp_path / "latents"
    src.mkdir()
    z = torch.randn(90, *SHAPE)
    from spell_core.storage import save_latents

    for j in range(3):
        save_latents(src / f"part{j}.safetensors", z[30 * j:30 * j + 30])
    assert main(["build", "--latents-dir", str(src), "--out", str(tmp_path / "out"), "--shard-size", "40"]) == 0
    index = ReferenceIndex.load(tmp_path / "out")
    assert len(index) == 90
    assert torch.equal(index.get(torch.arange(90)), z)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda():
    z = clustered(500, torch.Generator().manual_seed(7))
    x = z[:4] + 0.1
    index = ReferenceIndex.build(z, backend="torch", device="cuda")
    assert_same(index.range_search(x, 0.4), brute(x, z, 0.4))


@pytest.mark.parametrize("backend", EXACT)
def test_tiny_radius(backend):
    """Exact duplicates and near-duplicates are found at radii far below float32 matmul error."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(300, *SHAPE, generator=g) * 10
    x = torch.cat([z[:2], z[5:6] + 1e-5])
    index = ReferenceIndex.build(z, backend=backend, dim=3, cells=20)
    for r in (1e-7, 2e-5, 1e-3):
        assert_same(index.range_search(x, r), brute(x, z, r))
    assert len(index.range_search(x, 2e-5)[0]) == 3


# ---- "cascade" backend (SubspaceCells): full-space annulus, float16 stage 2, positioned shard reads ----

def test_subspace_centre_distances_are_exact():
    """‖x − c‖² = ‖p − c_p‖² + ρ² for centres in the PCA subspace: the identity behind the annulus bound."""
    from spell_core.index import SubspaceCells, pca_basis

    g = torch.Generator().manual_seed(9)
    z = flat32(clustered(300, g)).double()
    mu, w = pca_basis(z.float(), 6)
    cells = SubspaceCells(mu, w, torch.randn(4, 6, generator=g), torch.tensor([0, 0, 0, 0, 0]), torch.zeros(0))
    p, rho2 = cells.project(z.float())
    c = mu + cells.cp.double() @ w  # the centres in the full space
    want = torch.cdist(z, c).pow(2)
    got = torch.cdist(p, cells.cp.double()).pow(2) + rho2[:, None]
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_cascade_bounds_are_lower_bounds_and_split_wide_cells():
    """Many small clusters next to big ones (k-means merges the small ones into wide cells, which get split);
    every stage keeps all pairs within the radius, and the answers match brute force."""
    g = torch.Generator().manual_seed(10)
    big = clustered(1500, g, centres=4, spread=0.2)
    small = torch.randn(150, *SHAPE, generator=g).repeat_interleave(3, 0) + 0.05 * torch.randn(450, *SHAPE, generator=g)
    z = torch.cat([big, small])
    index = ReferenceIndex.build(z, backend="cascade", dim=4, cells=20)
    sub = index.subcells
    assert len(sub.cp) > 20  # wide cells were split
    x = torch.cat([z[torch.randint(0, len(z), (12,), generator=g)] + 0.1 * torch.randn(12, *SHAPE, generator=g),
                   torch.randn(4, *SHAPE, generator=g)])
    xf = flat32(x)
    for r in (0.1, 0.3, 0.8):
        d = rms_cdist(xf, flat32(z))
        true = {(i, k) for i, k in zip(*[t.tolist() for t in torch.nonzero(d < r, as_tuple=True)])}
        t = torch.full((len(x),), r * math.sqrt(xf.shape[1]), dtype=torch.float64)
        sig = torch.zeros(len(x), dtype=torch.float64)
        i, pos, _, _ = sub.annulus(xf, t, sig)
        assert true <= set(zip(i.tolist(), index.order[pos].tolist())), "annulus dropped a true pair"
        i, pos = sub.search(xf, t, sig)
        assert true <= set(zip(i.tolist(), index.order[pos].tolist())), "stage 2 dropped a true pair"
        assert_same(index.range_search(x, r), brute(x, z, r))


@pytest.mark.parametrize("scale", [1.0, 1e5])
def test_cascade_float16_stage_and_its_float32_fallback(scale):
    """Stage-2 coordinates are float16 where they fit and float32 beyond float16's range; exact either way,
    also at a radius equal to a distance."""
    g = torch.Generator().manual_seed(11)
    z = clustered(400, g) * scale
    x = z[:6] + 0.05 * scale * torch.randn(6, *SHAPE, generator=g)
    index = ReferenceIndex.build(z, backend="cascade", dim=3, cells=16)
    assert index.subcells.p.dtype == (torch.float16 if scale == 1.0 else torch.float32)
    d = rms_cdist(flat32(x), flat32(z))
    for r in (0.2 * scale, float(d[1, 7]), float(torch.nextafter(d[1, 7], torch.tensor(math.inf)))):
        assert_same(index.range_search(x, r), brute(x, z, r))


def test_cascade_save_load_and_switching_backends(tmp_path):
    """A saved cascade index loads with its cells (no refit) and as any other backend, same answers."""
    g = torch.Generator().manual_seed(12)
    z = clustered(600, g)
    x = z[:5] + 0.1
    files = build_shards([z], tmp_path / "s", shard_size=128)
    index = ReferenceIndex.build(files)  # auto
    assert index.backend == "cascade" and index.subcells is not None
    index.save(tmp_path / "s")
    want = brute(x, z, 0.45)
    loaded = ReferenceIndex.load(tmp_path / "s")
    assert loaded.subcells is not None and torch.equal(loaded.subcells.p, index.subcells.p)
    assert_same(loaded.range_search(x, 0.45), want)
    for backend in EXACT:
        assert_same(ReferenceIndex.load(tmp_path / "s", backend=backend).range_search(x, 0.45), want)
        assert_same(loaded.with_backend(backend).range_search(x, 0.45), want)


def test_get_from_shards_any_order(tmp_path):
    """get reads shard rows by positioned reads: unsorted, repeated and cross-shard ids come back in order."""
    z = torch.randn(300, *SHAPE, generator=torch.Generator().manual_seed(13))
    index = ReferenceIndex.build(build_shards([z], tmp_path, shard_size=64), backend="torch")
    for k in ([5, 4, 3], [299, 0, 299, 64, 63], list(range(60, 140)), [7]):
        assert torch.equal(index.get(torch.tensor(k)), z[k])
    assert index.get(torch.zeros(0, dtype=torch.long)).shape == (0, *SHAPE)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_cascade_bfloat16_centre_product_is_exact(monkeypatch, scale):
    """Stage 1's product with every centre in bfloat16 (CENTRE_PRODUCT, chosen where faster): its error bound
    widens the liveness test and each annulus, so the answers stay brute force's, bit for bit, also at a radius
    equal to a distance; and the bound holds on the index's own centres."""
    from spell_core.index import cells as cells_mod

    monkeypatch.setattr(cells_mod, "CENTRE_PRODUCT", "bfloat16")
    g = torch.Generator().manual_seed(21)
    big = clustered(1500, g, centres=4, spread=0.2)
    small = torch.randn(150, *SHAPE, generator=g).repeat_interleave(3, 0) + 0.05 * torch.randn(450, *SHAPE, generator=g)
    z = torch.cat([big, small]) * scale
    x = torch.cat([z[torch.randint(0, len(z), (12,), generator=g)] + 0.1 * scale * torch.randn(12, *SHAPE, generator=g),
                   z[:2], scale * torch.randn(4, *SHAPE, generator=g)])
    index = ReferenceIndex.build(z, backend="cascade", dim=4, cells=20)
    sub = index.subcells
    d = rms_cdist(flat32(x), flat32(z))
    for r in (0.1 * scale, 0.3 * scale, 0.8 * scale, float(d[0, 9]), 1e-7 * scale):
        assert_same(index.range_search(x, r), brute(x, z, r))
    assert sub.product == "bfloat16"
    exact = sub.cp.double() @ sub.cp[:5].double().T
    got = torch.mm(sub.cp.to(torch.bfloat16), sub.cp[:5].to(torch.bfloat16).T).double()
    bound = sub.bf16_dot_bound() * sub.cnorm.double()[:, None] * sub.cnorm[:5].double()[None]
    assert ((got - exact).abs() <= bound).all()
    # the same index searched with the float32 product: the same answers, and bfloat16 widened the annulus
    flat = cells_mod.SubspaceCells.from_tensors(sub.tensors())
    monkeypatch.setattr(cells_mod, "CENTRE_PRODUCT", "float32")
    t = torch.full((len(x),), 0.3 * scale * math.sqrt(flat32(x).shape[1]), dtype=torch.float64)
    sig = torch.zeros(len(x), dtype=torch.float64)
    rows32 = len(flat.annulus(flat32(x), t, sig)[0])
    rows16 = len(sub.annulus(flat32(x), t, sig)[0])
    assert flat.product == "float32" and rows16 >= rows32


def test_cascade_centre_product_auto_keeps_small_indexes_float32():
    g = torch.Generator().manual_seed(22)
    index = ReferenceIndex.build(clustered(400, g), backend="cascade", dim=3, cells=16)
    index.range_search(clustered(3, g), 0.3)
    assert index.subcells.product == "float32"


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("flat", [0.0, math.inf])
def test_cascade_prefix_scan_of_every_row_and_annulus_listing_agree(monkeypatch, flat, scale):
    """search.ANNULUS_FLAT: past that share of all rows the cascade checks the PRE_DIM feature prefix of every row
    by a matmul (its rounding covered by the flat scans' slack) instead of listing the annulus rows; forced
    either way, answers are brute force's, bit for bit, for radii at a distance, far below matmul error, and wide."""
    from spell_core.index import search

    monkeypatch.setattr(search, "ANNULUS_FLAT", flat)
    g = torch.Generator().manual_seed(31)
    z = torch.cat([clustered(1200, g, centres=6, spread=0.25), 10 * torch.randn(300, *SHAPE, generator=g)])
    x = torch.cat([z[torch.randint(0, len(z), (10,), generator=g)] + 0.05 * torch.randn(10, *SHAPE, generator=g),
                   z[1200:1202], z[1300:1301] + 1e-5, torch.randn(3, *SHAPE, generator=g)])
    z, x = z * scale, x * scale
    index = ReferenceIndex.build(z, backend="cascade", dim=9, cells=40)
    d = rms_cdist(flat32(x), flat32(z))
    for r in (0.05 * scale, 0.3 * scale, 1.5 * scale, float(d[0, 7]), 2e-5 * scale, 1e-7 * scale):
        assert_same(index.range_search(x, r), brute(x, z, r))
        assert (index.subcells.scanned == len(z)) == (flat == 0.0 and index.subcells.scanned > 0)
