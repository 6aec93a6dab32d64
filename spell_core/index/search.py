"""Exact range search over large reference sets for SPELL (Kirchhof et al., ICML 2025, arXiv 2410.06025).

SPELL's push needs, for each x̂0 of the batch, every reference z_k with RMS distance ||x̂0 − z_k|| / sqrt(D) < r.
The paper uses approximate nearest neighbours; this index is exact (no false negatives, no false positives):

1. A contractive feature map y(x) = [W(x − μ), ||(I − WᵀW)(x − μ)||] with W an orthonormal PCA basis [m, D]
   (or an average-pooling basis). For an orthogonal projector Q = WᵀW,
   ||x − z||² = ||Q(x − z)||² + ||(I − Q)(x − z)||² ≥ ||W(x − z)||² + (ρ(x) − ρ(z))², so ||y(x) − y(z)|| ≤ ||x − z||.
2. A range search in feature space with radius r·sqrt(D) plus a float slack (computed in float64 for the
   projection; slack covers float32 storage and scan error) gives a superset of the true neighbours.
3. Candidates are checked with exact float32 distances on the full latents (``repellency.rms_cdist``).

Backends for step 2: "cascade" (default; ``SubspaceCells``: k-means cells whose centres lie in the top-256
PCA subspace, so that distances to them are exact full-space distances; the triangle inequality in the full
space cuts every cell to an annulus and drops most cells, then the 33-dim feature bound runs on the survivors
only — cost grows with the number of cells and the rows near the query, not with N·33; where the annulus would
keep more than ANNULUS_FLAT of all rows, the 8-coordinate feature prefix of every row is scanned instead), "torch" (brute
force over all features, chunked, CPU or CUDA), "faiss" (faiss-cpu IndexFlatL2 range search over the
features) and "clusters" (k-means cells on the features, pruned exactly with the triangle inequality in
feature space, members sorted by distance to their centroid so each cell is cut to an annulus).

Modules: ``shards`` (storage), ``features`` (step 1), ``cells`` (step 2), this one (``ReferenceIndex``: step 3,
saving and loading).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..repellency import flat32, rms_cdist
from ..storage import StorageError, atomic_save, check_finite, remove_stale_temporaries, save_latents
from .building import shard_name, shards_within
from .cells import ClusterCells, SubspaceCells, faiss, flat_torch
from .features import CASCADE_CELL, CELL_DIM, SLACK, Features, cascade_basis, pca_basis, pool_basis, project_store
from .shards import INDEX_FILE, INDEX_FORMAT, LatentStore, ProgressFn, read_header

BACKENDS = ("auto", "torch", "faiss", "clusters", "cascade")
PROJECTIONS = ("pca", "pool")
# "auto" is the cascade: full-space annulus pruning of subspace-centred cells, then the PCA-32 bound, then
# the exact recheck. Measured (docs/index_benchmark.md, CPU time, 1 thread): 2.4–4.8× less than the flat
# scans ("torch", "faiss") at 10k–100k, on par with the torch flat scan at 1.2M. "clusters" prunes in the 33-dim feature space, where its cell
# bounds were too loose on the benchmark latents to pay off.
AUTO_BACKEND = "cascade"
# References per k-means cell of the "clusters" backend (measured in docs/index_benchmark.md).
CELL_SIZE = 32
# The cascade checks the first PRE_DIM feature coordinates (the top principal directions) on the annulus
# survivors before all of them: a partial sum of squares is a lower bound too, and reading 8 floats a row
# instead of 33 is what costs there (measured on 1.2 M demo latents: 4.2 -> 2.1 ms per search of 8 queries).
PRE_DIM = 8
# When the annulus of the live cells would keep more than this share of all rows (queries close to dense parts
# of the set, as late sampling steps are), the cascade checks the PRE_DIM prefix of every row by one chunked
# matmul instead of listing the annulus rows and gathering theirs: profiled on 1.5 M SD1.5-shaped references,
# listing and checking cost ~146 ns a row left by the annulus, the scan 22-32 ns a row of the whole set
# (docs/index_realres_largest.md, history; 2.13x per step side by side there).
ANNULUS_FLAT = 0.2


def resolve_backend(backend: str, n: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and faiss is None:
        raise ValueError("backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)")
    if backend == "auto":
        return AUTO_BACKEND
    return backend


class ReferenceIndex:
    """Exact RMS range search over N reference latents (see the module docstring for the method).

    Build with ``ReferenceIndex.build``; ``range_search(x, r)`` returns every pair (i, k, d) with
    d = ||x_i − z_k|| / sqrt(D) < r, with d as ``repellency.rms_cdist`` computes it.
    """

    def __init__(self, store: LatentStore, features: Features, y: torch.Tensor, znorm_max: float,
                 backend: str, cells: ClusterCells | None = None, order: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", meta: dict | None = None,
                 subcells: SubspaceCells | None = None):
        self.store, self.features, self.znorm_max = store, features, float(znorm_max)
        self.cells, self.order, self.meta = cells, order, dict(meta or {})
        self.subcells = subcells
        self.engine = None  # engine.MilvusEngine answering the candidate stage instead of the local backend
        self.device = torch.device(device)
        self.y = y  # [N, m + 1] float32, in cell order when cells or subcells is set
        self.backend = resolve_backend(backend, len(store))
        self._prepare()

    # ---- construction ----
    @classmethod
    def build(cls, latents: torch.Tensor | Sequence[str | os.PathLike], backend: str = "auto",
              projection: str = "pca", dim: int = 32, pool: int = 4, cells: int | None = None,
              fit_rows: int = 2048, device: str | torch.device = "cpu", progress: ProgressFn | None = None,
              seed: int = 0) -> "ReferenceIndex":
        """Index latents: a float tensor [N, ...] or a list of shard files (memory-mapped, streamed).

        projection "pca" keeps the top ``dim`` principal directions of ``fit_rows`` sampled rows;
        "pool" averages ``pool``×``pool`` blocks. ``cells`` (k-means cells for the "clusters" backend)
        defaults to N / CELL_SIZE (N / CASCADE_CELL before splits for "cascade", whose cells live in the
        top-CELL_DIM PCA subspace). ``progress(done, total)`` is called as rows are projected.
        """
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if isinstance(latents, torch.Tensor):
            if latents.ndim < 2:
                raise ValueError(f"latents must be [N, ...], got shape {tuple(latents.shape)}")
            check_finite(latents, "reference latents")
            store = LatentStore(latents.shape[1:], tensor=flat32(latents).cpu().contiguous())
        else:
            store = LatentStore.from_files(latents)
        n, dmodel = len(store), store.dim
        backend = resolve_backend(backend, n)
        cascade = backend == "cascade" and n > 0
        sub = None  # (mu, basis [M, D]) of the cascade's cell subspace
        if projection == "pca":
            m = max(1, min(dim, dmodel, max(n - 1, 1)))
            mc = max(m, min(CELL_DIM, dmodel, max(n - 1, 1))) if cascade else m
            if n >= 2:
                mu, basis = pca_basis(store.sample(fit_rows, seed), mc, seed)
            else:
                mu, basis = torch.zeros(dmodel, dtype=torch.float64), torch.eye(mc, dmodel, dtype=torch.float64)
            w = basis[:m].contiguous()
            if cascade:
                sub = (mu, basis)
        else:
            w = pool_basis(store.item_shape, pool)
            mu = store.sample(fit_rows, seed).double().mean(0) if n else torch.zeros(dmodel, dtype=torch.float64)
        feats = Features(mu, w)
        if sub is not None:  # one pass gives the features and the subspace coordinates
            y, p, rho2, znorm = project_store(store, mu, sub[1], w.shape[0], progress)
        else:
            y = torch.empty(n, feats.dim)
            znorm = 0.0
            for a, rows in store.chunks(8192):
                if store.tensor is None:
                    check_finite(rows, f"reference rows {a}..{a + len(rows)}")
                yy, nn = feats(rows)
                y[a:a + len(rows)] = yy.float()
                znorm = max(znorm, float(nn.max()))
                if progress is not None:
                    progress(a + len(rows), n)
        cell_index, order, subcells = None, None, None
        if backend == "clusters" and n:
            cell_index, order = ClusterCells.fit(y, cells or max(1, n // CELL_SIZE), seed=seed)
            y = y[order].contiguous()
        if cascade:
            if sub is None:  # pooled features: the cells still need a PCA subspace (a second pass)
                sub = cascade_basis(store, fit_rows, seed)
                _, p, rho2, _ = project_store(store, sub[0], sub[1], 0, check=False)
            subcells, order = SubspaceCells.fit(sub[0], sub[1], p, rho2, cells or max(1, n // CASCADE_CELL), seed)
            del p, rho2
            y = y[order].contiguous()
        meta = {"projection": projection, "dim": int(w.shape[0]), "pool": pool}
        return cls(store, feats, y, znorm, backend, cell_index, order, device, meta, subcells)

    def _prepare(self):
        self._faiss = None
        self._y2 = None
        if self.backend == "clusters" and self.cells is None and len(self):
            self.cells, self.order = ClusterCells.fit(self.y, max(1, len(self) // CELL_SIZE))
            self.y = self.y[self.order].contiguous()
        if self.backend == "cascade" and self.subcells is None and len(self):
            mu, basis = cascade_basis(self.store, 2048, 0)
            _, p, rho2, _ = project_store(self.store, mu, basis, 0, check=False)
            self.subcells, self.order = SubspaceCells.fit(mu, basis, p, rho2, max(1, len(self) // CASCADE_CELL))
            del p, rho2
            self.y = self.y[self.order].contiguous()
        self._ypre = self.y[:, :PRE_DIM].contiguous() if self.backend == "cascade" else None
        self._ypre2 = (self._ypre * self._ypre).sum(1) if self._ypre is not None else None
        if self.backend == "torch":
            self._yd = self.y.to(self.device)
            self._y2 = (self._yd * self._yd).sum(1)
        if self.backend == "faiss":
            self._faiss = faiss.IndexFlatL2(self.y.shape[1])
            self._faiss.add(np.ascontiguousarray(self.y.numpy()))
        ynorm = self.y.norm(dim=1)
        self.ynorm_max = float(ynorm.max()) if len(ynorm) else 0.0

    def with_backend(self, backend: str, device: str | torch.device | None = None) -> "ReferenceIndex":
        """The same references and features searched by another backend (recomputes cells if needed: for
        "cascade" that is one more pass over all latents)."""
        y = self.y if self.order is None else self.y[torch.argsort(self.order)]
        return ReferenceIndex(self.store, self.features, y, self.znorm_max, backend, device=device or self.device,
                              meta=self.meta)

    def reference_features(self) -> torch.Tensor:
        """The lower-bound features y [N, m + 1] float32 in reference order (what an engine stores)."""
        return self.y if self.order is None else self.y[torch.argsort(self.order)]

    def use_engine(self, engine) -> "ReferenceIndex":
        """Answers the candidate stage with engine (``engine.MilvusEngine``, holding ``reference_features``);
        None: the local backend again. The exact recheck stays local."""
        if engine is not None and (engine.rows != len(self) or engine.dim != self.y.shape[1]):
            raise ValueError(f"engine holds {engine.rows} x {engine.dim} features, the index {len(self)} x "
                             f"{self.y.shape[1]}")
        self.engine = engine
        return self

    # ---- queries ----
    def __len__(self) -> int:
        return len(self.store)

    @property
    def item_shape(self) -> tuple:
        return self.store.item_shape

    def get(self, k: torch.Tensor) -> torch.Tensor:
        """Reference latents k [P] -> [P, ...] float32."""
        k = torch.as_tensor(k, dtype=torch.long)
        if len(k) and (int(k.min()) < 0 or int(k.max()) >= len(self)):
            raise IndexError(f"reference ids must lie in [0, {len(self)}), got {int(k.min())}..{int(k.max())}")
        return self.store.get(k).reshape(len(k), *self.item_shape)

    def candidates(self, x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (i, k) whose feature distance allows RMS distance < r: a superset of the true pairs."""
        xf = flat32(x)
        q, xn = self.features(xf)
        dmodel = xf.shape[1]
        # lower-bound radius in L2 units with slack for float error in features (∝ norms) and in the scan
        t = r * math.sqrt(dmodel) + SLACK * (xn + self.znorm_max)
        t = t + SLACK * (q.norm(dim=1) + self.ynorm_max)
        # matmul-expanded squared distances (torch, faiss) err by ~1e-6·(|q|² + |y|²) even for tiny radii
        t2 = t * t + SLACK * (q.norm(dim=1) + self.ynorm_max) ** 2
        qf = q.float()
        if self.engine is not None:  # the same features and radius, searched by Milvus (``engine``)
            return self.engine.candidates(qf, t2)
        if self.backend == "torch":
            return flat_torch(self._yd, self._y2, qf, t2)
        if self.backend == "faiss":
            lims, _, k = self._faiss.range_search(np.ascontiguousarray(qf.numpy()), float(t2.max()))
            lims = torch.from_numpy(lims.astype(np.int64))
            i = torch.repeat_interleave(torch.arange(len(q)), lims[1:] - lims[:-1])
            k = torch.from_numpy(k.astype(np.int64))
            d2 = (self.y[k] - qf[i]).pow(2).sum(1)  # per-query radius (faiss takes one for the batch)
            keep = d2 <= (t[i] * t[i]).float()  # direct differences: t's slack suffices
            return i[keep], k[keep]
        if self.backend == "cascade":
            # full-space annulus around subspace-centred cells, then the cheap 33-dim feature bound on its
            # survivors (33 floats a row), then the 256-dim subspace bound on what is left
            sig = SLACK * (xn + self.znorm_max)
            cap = ANNULUS_FLAT * len(self)  # math.inf: always list the annulus rows
            i, pos, pq, rq2 = self.subcells.annulus(xf, t, sig, max_rows=int(cap) if math.isfinite(cap) else None)
            t2f = (t * t).float()
            if i is None:  # the annulus would keep most rows: the prefix of all of them, matmul-expanded (t2's slack)
                i, pos = flat_torch(self._ypre, self._ypre2, qf[:, :PRE_DIM], t2, chunk=65536)
            elif self.y.shape[1] > PRE_DIM:  # the top PRE_DIM coordinates alone: a partial sum, still a bound
                d2 = self._ypre[pos].sub_(qf[i, :PRE_DIM]).pow_(2).sum(1)
                keep = d2 <= t2f[i]
                i, pos = i[keep], pos[keep]
            d2 = self.y[pos].sub_(qf[i]).pow_(2).sum(1)  # direct differences: t's slack suffices
            keep = d2 <= t2f[i]
            i, pos = self.subcells.stage2(i[keep], pos[keep], pq, rq2, t, sig)
            return i, self.order[pos]
        i, pos = self.cells.search(self.y, qf, t.float())
        return i, self.order[pos]

    def range_search(self, x: torch.Tensor, r: float, chunk: int = 65536):
        """Every (i, k, d) with d = RMS distance(x_i, z_k) < r; x [B, ...] -> i, k [P] long, d [P] float32.

        Pairs are sorted by (i, k). Exact: candidates come from a contractive lower bound with slack,
        distances are recomputed in float32 on the full latents.
        """
        if not r > 0 or not math.isfinite(r):
            raise ValueError(f"range_search radius r must be a finite number > 0, got {r}")
        if tuple(x.shape[1:]) != self.item_shape and not (x.ndim == 2 and x.shape[1] == self.store.dim):
            raise ValueError(f"queries of item shape {tuple(x.shape[1:])} do not match the index's {self.item_shape}")
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        if len(self) == 0 or x.shape[0] == 0:
            return empty
        xf = flat32(x).cpu()
        ci, ck = self.candidates(xf, r)
        if len(ci) == 0:
            return empty
        if len(ci) <= chunk:  # common case: sort pairs by (i, k), read each candidate once in row order
            o = torch.argsort(ci * len(self) + ck)
            ci, ck = ci[o], ck[o]
            uk, inv = torch.unique(ck, return_inverse=True)
            z = self._read(uk)
            bounds = torch.searchsorted(ci, torch.arange(xf.shape[0] + 1)).tolist()
            outs = []
            for q in range(xf.shape[0]):
                a, b = bounds[q], bounds[q + 1]
                if b > a:  # one rms_cdist row per query: work ∝ candidate pairs
                    d = rms_cdist(xf[q:q + 1], z[inv[a:b]])[0]  # exact float32, as the brute force computes it
                    keep = d < r
                    outs.append((ci[a:b][keep], ck[a:b][keep], d[keep]))
            i, k, d = (torch.cat(t) for t in zip(*outs))
            return i, k, d
        outs = []
        uk, inv = torch.unique(ck, return_inverse=True)
        for a in range(0, len(uk), chunk):  # each candidate latent is read once, in chunks
            z = self.store.get(uk[a:a + chunk])
            sel = (inv >= a) & (inv < a + chunk)
            ii, kk, uu = ci[sel], ck[sel], inv[sel] - a
            for q in torch.unique(ii).tolist():  # one rms_cdist row per query: work ∝ candidate pairs
                mq = ii == q
                d = rms_cdist(xf[q:q + 1], z[uu[mq]])[0]  # exact float32, as the brute force computes it
                keep = d < r
                outs.append((ii[mq][keep], kk[mq][keep], d[keep]))
        i, k, d = (torch.cat(t) for t in zip(*outs))
        order = torch.argsort(i * len(self) + k)
        return i[order], k[order], d[order]

    def _read(self, uk: torch.Tensor) -> torch.Tensor:
        """Latents of sorted unique ids uk [U] -> [U, D], read into a buffer reused across calls (no fresh
        page faults per step); valid until the next call."""
        if self.store.tensor is not None:
            return self.store.tensor[uk]
        buf = getattr(self, "_buf", None)
        if buf is None or len(buf) < len(uk):
            self._buf = buf = torch.empty(max(len(uk), 2048), self.store.dim)
        return self.store.get_sorted(uk.numpy(), buf)

    def warm(self, also: Sequence[str | os.PathLike] = (), share: float | None = None):
        """Starts reading the shards (after the files in ``also``, e.g. the folder's index.safetensors) into the
        OS page cache in a background thread, if they all fit in share (default ``pagecache.WARM_SHARE``) of the
        memory available; otherwise reads nothing. Returns the ``pagecache.Warmup`` (``summary()`` says which),
        also kept as ``self.warmup``; None for latents held in memory. The process' own memory does not grow."""
        from .pagecache import warm_files

        if self.store.tensor is not None:
            return None
        self.warmup = warm_files([*also, *(s.path for s in self.store.shards)], share)
        return self.warmup

    # ---- persistence ----
    def save(self, folder: str | os.PathLike) -> None:
        """Writes folder/index.safetensors (features, cells; no pickle); in-memory latents go to shards there."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.store.tensor is not None:
            files, rows = [], []
            for j, a in enumerate(range(0, max(len(self), 1), 65536)):
                block = self.store.tensor[a:a + 65536]
                save_latents(folder / shard_name(j), block.reshape(-1, *self.item_shape))
                files.append(shard_name(j))
                rows.append(len(block))
        else:
            files = [os.path.relpath(s.path.resolve(), folder.resolve()) for s in self.store.shards]
            rows = [len(s) for s in self.store.shards]
        tensors = {"mu": self.features.mu, "w": self.features.w, "y": self.y}
        if self.cells is not None:
            tensors.update(self.cells.tensors(), order=self.order)
        if self.subcells is not None:
            tensors.update(self.subcells.tensors(), order=self.order)
        meta = {"format": INDEX_FORMAT, "backend": self.backend, "item_shape": json.dumps(self.item_shape),
                "shards": json.dumps(files), "rows": json.dumps(rows),
                "dtypes": json.dumps(["float32"] * len(files) if self.store.tensor is not None else self.store.dtypes),
                "znorm_max": repr(self.znorm_max), "meta": json.dumps(self.meta)}
        atomic_save({k: v.contiguous() for k, v in tensors.items()}, folder / INDEX_FILE, meta)

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: str | None = None,
             device: str | torch.device = "cpu", within: str | os.PathLike | None = None,
             engine: bool = True) -> "ReferenceIndex":
        """Opens an index written by save; shard rows are read on demand, never whole. engine: attach the Milvus
        engine the folder's engine.json names (``engine.attach_recorded``; EngineError if it cannot answer for
        these features); False: search locally. within: a folder every
        shard the index lists must resolve inside (``spell_core.paths.contained``; the pack passes the index
        folder itself), else StorageError before any shard is opened; None: shards may lie anywhere (library use,
        shards built elsewhere)."""
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            raise StorageError(f"{folder} holds no {INDEX_FILE}")
        remove_stale_temporaries(path)  # of a killed rewrite of the index
        header, _ = read_header(path)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != INDEX_FORMAT:
            raise StorageError(f"{path} is not a SPELL index (format {meta.get('format')!r})")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StorageError(f"{path} is corrupt ({e})") from e
        files = [folder / f for f in json.loads(meta["shards"])]
        if within is not None:
            files = shards_within(files, within, path)
        item_shape = tuple(json.loads(meta["item_shape"]))
        store = LatentStore.from_files(files)
        if store.item_shape != item_shape or [len(s) for s in store.shards] != json.loads(meta["rows"]):
            raise StorageError(f"shards under {folder} do not match the index (rows or item shape changed)")
        # the features were computed from the stored values: shards rewritten in another dtype are other values
        # (indexes saved before dtypes were recorded hold float32 shards)
        if store.dtypes != json.loads(meta.get("dtypes", json.dumps(["float32"] * len(store.shards)))):
            raise StorageError(f"shards under {folder} do not match the index (stored as {store.dtypes}, indexed "
                               f"as {json.loads(meta.get('dtypes', '[]')) or 'float32'}); rebuild the index")
        saved = meta["backend"]
        cells = order = subcells = None
        if "centroids" in t:
            cells, order = ClusterCells(t["centroids"], t["cell_off"], t["cell_s"]), t["order"]
        if "cc_centres" in t:
            subcells, order = SubspaceCells.from_tensors(t), t["order"]
        y = t["y"]
        backend = resolve_backend(backend or saved, len(store))
        if order is not None and not ((backend == "clusters" and cells is not None)
                                      or (backend == "cascade" and subcells is not None)):
            y, cells, subcells, order = y[torch.argsort(order)], None, None, None
        index = cls(store, Features(t["mu"], t["w"]), y, float(meta["znorm_max"]), backend, cells, order, device,
                    json.loads(meta.get("meta", "{}")), subcells)
        if engine:
            from .engine import attach_recorded

            attach_recorded(index, folder)
        return index

