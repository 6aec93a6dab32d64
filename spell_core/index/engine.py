"""The candidate stage of ``ReferenceIndex`` in Milvus, for shields that outgrow one machine (issue 13).

Only the contractive lower-bound features y(x) (``features.Features``: 33 floats a reference, not the latents)
are stored in a Milvus collection with a FLAT (exact) L2 index. A query sends the batch's features and the
squared feature radius t² that ``ReferenceIndex.candidates`` computes (with its float slack); Milvus returns
every reference with squared feature distance < t², a superset of the true neighbours, and the index rechecks
those candidates exactly on its shards as for every local backend. So the guarantee is the same: no misses.

The same client (``pymilvus``) talks to an embedded ``milvus-lite`` database (a folder whose name ends in
``.db``; the default, ``engine.db`` inside the index folder) and to a Milvus server or cluster (``http://``,
``https://``, ``tcp://`` or ``unix:`` URI; a token from the environment variable ``SPELL_MILVUS_TOKEN``).

What Milvus does that the pack must undo, each handled here:
- a search at the default (Strong) consistency waits for the server's time tick (docs/engine_server.md, a Milvus
  2.3.5 server: 8 queries over 200,000 features 399 ms Strong, 32 ms Bounded). The collection is written once, so
  the pack checks once, at upload and at connect, that the query nodes serve every row (a count(*) at Strong
  consistency) and then searches at Bounded consistency;
- a fresh upload is searched brute force until the server has built its FLAT index and handed the growing
  segments over to sealed ones (8 queries over 1.2 M features: 1.57 s at once after the load, 0.15 s after): the
  upload waits for both (``_wait_for_index``), up to ``INDEX_WAIT_S``;
- distances are squared L2 (``radius`` is compared with t², not t) and the radius is strict (``<``); t² has
  slack, so strictness cannot lose a reference the exact check keeps;
- a range search returns at most ``limit`` hits per query, the nearest ones (a cluster caps ``limit`` at
  16,384): a query that comes back full is asked again with ``GROWTH`` times the limit until its answer comes
  back short;
  one still full at 16,384 raises ``EngineError``: results are never cut silently. (Paging with ``range_filter``
  is not used: milvus-lite answers a range search from the top 5·limit hits, so a page past them comes back
  short and would look complete.)

The collection is named from a fingerprint of the features (SHA-256 of their bytes in reference order, the item
shape and N), so an index folder rebuilt from other images can never be answered from a stale collection;
``engine.json`` in the index folder records the URI, the collection and the fingerprint
(``python -m spell_core.index engine FOLDER [--uri URI]`` writes it; ``ReferenceIndex.load`` attaches it).
pymilvus is imported only when an engine is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..storage import StorageError, atomic_write_json

ENGINE_FILE = "engine.json"
DEFAULT_URI = "engine.db"  # milvus-lite, inside the index folder
TOKEN_ENV = "SPELL_MILVUS_TOKEN"
# Hits asked for per query in the first request. A shield query has few candidates (most have none), and
# milvus-lite's cost grows with the limit (it runs a top-5·limit search, then filters by radius): on 20,000 demo
# features, 8 queries cost 24 ms at limit 1, 29 ms at 16, 105 ms at 256, 351 ms at 1024. A Milvus 2.3.5 server's
# does not while the answers are short (docs/engine_server.md, 8 queries over 1.2 M features, about 16 hits each:
# 146 ms at limit 16, 149 ms at 1024, 136 ms at 16,384), and every request asked again is another scan of all the
# features, so a server starts at 1024.
PAGE = 16
SERVER_PAGE = 1024
GROWTH = 4  # a full answer is asked again with GROWTH times the limit
CLUSTER_MAX_LIMIT = 16384
UPLOAD_ROWS = 20000
REMOTE = ("http://", "https://", "tcp://", "grpc://", "unix:")
SEARCH_CONSISTENCY = "Bounded"  # after the Strong count(*) at upload / connect (module docstring)
INDEX_WAIT_S = 600.0


class EngineError(StorageError):
    """A search engine that cannot answer exactly (unreachable, missing or incomplete collection, a page that
    cannot progress); the message names the folder or URI and the fix."""


class CandidateLimitError(EngineError):
    """A query with more feature candidates than one Milvus search returns: answering would cut the result.
    ``shield.StepReuse`` catches it for its widened searches and searches those images at r instead."""


def _client(uri: str):
    try:
        from pymilvus import MilvusClient
    except ImportError as e:  # pragma: no cover - the test environment pins pymilvus
        raise EngineError("the Milvus search engine needs the pymilvus package (and milvus-lite for a local .db "
                          "file): pip install pymilvus milvus-lite") from e
    token = os.environ.get(TOKEN_ENV, "")
    try:
        return MilvusClient(uri=uri, token=token) if token else MilvusClient(uri=uri)
    except Exception as e:  # pymilvus raises its own exception classes, and grpc errors, for the same failure
        raise EngineError(f"cannot connect to the Milvus search engine at {uri} ({type(e).__name__}: {e}); "
                          f"start it or fix the URI") from e


def resolve_uri(uri: str, folder: str | os.PathLike) -> str:
    """A remote URI as given; a milvus-lite database path relative to the index folder, kept inside it."""
    if uri.startswith(REMOTE):
        return uri
    if not uri.endswith(".db"):
        raise EngineError(f"engine URI {uri!r}: give a milvus-lite database name ending in .db (kept in the index "
                          f"folder) or a server URI ({', '.join(REMOTE)}...)")
    folder = Path(folder).resolve()
    path = (folder / uri).resolve()
    if path.parent != folder:
        raise EngineError(f"engine database {uri!r} must be a plain name inside the index folder {folder}")
    return str(path)


def fingerprint(y: torch.Tensor, item_shape: tuple) -> str:
    """SHA-256 of the float32 features [N, m + 1] in reference order, with the item shape and N."""
    h = hashlib.sha256(json.dumps({"item_shape": list(item_shape), "n": int(len(y)), "dim": int(y.shape[1])}).encode())
    h.update(np.ascontiguousarray(y.numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


def collection_name(fp: str) -> str:
    """The collection that ``upload`` writes for features with fingerprint fp."""
    return f"spell_{fp[:40]}"


class MilvusEngine:
    """Feature range search in one Milvus collection: ``candidates(q, t2)`` -> (i, k) with ||y_k − q_i||² < t2_i
    for every such pair (and possibly a few more)."""

    def __init__(self, client, uri: str, collection: str, rows: int, dim: int, page: int | None = None):
        self.client, self.uri, self.collection = client, uri, collection
        self.rows, self.dim = int(rows), int(dim)
        self.page = int(page if page is not None else SERVER_PAGE if uri.startswith(REMOTE) else PAGE)
        self.max_limit = CLUSTER_MAX_LIMIT
        self.requests = 0  # search requests sent, pages included (the benchmark reports it)

    # ---- set-up ----
    @classmethod
    def upload(cls, y: torch.Tensor, item_shape: tuple, uri: str, collection: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> "MilvusEngine":
        """Stores features y [N, m + 1] (reference order) in a new collection, or reuses a complete one with the
        same fingerprint; an incomplete one (an interrupted upload) is dropped and written again."""
        fp = fingerprint(y, item_shape)
        name = collection or collection_name(fp)
        client = _client(uri)
        n, dim = y.shape
        try:
            if client.has_collection(name):
                if _row_count(client, name) == n:
                    client.load_collection(name)
                    _wait_for_index(client, name, n, uri)
                    if _served_rows(client, name) == n:
                        return cls(client, uri, name, n, dim)
                client.drop_collection(name)
            from pymilvus import DataType

            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("y", DataType.FLOAT_VECTOR, dim=int(dim))
            params = client.prepare_index_params()
            params.add_index("y", index_type="FLAT", metric_type="L2")
            client.create_collection(name, schema=schema, index_params=params)
            yn = np.ascontiguousarray(y.numpy(), dtype=np.float32)
            for a in range(0, n, UPLOAD_ROWS):
                b = min(n, a + UPLOAD_ROWS)
                client.insert(name, [{"id": k, "y": yn[k]} for k in range(a, b)])
                if progress is not None:
                    progress(b, n)
            if hasattr(client, "flush"):
                client.flush(name)
            client.load_collection(name)
            _wait_for_index(client, name, n, uri)
            got = _served_rows(client, name)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"uploading features to collection {name} at {uri} failed ({type(e).__name__}: {e})") from e
        if got != n:
            raise EngineError(f"collection {name} at {uri} holds {got} rows after the upload of {n}; run the upload again")
        return cls(client, uri, name, n, dim)

    @classmethod
    def connect(cls, uri: str, collection: str, rows: int, dim: int) -> "MilvusEngine":
        """Opens a collection written by ``upload``; EngineError unless it holds exactly ``rows`` rows."""
        client = _client(uri)
        try:
            if not client.has_collection(collection):
                raise EngineError(f"the Milvus engine at {uri} has no collection {collection}; upload the features "
                                  f"again (python -m spell_core.index engine <index folder> --uri {uri})")
            got = _row_count(client, collection)
            if got == rows:
                client.load_collection(collection)
                got = _served_rows(client, collection)
            if got != rows:
                raise EngineError(f"collection {collection} at {uri} holds {got} rows, the index {rows}; upload the "
                                  f"features again (python -m spell_core.index engine <index folder> --uri {uri})")
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"the Milvus engine at {uri} did not answer ({type(e).__name__}: {e})") from e
        return cls(client, uri, collection, rows, dim)

    # ---- queries ----
    def _search(self, q: np.ndarray, radius: float, limit: int):
        params = {"radius": radius}
        self.requests += 1
        try:
            return self.client.search(self.collection, data=[row for row in q], anns_field="y", limit=limit,
                                      search_params={"metric_type": "L2", "params": params}, output_fields=["id"],
                                      consistency_level=SEARCH_CONSISTENCY)
        except Exception as e:
            raise EngineError(f"range search in collection {self.collection} at {self.uri} failed "
                              f"({type(e).__name__}: {e})") from e

    def candidates(self, q: torch.Tensor, t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries q [B, m + 1] float32, squared radii t2 [B] -> (i, k) long [P], sorted by i."""
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        if len(q) == 0:
            return empty
        if q.shape[1] != self.dim:
            raise EngineError(f"queries have {q.shape[1]} features, collection {self.collection} {self.dim}")
        qn = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        # one radius per request (Milvus takes one): the widest, one float32 step up (the radius is strict)
        radius = float(np.nextafter(np.float32(t2.double().max()), np.float32(np.inf)))
        answers: dict[int, list] = {}
        todo, limit = list(range(len(qn))), min(self.page, self.max_limit)
        while todo:
            hits = self._search(qn[todo], radius, limit)
            full = []
            for i, h in zip(todo, hits):
                if len(h) >= limit:
                    full.append(i)
                else:
                    answers[i] = h
            if full and limit >= self.max_limit:
                raise CandidateLimitError(f"{len(full)} queries have {limit} or more feature candidates in "
                                          f"collection {self.collection}, the most one Milvus search returns: the "
                                          f"answer would be cut; use a smaller radius r, or search this set with the "
                                          f"local index (remove {ENGINE_FILE} from its folder)")
            todo, limit = full, min(GROWTH * limit, self.max_limit)
        ii = [torch.full((len(answers[i]),), i, dtype=torch.long) for i in sorted(answers) if answers[i]]
        kk = [torch.tensor([int(x["id"]) for x in answers[i]], dtype=torch.long) for i in sorted(answers) if answers[i]]
        return (torch.cat(ii), torch.cat(kk)) if ii else empty

    def describe(self) -> str:
        where = "milvus-lite " + Path(self.uri).name if not self.uri.startswith(REMOTE) else self.uri
        return f"Milvus engine ({where}, collection {self.collection}, {self.rows} rows)"


def _row_count(client, name: str) -> int:
    """Rows the collection has stored (flushed)."""
    return int(client.get_collection_stats(name).get("row_count", -1))


def _served_rows(client, name: str) -> int:
    """Rows the query nodes of a loaded collection answer from, at Strong consistency: once this equals N, every
    later search sees every row whatever its consistency level."""
    res = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"]) if res else 0


def _wait_for_index(client, name: str, n: int, uri: str, wait_s: float = INDEX_WAIT_S) -> None:
    """Waits until a server searches all n rows through its FLAT index: the index covers them and the query
    nodes hold them in sealed segments (a server hands the growing segments of a fresh upload over to sealed,
    indexed ones some seconds after the load; until then it answers slower, never less exactly). milvus-lite
    builds its index at once: nothing to wait for. Gives up quietly after wait_s."""
    if not uri.startswith(REMOTE):
        return
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            info = client.describe_index(name, "y") or {}
            if int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0:
                segments = client.list_loaded_segments(name)
                if sum(int(s.num_rows) for s in segments if "sealed" in str(s.state).lower()) >= n:
                    return
        except Exception:  # a server without these calls: nothing to wait for
            return
        time.sleep(0.5)


# ---- an index folder's engine record ----
def write_record(folder: str | os.PathLike, engine: MilvusEngine, fp: str, given_uri: str) -> Path:
    path = Path(folder) / ENGINE_FILE
    atomic_write_json(path, {"engine": "milvus", "uri": given_uri, "collection": engine.collection,
                             "fingerprint": fp, "rows": engine.rows, "dim": engine.dim})
    return path


def read_record(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / ENGINE_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is not readable JSON ({e}); remove it to search locally, or write it again "
                          f"with python -m spell_core.index engine {folder}") from e
    if not isinstance(rec, dict) or rec.get("engine") != "milvus" or not all(
            k in rec for k in ("uri", "collection", "fingerprint", "rows", "dim")):
        raise EngineError(f"{path} is not a SPELL engine record; remove it to search locally, or write it again "
                          f"with python -m spell_core.index engine {folder}")
    return rec


def attach_recorded(index, folder: str | os.PathLike) -> None:
    """Attaches the engine that folder/engine.json names to index (a ``ReferenceIndex`` opened from folder);
    nothing if the folder has no record. EngineError if the record's features are not this index's (the folder
    was rebuilt since the upload) or the engine cannot answer for them."""
    rec = read_record(folder)
    if rec is None:
        return
    fp = fingerprint(index.reference_features(), tuple(index.item_shape))
    if rec["fingerprint"] != fp or int(rec["rows"]) != len(index):
        raise EngineError(f"{Path(folder) / ENGINE_FILE} names features of another build of this index (it was "
                          f"rebuilt since the upload); upload them again: python -m spell_core.index engine {folder}"
                          f" --uri {rec['uri']}, or remove {ENGINE_FILE} to search locally")
    eng = MilvusEngine.connect(resolve_uri(str(rec["uri"]), folder), str(rec["collection"]), len(index),
                               int(rec["dim"]))
    index.use_engine(eng)


def upload_folder(index, folder: str | os.PathLike, uri: str = DEFAULT_URI, collection: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> MilvusEngine:
    """Stores the features of index (opened from folder) in the engine at uri, attaches it, and writes
    folder/engine.json so that every later ``ReferenceIndex.load`` of the folder searches through it."""
    y = index.reference_features()
    eng = MilvusEngine.upload(y, tuple(index.item_shape), resolve_uri(uri, folder), collection, progress)
    write_record(folder, eng, fingerprint(y, tuple(index.item_shape)), uri)
    index.use_engine(eng)
    return eng
