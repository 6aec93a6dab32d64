"""Exact range search over large reference sets for SPELL (Kirchhof et al., ICML 2025, arXiv 2410.06025).

SPELL's push needs, for each x̂0 of the batch, every reference z_k with RMS distance ||x̂0 − z_k|| / sqrt(D) < r;
this package finds them exactly (no false negatives, no false positives). The method and its backends are
described in ``search``. One module per concern:

- ``shards``: memory-mapped safetensors shards (``read_header``, ``Shard``, ``LatentStore``) and the names of
  an index folder's files (``INDEX_FILE``, ``MANIFEST``, ``INDEX_FORMAT``).
- ``features``: the contractive lower-bound features (``pca_basis``, ``pool_basis``, ``Features``,
  ``project_store``, ``cascade_basis``) and the bounds' tunables (``SLACK``, ``CELL_DIM``, ``CASCADE_*``).
- ``cells``: range search in feature and subspace coordinates (``flat_torch``, ``ClusterCells``,
  ``annulus_rows``, ``kmeans``, ``nearest_centroid``, ``two_level_kmeans``, ``SubspaceCells``; optional faiss).
- ``search``: ``ReferenceIndex`` (build, range search, save, load, warm), ``resolve_backend``, ``BACKENDS``.
- ``pagecache``: the OS page cache under an index folder's files (``resident``, ``evict``, ``warm_files``: the
  background read-ahead ``ReferenceIndex.warm`` starts, so the first search after a restart does not wait on
  the disk).
- ``building``: the streaming, resumable shard builder (``build_shards``, ``complete_shards``, ``shard_name``;
  ``shard_dtype``: shards store float32 or float16, ``SHARD_DTYPES``, and are read as float32) and the
  containment checks of an index folder (``shards_within``, ``folder_within``).
- ``cli``: the command line, ``python -m spell_core.index build ...`` (``main``, ``latent_files``,
  ``folder_source``); it builds through ``spell_core.build``, which imports this package's modules, so it is
  imported only when one of its names is first used.

Every name is importable from ``spell_core.index`` itself.
"""
from __future__ import annotations

from ..storage import StorageError
from .building import build_shards, complete_shards, folder_within, shard_dtype, shard_name, shards_within
from .cells import (ClusterCells, SubspaceCells, annulus_rows, faiss, flat_torch, kmeans, nearest_centroid,
                    two_level_kmeans)
from .features import (CASCADE_CELL, CASCADE_ROUNDS, CASCADE_SPLIT, CELL_DIM, SLACK, Features, cascade_basis,
                       pca_basis, pool_basis, project_store)
from .search import AUTO_BACKEND, BACKENDS, CELL_SIZE, PRE_DIM, PROJECTIONS, ReferenceIndex, resolve_backend
from .shards import INDEX_FILE, INDEX_FORMAT, MANIFEST, SHARD_DTYPES, LatentStore, ProgressFn, Shard, read_header

_CLI = ("main", "latent_files", "folder_source")

__all__ = [
    "AUTO_BACKEND", "BACKENDS", "CASCADE_CELL", "CASCADE_ROUNDS", "CASCADE_SPLIT", "CELL_DIM", "CELL_SIZE",
    "INDEX_FILE", "INDEX_FORMAT", "MANIFEST", "PRE_DIM", "PROJECTIONS", "SHARD_DTYPES", "SLACK", "ClusterCells",
    "Features", "LatentStore", "ProgressFn", "ReferenceIndex", "Shard", "StorageError", "SubspaceCells",
    "annulus_rows", "build_shards", "cascade_basis", "complete_shards", "faiss", "flat_torch", "folder_within",
    "kmeans", "nearest_centroid", "pca_basis", "pool_basis", "project_store", "read_header", "resolve_backend",
    "shard_dtype", "shard_name", "shards_within", "two_level_kmeans", *_CLI,
]


def __getattr__(name: str):
    """The command line's names (``main``, ``latent_files``, ``folder_source``), imported on first use."""
    if name in _CLI:
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
