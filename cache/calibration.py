"""Verdict counts shared through the database: the bound survives restarts and
every gateway process decides from the same evidence.

One row per tenant, model, scorer and score bin holds running totals of
lookups, verdicts and wrong verdicts. Each process adds its new verdicts to the rows
with ``verdicts = verdicts + n`` (so concurrent writers never lose each other's
counts) and reloads the totals, at every cache sweep. The scorer names the
score the bins are on (a verifier file, or the cosine of an embedder): when it
changes, old counts describe another score and are simply not used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time

import numpy as np
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from cache.bound import CONFIDENCE, Calibration, clopper_pearson_interval

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # tenant, model, scorer


class CacheCalibration(SQLModel, table=True):
    __tablename__ = "cache_calibration"

    tenant: str = Field(primary_key=True, max_length=255)
    model: str = Field(primary_key=True, max_length=255)
    scorer: str = Field(primary_key=True, max_length=128)
    # Lower edge of the score bin in thousandths (a float is a poor key).
    bin_floor: int = Field(primary_key=True)
    lookups: int = 0
    verdicts: int = 0
    wrong: int = 0
    updated_at: float = 0.0


# Bumped whenever cache/bound.py's grids change: rows are keyed by a bin's
# lower edge, and counts binned on another grid would be read as the wrong
# bins. (1: the five-point grid of the first version, unnamed; 2: the finer one.)
GRID_VERSION = 2


def scorer_name(verifier_meta: dict | None, embedder: str) -> str:
    """Names the score verdicts are binned on: a retrained verifier, or a new
    grid, starts afresh."""
    suffix = f":g{GRID_VERSION}"
    if verifier_meta is None:
        return f"cosine:{embedder}"[: 128 - len(suffix)] + suffix
    digest = hashlib.sha256(json.dumps(verifier_meta, sort_keys=True).encode()).hexdigest()
    return f"verifier:{digest[:16]}{suffix}"


def create_table(engine: Engine) -> None:
    CacheCalibration.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]


def _milli(value: float) -> int:
    return int(round(value * 1000))


Row = tuple[Key, int, int, int, int]  # key, bin_floor, lookups, verdicts, wrong


def add_counts(engine: Engine, rows: list[Row]) -> None:
    """Adds increments to the stored totals."""
    now = time.time()
    with Session(engine) as session:
        for (tenant, model, scorer), floor, lookups, n, wrong in rows:
            table = CacheCalibration.__table__.c  # type: ignore[attr-defined]
            where = (
                (table.tenant == tenant)
                & (table.model == model)
                & (table.scorer == scorer)
                & (table.bin_floor == floor)
            )
            stmt = (
                update(CacheCalibration)
                .where(where)
                .values(
                    lookups=table.lookups + lookups,
                    verdicts=table.verdicts + n,
                    wrong=table.wrong + wrong,
                    updated_at=now,
                )
            )
            if session.execute(stmt).rowcount:
                continue
            try:
                with session.begin_nested():
                    session.add(
                        CacheCalibration(
                            tenant=tenant,
                            model=model,
                            scorer=scorer,
                            bin_floor=floor,
                            lookups=lookups,
                            verdicts=n,
                            wrong=wrong,
                            updated_at=now,
                        )
                    )
            except IntegrityError:
                # Another process inserted the row in between: add to theirs.
                session.execute(stmt)
        session.commit()


Stored = dict[int, tuple[int, int, int]]  # bin_floor -> lookups, verdicts, wrong


def load_counts(engine: Engine) -> dict[Key, Stored]:
    out: dict[Key, Stored] = {}
    with Session(engine) as session:
        for row in session.exec(select(CacheCalibration)):
            key = (row.tenant, row.model, row.scorer)
            out.setdefault(key, {})[row.bin_floor] = (row.lookups, row.verdicts, row.wrong)
    return out


def calibration_of(grid: tuple[float, ...], stored: Stored) -> Calibration:
    """A Calibration holding the stored totals of one tenant, model and scorer."""
    cal = Calibration(grid)
    counts = np.zeros((len(cal.grid), 3), dtype=np.int64)
    for i, edge in enumerate(cal.grid):
        counts[i] = stored.get(_milli(float(edge)), (0, 0, 0))
    cal.set_base(counts)
    return cal


def measured_wrong_rates(
    engine: Engine, grid: tuple[float, ...], max_errors: dict[str, float | None]
) -> dict[str, dict[str, float | int | None]]:
    """Per tenant of `max_errors` (tenant -> its δ, None when the bound is off):
    the wrong rate measured among the verdicts of candidates that would be
    served (scores at or above the threshold in force; all scores when nothing
    may be served yet), with its two-sided exact 95 % interval."""
    totals: dict[str, list[int]] = {}
    for (tenant, _model, _scorer), stored in load_counts(engine).items():
        if tenant not in max_errors:
            continue
        cal = calibration_of(grid, stored)
        delta = max_errors[tenant]
        start = 0
        if delta is not None:
            threshold = cal.summary(delta).threshold
            if threshold is not None:
                start = int(np.searchsorted(cal.grid, threshold))
        counts = cal.counts[start:]
        acc = totals.setdefault(tenant, [0, 0])
        acc[0] += int(counts[:, Calibration.VERDICTS].sum())
        acc[1] += int(counts[:, Calibration.WRONG].sum())
    out: dict[str, dict[str, float | int | None]] = {}
    for tenant, (n, wrong) in totals.items():
        low, high = clopper_pearson_interval(wrong, n, CONFIDENCE)
        out[tenant] = {
            "verdicts": n,
            "wrong": wrong,
            "rate": wrong / n if n else None,
            "low": low if n else None,
            "high": high if n else None,
        }
    return out


class CalibrationBook:
    """Every Calibration of this process, kept in step with the database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._states: dict[Key, Calibration] = {}
        self._stored: dict[Key, Stored] = {}
        self._lock = asyncio.Lock()

    def get(self, key: Key, grid: tuple[float, ...]) -> Calibration:
        cal = self._states.get(key)
        if cal is None or tuple(cal.grid) != tuple(grid):
            cal = self._states[key] = Calibration(grid)
            stored = self._stored.get(key)
            if stored:
                self._apply(cal, stored)
        return cal

    def items(self) -> list[tuple[Key, Calibration]]:
        return list(self._states.items())

    @staticmethod
    def _apply(cal: Calibration, stored: Stored) -> None:
        cal.set_base(calibration_of(cal.grid, stored).base)

    async def load(self) -> None:
        await asyncio.to_thread(create_table, self.engine)
        self._stored = await asyncio.to_thread(load_counts, self.engine)
        for key, cal in self._states.items():
            self._apply(cal, self._stored.get(key, {}))

    async def sync(self) -> None:
        """Write this process's new verdicts, then adopt everyone's totals."""
        async with self._lock:
            taken: list[tuple[Key, Calibration, np.ndarray]] = []
            rows: list[Row] = []
            for key, cal in self._states.items():
                fresh = cal.take_fresh()
                if not fresh.any():
                    continue
                taken.append((key, cal, fresh))
                for i, edge in enumerate(cal.grid):
                    lookups, n, wrong = (int(x) for x in fresh[i])
                    if lookups or n:
                        rows.append((key, _milli(float(edge)), lookups, n, wrong))
            try:
                if rows:
                    await asyncio.to_thread(add_counts, self.engine, rows)
            except Exception:
                # Keep the verdicts for the next sync rather than lose them.
                log.exception("could not persist cache calibration")
                for _, cal, fresh in taken:
                    cal.set_base(cal.base - fresh)
                    cal.fresh = cal.fresh + fresh
                return
            await self.load()
