"""Small helpers shared by the browser and install tests (tests/ is on sys.path: tests/conftest.py)."""
from __future__ import annotations

import os
import socket

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
