"""The two-layer response cache: exact key first, then meaning within a namespace.

Memory holds everything needed to answer a lookup (entries, exact keys, FAISS
indexes), so a hit never waits on the database; the database holds the same
entries durably and is written on store, purge, eviction and sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from cache import store as db
from cache.bound import COSINE_GRID, VERIFIER_GRID, Decision
from cache.calibration import CalibrationBook, scorer_name
from cache.config import CacheSettings
from cache.embedder import BatchEmbedder, Embedder
from cache.features import TextInfo
from cache.index import SemanticIndex
from cache.judge import answers_match, is_deterministic
from cache.keys import canonical_hash, query_text
from cache.threads import blas_limiter, limit_torch_threads
from cache.verifier import Verifier

log = logging.getLogger(__name__)

_RECENT_VECTORS = 1024  # a miss is usually followed by a store of the same query


@dataclass
class CacheHit:
    response: dict
    similarity: float
    layer: str  # "exact" | "semantic"
    entry_id: str
    verifier_score: float | None = None


@dataclass
class Candidate:
    """The best semantic candidate of a lookup that was not served from the
    cache: comparing its answer with the backend's gives the bound a verdict."""

    response: dict
    similarity: float
    score: float  # what the bound decides on: verifier probability, else cosine
    calibration: tuple[str, str, str]  # tenant, model, scorer


@dataclass
class Consultation:
    """What a lookup decided: a hit to serve, or a candidate to judge later."""

    hit: CacheHit | None
    candidate: Candidate | None = None
    action: str = "miss"  # exact | serve | explore | miss
    # Under a wrong-hit bound (max_error given): the threshold and bound in force.
    bound: Decision | None = None


@dataclass
class _Entry:
    namespace: str
    tenant: str
    exact_key: str
    query: str
    response: str  # JSON text: parsed per hit so callers can never mutate the cache
    expires_at: float


class SemanticCache:
    def __init__(
        self,
        settings: CacheSettings,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.engine = engine
        # Injectable so TTL behaviour can be tested without sleeping.
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, oldest first
        self._exact: dict[str, str] = {}
        # Answers being stored (embedding and database write in flight), by exact
        # key: a client that repeats a request the moment its answer arrives
        # must hit the exact layer, not race the store.
        self._storing: dict[str, _Entry] = {}
        self._index: SemanticIndex | None = None
        self._embedder: BatchEmbedder | None = None
        self._verifier: Verifier | None = None
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        # Each entry's tokenisation for the verifier, computed once when the
        # entry is remembered instead of on every lookup it is a candidate of.
        self._infos: dict[str, TextInfo] = {}
        self._touched: dict[str, tuple[float, int]] = {}
        self._stored_at: dict[str, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closed_batches = 0
        self._numeric_limit: Callable[[], AbstractContextManager[Any]] = nullcontext
        self.calibration = CalibrationBook(engine)
        self._scorer = ""
        self._counters = dict.fromkeys(
            (
                "hits_exact",
                "hits_semantic",
                "misses",
                "verifier_rejections",
                "explorations",
                "verdicts",
                "verdicts_wrong",
                "stores",
                "evictions",
                "expirations",
            ),
            0,
        )

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._embedder is not None:
            return
        await asyncio.to_thread(db.create_table, self.engine)
        embedder = await asyncio.to_thread(
            Embedder, self.settings.embedder, self.settings.device, self.settings.embedder_runtime
        )
        self._verifier = await asyncio.to_thread(self._load_verifier)
        self._scorer = self._scorer_name()
        await self.calibration.load()
        threads = self.settings.numeric_threads
        self._index = SemanticIndex(embedder.dim, use_gpu=self.settings.use_gpu, threads=threads)
        self._numeric_limit = blas_limiter(threads)
        limit_torch_threads(threads, embedder.device_type)
        await self._rebuild(embedder)
        self._embedder = BatchEmbedder(
            embedder,
            self.settings.batch_max_size,
            self.settings.batch_max_wait_ms,
            after=self._search_batch,
        )
        await self._embedder.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="bearpaw-cache-sweeper")

    def _load_verifier(self) -> Verifier | None:
        path = self.settings.verifier_path
        try:
            return Verifier.load(path)
        except FileNotFoundError:
            log.warning(
                "no verifier at %s; semantic hits need cosine >= %.2f",
                path or "cache/data/verifier.npz",
                self.settings.fallback_min_similarity,
            )
            return None

    def _scorer_name(self) -> str:
        meta = self._verifier.meta if self._verifier is not None else None
        return scorer_name(meta, self.settings.embedder)

    @property
    def grid(self) -> tuple[float, ...]:
        return VERIFIER_GRID if self._verifier is not None else COSINE_GRID

    async def _rebuild(self, embedder: Embedder) -> None:
        """Reload unexpired rows; re-embed only rows from another embedding model."""
        rows = await asyncio.to_thread(lambda: list(db.load_live(self.engine, self._clock())))
        stale = [
            r
            for r in rows
            if r.model != embedder.name or not r.embedding or len(r.embedding) != 4 * embedder.dim
        ]
        fresh_vectors: dict[str, np.ndarray] = {}
        if stale:
            vectors = await asyncio.to_thread(embedder.encode, [r.query for r in stale])
            fresh_vectors = {r.id: vec for r, vec in zip(stale, vectors, strict=True)}
        for row in rows:
            vector = fresh_vectors.get(row.id)
            if vector is None and row.embedding:
                vector = db.bytes_to_vector(row.embedding)
            self._remember(
                row.id,
                row.namespace,
                row.tenant,
                row.exact_key,
                row.query,
                row.response,
                row.expires_at,
                vector,
            )
        # Rows are replayed oldest-hit first, so the OrderedDict is already in LRU order.
        if len(self._entries) > self.settings.max_entries:
            await self._evict_over_limit()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        await self._flush_hits()
        try:
            await self.calibration.sync()
        except Exception:  # bookkeeping only: a failed write must not block shutdown
            log.exception("could not persist cache calibration")
        if self._embedder is not None:
            self._closed_batches += self._embedder.batches
            await self._embedder.close()
            self._embedder = None

    # -------------------------------------------------------------------- lookup

    async def lookup(
        self, namespace: str, request: dict, operating_point: str = "balanced"
    ) -> CacheHit | None:
        """A hit under the fixed operating point (no wrong-hit bound), or None."""
        found = await self.consult(namespace, request, operating_point=operating_point)
        return found.hit

    async def consult(
        self,
        namespace: str,
        request: dict,
        *,
        tenant: str = "",
        model: str = "",
        operating_point: str = "balanced",
        max_error: float | None = None,
    ) -> Consultation:
        """Looks a request up. With ``max_error`` (δ) a semantic candidate is
        served, explored or missed by the tenant's wrong-hit bound
        (cache/bound.py); without it, by the fixed operating point."""
        if self._embedder is None or not self.settings.enabled:
            return Consultation(None)
        key = (tenant, model, self._scorer)
        bound = None
        if max_error is not None:
            bound = self.calibration.get(key, self.grid).summary(max_error)
        now = self._clock()
        exact_key = canonical_hash(namespace, request)
        entry_id = self._exact.get(exact_key)
        if entry_id is not None:
            entry = self._live_entry(entry_id, now)
            # The exact key already contains the namespace; the check is belt and braces.
            if entry is not None and entry.namespace == namespace:
                self._counters["hits_exact"] += 1
                hit = self._hit(entry_id, entry, now, 1.0, "exact", None)
                return Consultation(hit, action="exact", bound=bound)
        storing = self._storing.get(exact_key)
        if storing is not None and storing.namespace == namespace:
            self._counters["hits_exact"] += 1
            hit = CacheHit(json.loads(storing.response), 1.0, "exact", "storing", None)
            return Consultation(hit, action="exact", bound=bound)

        query = query_text(request).strip()
        if not query or self._index is None:
            self._counters["misses"] += 1
            return Consultation(None, bound=bound)
        best = await self._best(namespace, query)
        if best is None:
            self._counters["misses"] += 1
            return Consultation(None, bound=bound)
        eid, sim, entry, score = best
        candidate = Candidate(
            json.loads(entry.response), sim, score if score is not None else sim, key
        )
        if max_error is None:
            # No bound in force, but the traffic still weighs the bound's bins.
            cal = self.calibration.get(key, self.grid)
            cal.observe(candidate.score)
            threshold = self._fixed_threshold(operating_point)
            if candidate.score < threshold:
                self._counters["verifier_rejections"] += 1
                self._counters["misses"] += 1
                # Only bins wholly below the fixed threshold are judged on every
                # lookup; in the bin it cuts, verdicts would come from its
                # lower part alone and misrepresent the bin.
                fair = cal.bin_top(candidate.score) <= threshold
                return Consultation(None, candidate if fair else None)
            self._counters["hits_semantic"] += 1
            hit = self._hit(eid, entry, self._clock(), sim, "semantic", score)
            return Consultation(hit, action="serve")
        bound = self.calibration.get(key, self.grid).decide(candidate.score, max_error)
        if bound.action == "serve":
            self._counters["hits_semantic"] += 1
            hit = self._hit(eid, entry, self._clock(), sim, "semantic", score)
            return Consultation(hit, action="serve", bound=bound)
        if bound.action == "explore":
            self._counters["explorations"] += 1
        else:
            self._counters["misses"] += 1
        return Consultation(None, candidate, bound.action, bound)

    async def _best(
        self, namespace: str, query: str
    ) -> tuple[str, float, _Entry, float | None] | None:
        """The most likely paraphrase among the live candidates, with its
        verifier score. Embedding, search and scoring happen batched with the
        concurrent lookups, in the embedder's thread (``_search_batch``); only
        the liveness of the candidates is settled here, on the event loop,
        which owns the entries."""
        assert self._embedder is not None
        known = self._recent.get(query)
        if known is not None:
            self._recent.move_to_end(query)
        vector, found = await self._embedder.embed_and(query, (namespace, query), known)
        if known is None:
            self._remember_vector(query, vector)
        # Best first (search order without a verifier, else by score, the
        # first of equal scores first): the first live one is the answer.
        now = self._clock()
        for eid, sim, score in found:
            entry = self._live_entry(eid, now)
            if entry is not None and entry.namespace == namespace:
                return eid, sim, entry, score
        return None

    def _search_batch(
        self, vectors: np.ndarray, jobs: list[tuple[str, str]]
    ) -> list[list[tuple[str, float, float | None]]]:
        """In the embedder's thread, for a batch of lookups (namespace, query):
        each one's candidates as (entry id, cosine, verifier score or None),
        best first (in search order without a verifier), from one search per
        namespace and one verifier call.

        A candidate's score does not depend on the other candidates, so
        scoring all of them here and dropping dead ones on the loop picks the
        same best entry as scoring only the live ones.

        The BLAS pools are capped meanwhile (``numeric_threads``): not the
        model's forward pass, which has run by now."""
        with self._numeric_limit():
            return self._search_batch_limited(vectors, jobs)

    def _search_batch_limited(
        self, vectors: np.ndarray, jobs: list[tuple[str, str]]
    ) -> list[list[tuple[str, float, float | None]]]:
        assert self._index is not None
        slots, eids, sims, cand_vecs = self._index.search_flat(
            [namespace for namespace, _ in jobs],
            vectors,
            self.settings.search_k,
            self.settings.min_similarity,
        )
        results: list[list[tuple[str, float, float | None]]] = [[] for _ in jobs]
        verifier = self._verifier
        if verifier is None:
            for slot, eid, sim in zip(slots, eids, sims, strict=True):
                results[slot].append((eid, sim, None))
            return results
        cand_infos: list[TextInfo | None] = list(map(self._infos.get, eids))
        if None in cand_infos:
            self._drop_unknown(slots, eids, sims, cand_vecs, cand_infos)
        if not eids:
            return results
        # One tokenisation per lookup with candidates, shared by its pairs.
        query_info: dict[int, TextInfo] = {}
        for slot in slots:
            if slot not in query_info:
                query_info[slot] = TextInfo(jobs[slot][1])
        scores = verifier.score_pairs(
            vectors[slots],
            list(map(query_info.__getitem__, slots)),
            np.array(cand_vecs, dtype=np.float32),
            cand_infos,  # type: ignore[arg-type]
        )
        # Each lookup's candidates best first: by score, and of equal scores
        # the first in search order (a stable sort), as the loop's argmax
        # picked. _best then settles on the first live one, usually the first.
        order = np.lexsort((-scores, np.asarray(slots))).tolist()
        score_list = scores.tolist()
        for n in order:
            results[slots[n]].append((eids[n], sims[n], score_list[n]))
        return results

    def _drop_unknown(
        self,
        slots: list[int],
        eids: list[str],
        sims: list[float],
        vecs: list[np.ndarray],
        infos: list[TextInfo | None],
    ) -> None:
        """In place: candidates without a remembered tokenisation get one from
        their entry; those forgotten since the search are no candidates."""
        keep = []
        for n, eid in enumerate(eids):
            if infos[n] is None:
                entry = self._entries.get(eid)
                if entry is None:
                    continue
                infos[n] = TextInfo(entry.query)
            keep.append(n)
        for column in (slots, eids, sims, vecs, infos):
            column[:] = [column[n] for n in keep]  # type: ignore[index]

    def _fixed_threshold(self, operating_point: str) -> float:
        """The fixed operating point's threshold on the candidate's score."""
        if self._verifier is None:
            return self.settings.fallback_min_similarity
        return self._verifier.threshold(operating_point)

    async def verdict(
        self, candidate: Candidate, request: dict, fresh: dict, explored: bool
    ) -> bool | None:
        """Compares the backend's answer with the candidate's and counts the
        verdict; None when no verdict could be reached."""
        try:
            same = await answers_match(
                candidate.response, fresh, is_deterministic(request), self._embed_texts
            )
        except Exception:  # bookkeeping only: the client already has its answer
            log.exception("could not judge a cache candidate")
            return None
        self.calibration.get(candidate.calibration, self.grid).add(
            candidate.score, same, explored=explored
        )
        self._counters["verdicts"] += 1
        self._counters["verdicts_wrong"] += 0 if same else 1
        return same

    async def _embed_texts(self, texts: list[str]) -> np.ndarray:
        assert self._embedder is not None
        return await self._embedder.embed_many(texts)

    def _live_entry(self, entry_id: str, now: float) -> _Entry | None:
        entry = self._entries.get(entry_id)
        if entry is None:
            return None
        if entry.expires_at <= now:
            # Expired entries vanish from memory at once; the sweeper deletes the row.
            self._forget(entry_id)
            self._counters["expirations"] += 1
            return None
        return entry

    def _hit(
        self,
        entry_id: str,
        entry: _Entry,
        now: float,
        sim: float,
        layer: str,
        score: float | None,
    ) -> CacheHit:
        self._entries.move_to_end(entry_id)
        _, hits = self._touched.get(entry_id, (now, 0))
        self._touched[entry_id] = (now, hits + 1)
        return CacheHit(json.loads(entry.response), sim, layer, entry_id, score)

    async def _embed(self, query: str) -> np.ndarray:
        vector = self._recent.get(query)
        if vector is not None:
            self._recent.move_to_end(query)
            return vector
        assert self._embedder is not None
        vector = await self._embedder.embed(query)
        self._remember_vector(query, vector)
        return vector

    def _remember_vector(self, query: str, vector: np.ndarray) -> None:
        self._recent[query] = vector
        if len(self._recent) > _RECENT_VECTORS:
            self._recent.popitem(last=False)

    # --------------------------------------------------------------------- store

    async def store(self, namespace: str, request: dict, response: dict, tenant: str) -> None:
        work = self.begin_store(namespace, request, response, tenant)
        if work is not None:
            await work

    def begin_store(
        self, namespace: str, request: dict, response: dict, tenant: str
    ) -> Coroutine[Any, Any, None] | None:
        """Puts the answer in the exact layer now, before anything is awaited,
        and returns the work that persists and indexes it (None: no cache).
        A caller that must not leave a gap (a single flight about to let its
        duplicates go) calls this synchronously and awaits or spawns the rest."""
        if self._embedder is None or not self.settings.enabled:
            return None
        query = query_text(request).strip()
        exact_key = canonical_hash(namespace, request)
        text = json.dumps(response, separators=(",", ":"), ensure_ascii=False)
        pending = _Entry(
            namespace, tenant, exact_key, query, text, self._clock() + self.settings.ttl_seconds
        )
        # The exact layer answers repeats from here on.
        self._storing[exact_key] = pending
        return self._finish_store(pending, namespace, tenant, exact_key, query, text)

    async def _finish_store(
        self, pending: _Entry, namespace: str, tenant: str, exact_key: str, query: str, text: str
    ) -> None:
        try:
            await self._persist(namespace, tenant, exact_key, query, text)
        finally:
            if self._storing.get(exact_key) is pending:
                del self._storing[exact_key]

    async def _persist(
        self, namespace: str, tenant: str, exact_key: str, query: str, text: str
    ) -> None:
        vector = await self._embed(query) if query else None
        now = self._clock()
        row = db.CacheEntry(
            id=uuid.uuid4().hex,
            tenant=tenant,
            namespace=namespace,
            exact_key=exact_key,
            query=query,
            response=text,
            embedding=db.vector_to_bytes(vector) if vector is not None else None,
            model=self.settings.embedder,
            created_at=now,
            expires_at=now + self.settings.ttl_seconds,
            last_hit_at=now,
        )
        async with self._write_lock:
            replaced = await asyncio.to_thread(db.upsert, self.engine, row)
            for old in replaced:
                self._forget(old)
            old = self._exact.get(row.exact_key)
            if old is not None:
                self._forget(old)
            self._remember(
                row.id,
                namespace,
                tenant,
                row.exact_key,
                query,
                row.response,
                row.expires_at,
                vector,
            )
            self._stored_at[row.id] = time.monotonic()
            self._counters["stores"] += 1
            if len(self._entries) > self.settings.max_entries:
                await self._evict_over_limit()

    def _remember(
        self,
        entry_id: str,
        namespace: str,
        tenant: str,
        exact_key: str,
        query: str,
        response: str,
        expires_at: float,
        vector: np.ndarray | None,
    ) -> None:
        self._entries[entry_id] = _Entry(namespace, tenant, exact_key, query, response, expires_at)
        self._exact[exact_key] = entry_id
        if vector is not None and self._index is not None:
            if self._verifier is not None:
                # Before the index add: a search that finds the entry finds its info.
                self._infos[entry_id] = TextInfo(query)
            self._index.add(namespace, entry_id, vector)

    def _forget(self, entry_id: str) -> _Entry | None:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        if self._exact.get(entry.exact_key) == entry_id:
            del self._exact[entry.exact_key]
        if self._index is not None:
            self._index.remove(entry_id)
        self._infos.pop(entry_id, None)
        self._touched.pop(entry_id, None)
        return entry

    async def _evict_over_limit(self) -> None:
        victims = []
        while len(self._entries) > self.settings.max_entries:
            entry_id = next(iter(self._entries))  # least recently used
            self._forget(entry_id)
            victims.append(entry_id)
        self._counters["evictions"] += len(victims)
        await asyncio.to_thread(db.delete_ids, self.engine, victims)

    # ------------------------------------------------------------ maintenance

    async def purge(self, tenant: str) -> int:
        async with self._write_lock:
            doomed = [eid for eid, e in self._entries.items() if e.tenant == tenant]
            for entry_id in doomed:
                self._forget(entry_id)
            for key in [k for k, e in self._storing.items() if e.tenant == tenant]:
                del self._storing[key]
            removed = await asyncio.to_thread(db.delete_tenant, self.engine, tenant)
        return max(removed, len(doomed))

    async def sweep(self) -> int:
        """Drop expired entries from memory and database; persist hit bookkeeping."""
        now = self._clock()
        async with self._write_lock:
            expired = [eid for eid, e in self._entries.items() if e.expires_at <= now]
            for entry_id in expired:
                self._forget(entry_id)
            self._counters["expirations"] += len(expired)
            await asyncio.to_thread(db.delete_expired, self.engine, now)
        await self._flush_hits()
        await self._sync()
        await self.calibration.sync()
        return len(expired)

    async def _sync(self) -> None:
        """Converge with the database, which other processes share: forget rows
        they deleted (a purge from the CLI or another gateway, an eviction) and
        learn rows they stored, so every process serves the same entries."""
        started = time.monotonic()
        rows = await asyncio.to_thread(db.live_ids, self.engine, self._clock())
        async with self._write_lock:
            # Entries stored while the query ran are not in its answer yet.
            recent = {k for k, t in self._stored_at.items() if t >= started}
            self._stored_at = {k: self._stored_at[k] for k in recent}
            gone = [eid for eid in self._entries if eid not in rows and eid not in recent]
            for entry_id in gone:
                self._forget(entry_id)
            new = [eid for eid in rows if eid not in self._entries]
        if new:
            fresh = await asyncio.to_thread(db.load_ids, self.engine, new)
            async with self._write_lock:
                for row in fresh:
                    if row.id in self._entries or not row.embedding:
                        continue
                    if row.exact_key in self._exact:
                        continue
                    self._remember(
                        row.id,
                        row.namespace,
                        row.tenant,
                        row.exact_key,
                        row.query,
                        row.response,
                        row.expires_at,
                        db.bytes_to_vector(row.embedding),
                    )

    async def _flush_hits(self) -> None:
        touched, self._touched = self._touched, {}
        if touched:
            try:
                await asyncio.to_thread(db.record_hits, self.engine, touched)
            except Exception:  # bookkeeping only: never let it take the cache down
                log.exception("could not persist cache hit statistics")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("cache sweep failed")

    def bound_stats(self) -> list[dict]:
        """Per tenant and model: the wrong-hit bound's figures (cache/bound.py)."""
        return [
            {"tenant": tenant, "model": model, "scorer": scorer, **cal.report()}
            for (tenant, model, scorer), cal in self.calibration.items()
            if scorer == self._scorer
        ]

    def stats(self) -> dict:
        return {
            "entries": len(self._entries),
            "namespaces": self._index.namespaces if self._index is not None else 0,
            "verifier": self._verifier is not None,
            "embed_batches": self._closed_batches
            + (self._embedder.batches if self._embedder is not None else 0),
            **self._counters,
            "hits": self._counters["hits_exact"] + self._counters["hits_semantic"],
        }
