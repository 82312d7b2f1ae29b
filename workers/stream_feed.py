"""The gateway's own interactive stream latencies, pulled into a worker.

The gateway keeps a ring of finished interactive streams (time to first token
and per-token time, as it served them: gateway/stream_latency.py) behind
GET /admin/latency/streams. The SLO loop reads the p99 request from these
samples, which is what the SLO is about, instead of inferring it from vLLM's
histograms alone (whose inter-token buckets are too coarse for a p99 and which
cannot tell one request's tail from the mean).

One feed per worker process, polled by the batch loop before it decides
(at most every ``min_interval_s``); a gateway that does not answer leaves the
loop on vLLM's /metrics, so batch work never stops on a feed failure.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import httpx

log = logging.getLogger("bearpaw.worker.stream_feed")

# Samples older than this are dropped: the loop's windows are a few seconds.
KEEP_S = 60.0


@dataclass(slots=True, frozen=True)
class Stream:
    at: float  # this process's time.monotonic() when the stream ended
    ttft_s: float
    tpot_s: float | None
    tokens: int
    started: float  # this process's time.monotonic() when the gateway received it


class GatewayFeed:
    """New samples from one gateway, by model, kept for ``KEEP_S``."""

    def __init__(self, url: str, admin_key: str | None, min_interval_s: float = 0.2) -> None:
        self.url = url.rstrip("/") + "/admin/latency/streams"
        self.headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.min_interval_s = min_interval_s
        self._after = 0
        self._polled = float("-inf")
        self._client: httpx.AsyncClient | None = None
        self._streams: dict[str, deque[Stream]] = {}
        self.healthy = False  # the last poll was answered
        self._warned = False

    async def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._polled < self.min_interval_s:
            return
        self._polled = now
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=0.5, trust_env=False)
        try:
            r = await self._client.get(
                self.url, params={"after": self._after}, headers=self.headers
            )
            r.raise_for_status()
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            if not self._warned:
                log.warning(
                    "gateway latency feed %s unavailable (%s): SLO loop on /metrics", self.url, exc
                )
                self._warned = True
            self.healthy = False
            return
        self.healthy, self._warned = True, False
        self.ingest(body, time.monotonic())

    def ingest(self, body: dict, now: float) -> None:
        """Adds one answer of /admin/latency/streams, received at ``now``."""
        last = int(body.get("last_seq", 0))
        if last < self._after:
            # The gateway restarted and its sequence began again: read it
            # from the start at the next poll.
            self._after = 0
            return
        for item in body.get("data", ()):
            self._after = max(self._after, int(item["seq"]))
            end = now - float(item["age_s"])
            ttft, tpot, tokens = float(item["ttft_s"]), item.get("tpot_s"), int(item["tokens"])
            duration = item.get("duration_s")
            if duration is None:  # a gateway of before the field: its tokens' span
                duration = ttft + (tpot or 0.0) * max(0, tokens - 1)
            stream = Stream(end, ttft, tpot, tokens, end - float(duration))
            self._streams.setdefault(item["model"], deque()).append(stream)
        self._after = max(self._after, last)
        for streams in self._streams.values():
            while streams and streams[0].at < now - KEEP_S:
                streams.popleft()

    def recent(
        self,
        model: str,
        now: float,
        window_s: float,
        at_least: int,
        started_after: float = float("-inf"),
    ) -> list[Stream]:
        """The streams of the last ``window_s``, or, where fewer than
        ``at_least`` ended in it, the last ``at_least`` of up to four windows
        back (a p99 of a handful of requests is just their maximum); only
        those the gateway received after ``started_after``."""
        streams = [s for s in self._streams.get(model, ()) if s.started >= started_after]
        inside = [s for s in streams if s.at >= now - window_s]
        if len(inside) >= at_least:
            return inside
        wider = [s for s in streams if s.at >= now - 4 * window_s]
        return wider[-at_least:]

    def since(self, model: str, started_after: float, last: int) -> list[Stream]:
        """The last ``last`` kept streams the gateway received after ``started_after``."""
        if last <= 0:
            return []
        streams = [s for s in self._streams.get(model, ()) if s.started >= started_after]
        return streams[-last:]

    def active(self, model: str, now: float, window_s: float) -> bool:
        """Whether an interactive stream of the model ended in the window."""
        streams = self._streams.get(model)
        return bool(streams) and streams[-1].at >= now - window_s

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# One feed per gateway per worker process: batch runs are short tasks, and the
# cursor and the samples must outlive each of them.
_FEEDS: dict[str, GatewayFeed] = {}


def feed_for(url: str, admin_key: str | None) -> GatewayFeed:
    feed = _FEEDS.get(url)
    if feed is None:
        feed = _FEEDS[url] = GatewayFeed(url, admin_key)
    return feed
