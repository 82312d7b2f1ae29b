"""Reading the few numbers routing needs out of vLLM's Prometheus ``/metrics``.

vLLM's exposition is tens of kilobytes of histograms; a general parser
(``prometheus_client.parser``) costs milliseconds per scrape on the gateway's
event loop, once per replica per second. This scans lines and decodes only the
families listed in ``_FIELDS``; the tests check it agrees with prometheus_client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Sample name as exposed (counters carry their ``_total`` suffix) -> dataclass field.
_FIELDS: dict[str, str] = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    # Older vLLM releases published the same fraction under this name.
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prompt_tokens_cached_total": "prompt_tokens_cached_total",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits_total",
    "vllm:num_preemptions_total": "preemptions_total",
    "vllm:request_success_total": "requests_finished_total",
    "vllm:engine_sleep_state": "sleep_state",
}
# Gauges that describe one engine's fill level are averaged over engines
# (data parallel) rather than summed.
_AVERAGED = frozenset({"kv_usage", "sleep_state"})
# Latency histograms the SLO pacer reads (family -> dataclass field). Older vLLM
# releases named the inter-token histogram time_per_output_token_seconds.
_HISTOGRAMS: dict[str, str] = {
    "vllm:time_to_first_token_seconds": "ttft",
    "vllm:inter_token_latency_seconds": "itl",
    "vllm:time_per_output_token_seconds": "itl_legacy",
}
_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(slots=True)
class Histogram:
    """A cumulative Prometheus histogram: counts at or below each upper bound.

    Counters only grow, so the histogram of a time window is the difference of
    two scrapes (``minus``), and its quantiles are read the way Prometheus'
    ``histogram_quantile`` reads them: linearly inside the bucket.
    """

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def minus(self, older: Histogram | None) -> Histogram:
        if older is None:
            return Histogram(dict(self.buckets), self.sum, self.count)
        if self.count < older.count:  # the server restarted: the counters began again
            return Histogram(dict(self.buckets), self.sum, self.count)
        return Histogram(
            {le: n - older.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.sum - older.sum,
            self.count - older.count,
        )

    def plus(self, other: Histogram) -> Histogram:
        bounds = set(self.buckets) | set(other.buckets)
        return Histogram(
            {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in bounds},
            self.sum + other.sum,
            self.count + other.count,
        )

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, or None without samples. Past the last
        finite bound it answers that bound (as Prometheus does)."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        finite = sorted(le for le in self.buckets if le != float("inf"))
        for le in finite:
            at = self.buckets[le]
            if at >= rank:
                inside = at - below
                if inside <= 0:
                    return le
                return lower + (le - lower) * (rank - below) / inside
            lower, below = le, at
        return finite[-1] if finite else None


@dataclass(slots=True)
class VllmMetrics:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0-1 fraction, despite the metric's "_perc" name
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    prompt_tokens_cached_total: float = 0.0
    prefix_cache_queries_total: float = 0.0
    prefix_cache_hits_total: float = 0.0
    preemptions_total: float = 0.0
    requests_finished_total: float = 0.0
    sleep_state: float = 0.0
    engines: int = 0
    # Latency histograms summed over engines; None when the server has none.
    ttft: Histogram | None = None
    itl: Histogram | None = None
    seen: set[str] = field(default_factory=set, repr=False)

    @property
    def load(self) -> float:
        return self.running + self.waiting

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if self.prefix_cache_queries_total <= 0:
            return None
        return self.prefix_cache_hits_total / self.prefix_cache_queries_total

    @property
    def has_load_metrics(self) -> bool:
        """False when the text had no vLLM scheduler gauges (not a vLLM server)."""
        return "running" in self.seen or "waiting" in self.seen


def _split_sample(line: str) -> tuple[str, str, str]:
    """Return (name, label text, value text) of one exposition sample line."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        close = line.rfind("}")
        rest = line[close + 1 :].split()
        return line[:brace], line[brace + 1 : close], rest[0] if rest else ""
    rest = line[space + 1 :].split()
    return line[:space], "", rest[0] if rest else ""


def _label(labels: str, name: str) -> str:
    start = labels.find(name + '="')
    if start == -1:
        return ""
    start += len(name) + 2
    return labels[start : labels.find('"', start)]


def parse_vllm_metrics(text: str, model_name: str | None = None) -> VllmMetrics:
    """Parse vLLM ``/metrics`` text.

    With ``model_name``, only samples labelled ``model_name="<it>"`` count, but
    only when such samples exist: a server started with several served names
    labels everything with the first one, and that must not read as idle.
    """
    label_filter = None
    if model_name is not None:
        candidate = f'model_name="{model_name}"'
        if candidate in text:
            label_filter = candidate
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    engines: set[str] = set()
    histograms: dict[str, Histogram] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, labels, value_text = _split_sample(line)
        attr = _FIELDS.get(name)
        if attr is None:
            if name.endswith(_SUFFIXES) and (label_filter is None or label_filter in labels):
                _add_histogram_sample(histograms, name, labels, value_text)
            continue
        if label_filter is not None and label_filter not in labels:
            continue
        try:
            value = float(value_text)
        except ValueError:
            continue
        if value != value:  # NaN: a gauge that has not been set yet
            continue
        sums[attr] = sums.get(attr, 0.0) + value
        counts[attr] = counts.get(attr, 0) + 1
        if attr == "running":
            engines.add(_label(labels, "engine"))
    metrics = VllmMetrics(engines=len(engines))
    for attr, total in sums.items():
        if attr in _AVERAGED:
            total /= counts[attr]
        setattr(metrics, attr, total)
    metrics.seen = set(sums)
    metrics.ttft = histograms.get("ttft")
    metrics.itl = histograms.get("itl") or histograms.get("itl_legacy")
    return metrics


def _add_histogram_sample(
    histograms: dict[str, Histogram], name: str, labels: str, value_text: str
) -> None:
    base, _, suffix = name.rpartition("_")
    attr = _HISTOGRAMS.get(base)
    if attr is None:
        return
    try:
        value = float(value_text)
    except ValueError:
        return
    if value != value:
        return
    hist = histograms.setdefault(attr, Histogram())
    if suffix == "bucket":
        le = _label(labels, "le")
        bound = float("inf") if le == "+Inf" else float(le)
        hist.buckets[bound] = hist.buckets.get(bound, 0.0) + value  # engines add up
    elif suffix == "sum":
        hist.sum += value
    else:
        hist.count += value
