"""Small helpers shared by the tests (tests/ is on sys.path: tests/conftest.py): ports, tools the set-up installs,
filesystems and page-cache eviction, and the brute-force answer every exact range search must reproduce."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(missing: str | None) -> None:
    """``missing``: why a tool the set-up installs is absent, or None. Skips the test with that reason on a
    developer's machine; fails it in CI (CI set), where scripts/setup.sh must have installed it."""
    if missing and os.environ.get("CI"):
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)


def filesystem(path) -> str:
    """The type of the filesystem holding path (the longest mount point of /proc/mounts above it; "unknown"
    where /proc/mounts cannot be read)."""
    best, kind = "", "unknown"
    real = str(Path(path).resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, parts[2]
    return kind


def evict_or_skip(files, pagecache) -> float:
    """Drops files from the page cache (``pagecache.evict``) -> the resident fraction left; skips the test, with
    the reason, where that cannot be done or seen: no mincore, a tmpfs (its pages are the files), or eviction
    leaving over 5 % resident."""
    files = [Path(f) for f in files]
    if pagecache.resident(files[0]) is None:
        pytest.skip("mincore is not available on this platform: page-cache residency cannot be measured")
    kind = filesystem(files[0])
    if kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{files[0].parent} is on {kind}: its pages are the files themselves and cannot be evicted, so "
                    "a read-ahead cannot be observed")
    pagecache.evict(files)
    cold = pagecache.resident_fraction(files)
    if cold > 0.05:
        pytest.skip(f"POSIX_FADV_DONTNEED left {cold:.0%} of {files[0].parent} resident on this {kind} filesystem: a "
                    "cold cache cannot be made here")
    return cold


def brute(x, z, r):
    """Every (i, k) with rms_cdist(x_i, z_k) < r and those distances, sorted by (i, k): the answer an exact range
    search (spell_core.index, every backend and engine) must give bit for bit."""
    import torch

    from spell_core.repellency import flat32, rms_cdist

    d = rms_cdist(flat32(x), flat32(z))
    i, k = torch.nonzero(d < r, as_tuple=True)
    return i, k, d[i, k]


def assert_same(got, want):
    import torch

    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "pairs differ from brute force"
    assert torch.equal(got[2], want[2]), "distances differ from rms_cdist"
