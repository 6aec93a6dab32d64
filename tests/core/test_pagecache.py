"""Cold start: ReferenceIndex.warm reads an index folder's evicted shards back into the OS page cache in the
background (checked with mincore), touches nothing when the folder is larger than its share of the memory
available, and leaves the process' own memory where it was (the pages belong to the kernel's cache)."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import evict_or_skip

from spell_core.index import INDEX_FILE, ReferenceIndex, pagecache
from spell_core.storage import save_latents

SHAPE = (4, 8, 8)  # 1 kB a row
ROWS = 16384  # per shard: 16 MB


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An index folder of 3 shards (48 MB), opened with load as the loader opens it."""
    out = tmp_path_factory.mktemp("cold-index")
    g = torch.Generator().manual_seed(0)
    files = []
    for j in range(3):
        files.append(out / f"part-{j}.safetensors")
        save_latents(files[-1], torch.randn(ROWS, *SHAPE, generator=g))
    ReferenceIndex.build(files, backend="torch", dim=8).save(out)
    return out


def open_cold(folder):
    """The folder loaded, then its shards evicted (index.safetensors stays mapped by the index: only its unmapped
    pages can go)."""
    index = ReferenceIndex.load(folder, within=folder)
    shards = [s.path for s in index.store.shards]
    evict_or_skip(shards, pagecache)
    pagecache.evict([folder / INDEX_FILE])
    return index, shards


@pytest.mark.parametrize("how", ["populate", "read"])
def test_warm_reads_evicted_shards_into_the_page_cache(folder, how, monkeypatch):
    """how: MADV_POPULATE_READ (Linux 5.14+; where the kernel lacks it this case reads too) or the read into a
    buffer that every other system uses."""
    if how == "read":
        monkeypatch.setattr(pagecache, "_POPULATE_READ", None)
    index, shards = open_cold(folder)
    assert len(shards) == 3
    before = rss_kb()
    w = index.warm(also=[folder / INDEX_FILE])
    assert w is index.warmup and w.started, w.summary()
    assert "read into the page cache in the background" in w.summary()
    assert w.wait(60), "the read-ahead thread did not finish within 60 s"
    assert w.error is None
    assert w.bytes == sum(p.stat().st_size for p in shards) + (folder / INDEX_FILE).stat().st_size
    for p in shards:
        got, pages = pagecache.resident(p)
        assert got >= 0.99 * pages, f"{p.name}: {got} of {pages} pages resident after the read-ahead"
    # the pages are the kernel's: the process grew by far less than the 48 MB it read (8 MB maps or one 8 MB
    # buffer at a time, dropped)
    assert rss_kb() - before < 12 * 1024
    # what it read is what the searches read
    x = index.get(torch.tensor([5, ROWS + 7, 3 * ROWS - 1])) + 0.01
    assert {(int(i), int(k)) for i, k, _ in zip(*index.range_search(x, 0.05))} == {
        (0, 5), (1, ROWS + 7), (2, 3 * ROWS - 1)}


def test_warm_of_a_folder_over_the_limit_touches_nothing(folder):
    index, shards = open_cold(folder)
    cold = pagecache.resident_fraction(shards)
    w = index.warm(share=1e-9)  # the limit: a billionth of the memory available, far below 48 MB
    assert not w.started and w.thread is None and w.done
    assert "not read ahead: more than" in w.summary() and "of memory available" in w.summary()
    time.sleep(0.5)
    assert pagecache.resident_fraction(shards) <= cold + 0.01
    # the limit is share x MemAvailable, inclusive, whatever the machine reports
    total = sum(p.stat().st_size for p in shards)
    assert not pagecache.warm_files(shards, 0.5, available=2 * total - 2).started
    on = pagecache.warm_files(shards, 0.5, available=2 * total)
    assert on.started and on.wait(60)
    assert pagecache.resident_fraction(shards) >= 0.99
    off = pagecache.warm_files(shards, 0)
    assert not off.started and "switched off" in off.summary()


def test_in_memory_latents_have_nothing_to_warm():
    assert ReferenceIndex.build(torch.randn(50, *SHAPE), backend="torch").warm() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cold_rows_are_announced_to_the_os_and_read_the_same(tmp_path, monkeypatch, dtype):
    """Shard.prefetch asks the OS for exactly the pages of the rows given (mincore page by page, once the
    asynchronous reads land) and not the whole shard; take returns the stored values in both READ_HINTS modes,
    cold and warm; an unknown mode is refused."""
    from spell_core.index import shards as shards_mod

    if not shards_mod._FADVISE:
        pytest.skip("os.posix_fadvise is missing on this platform: reads are plain, nothing is announced")
    shape = (4, 32, 32)  # 16 KiB a float32 row, 8 KiB float16
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2048, *shape, generator=g).to(dtype)
    path = tmp_path / "part-0.safetensors"
    save_latents(path, z, dtype=dtype)
    want = z.float().reshape(len(z), -1)
    rows = np.unique(np.random.default_rng(0).choice(len(z), 40, replace=False))
    rows = np.unique(np.concatenate([rows, [rows[0] + 1]]))  # one run of two consecutive rows
    shard = shards_mod.Shard(path)
    assert shard.dtype == str(dtype).removeprefix("torch.")
    rb = z[0].numel() * z.element_size()
    evict_or_skip([path], pagecache)
    shard.prefetch(rows)
    pages = [np.arange((shard.offset + k * rb) // pagecache._PAGE, (shard.offset + (k + 1) * rb - 1) // pagecache._PAGE
                       + 1) for k in rows.tolist()]
    need = np.concatenate(pages)
    deadline = time.time() + 20
    while not pagecache.resident_map(path)[need].all() and time.time() < deadline:
        time.sleep(0.05)
    got = pagecache.resident_map(path)
    assert got[need].all(), f"{int((~got[need]).sum())} of {len(need)} pages of the announced rows not read in 20 s"
    assert got.sum() < 0.25 * len(got), f"{int(got.sum())} of {len(got)} pages resident: more than the rows asked for"
    for mode in ("none", "willneed"):
        monkeypatch.setattr(shards_mod, "READ_HINTS", mode)
        evict_or_skip([path], pagecache)
        fresh = shards_mod.Shard(path)
        assert np.array_equal(fresh.take(rows), want[rows].numpy()), mode
        assert np.array_equal(fresh.take(rows), want[rows].numpy()), mode  # warm
        evict_or_skip([path], pagecache)
        fresh.take(rows[::3])  # a third of the rows cached: read at once, the rest announced and waited for
        assert np.array_equal(fresh.take(rows), want[rows].numpy()), mode
    # a kernel or filesystem that refuses RWF_NOWAIT (an unknown flag stands in for it): plain reads from then on
    monkeypatch.setattr(shards_mod, "READ_HINTS", "willneed")
    monkeypatch.setattr(shards_mod, "_NOWAIT", 1 << 30)
    evict_or_skip([path], pagecache)
    assert np.array_equal(shards_mod.Shard(path).take(rows), want[rows].numpy())
    assert shards_mod._NOWAIT is None
    monkeypatch.setattr(shards_mod, "READ_HINTS", "sequential")
    with pytest.raises(ValueError, match="READ_HINTS must be one of"):
        shards_mod.Shard(path).take(rows)
