"""Routes of the responses API (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["responses"])
