"""The latencies of interactive streams, as the gateway measured them.

The batch workers' SLO loop (workers/slo_pacer.py) protects interactive
latency, and the gateway is the one place that sees every interactive stream
from its first byte to its last: its time to first token includes the queue in
front of vLLM and the gateway itself, and each stream's own per-token time is
known, so the loop can read the p99 *request* instead of inferring it from
vLLM's coarse histograms. Each finished stream leaves one sample here; the
workers pull new samples with a cursor (GET /admin/latency/streams).

A ring of fixed size: memory stays bounded whatever the traffic, and a worker
that polls less often than the ring turns over just loses the oldest samples.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

# At 1,000 streams/s this is several seconds of samples, more than the loop's
# poll interval; at 15/s it is several minutes.
RING_SIZE = 8192


@dataclass(slots=True, frozen=True)
class StreamSample:
    seq: int
    at: float  # time.monotonic() when the stream ended
    model: str
    ttft_s: float  # request received -> first content chunk sent on
    tpot_s: float | None  # (last - first chunk) / (tokens - 1); None below 2 tokens
    tokens: int
    duration_s: float  # request received -> stream ended


class StreamLatencies:
    """Ring buffer of finished interactive streams, read by cursor."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._ring: deque[StreamSample] = deque(maxlen=size)
        self._seq = 0

    def add(
        self, model: str, ttft_s: float, tpot_s: float | None, tokens: int, duration_s: float
    ) -> None:
        self._seq += 1
        sample = StreamSample(
            self._seq, time.monotonic(), model, ttft_s, tpot_s, tokens, duration_s
        )
        self._ring.append(sample)

    @property
    def last_seq(self) -> int:
        return self._seq

    def after(self, seq: int, limit: int = RING_SIZE) -> list[StreamSample]:
        """Samples newer than ``seq``, oldest first (at most ``limit``, the newest)."""
        if seq >= self._seq:
            return []
        fresh = min(self._seq - seq, len(self._ring), limit)
        ring = self._ring
        return [ring[i] for i in range(len(ring) - fresh, len(ring))]
