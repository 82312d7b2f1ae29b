"""Pure logic of the backend layer: breaker, routing, metrics parsing, hosted choice, launch."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.breaker import BreakerState, CircuitBreaker
from backends.config import ModelConfig, ReplicaConfig
from backends.discovery import parse_models_response, replica_for
from backends.errors import ModelNotFound, UpstreamError, error_from_upstream
from backends.hosted import Target, choose_target
from backends.launch import LaunchProfile, build_command, build_env, check_gpu_shares
from backends.replica import Replica, root_url
from backends.routing import affinity_hash, pick_replica, prefix_affinity_key
from backends.vllm_metrics import VllmMetrics, parse_vllm_metrics

# A /metrics page shaped like vLLM 0.32's (families, label order, _created
# samples, histograms), trimmed to a few buckets per histogram.
VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.4375
# HELP vllm:engine_sleep_state Engine sleep state
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 1.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 4096.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7955474e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 1024.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 2.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 5180.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.7955474e+09
# HELP vllm:prompt_tokens_cached_total Number of cached prompt tokens.
# TYPE vllm:prompt_tokens_cached_total counter
vllm:prompt_tokens_cached_total{engine="0",model_name="tiny"} 960.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 8912.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 11.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 128.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 0.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 3.25
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="tiny"} 12.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 139.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 139.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1024"} 1.0
"""


# ------------------------------------------------------------------ metrics


def test_metrics_parse_realistic_page() -> None:
    metrics = parse_vllm_metrics(VLLM_METRICS, "tiny")
    assert metrics.running == 7
    assert metrics.waiting == 3
    assert metrics.load == 10
    assert metrics.kv_usage == pytest.approx(0.4375)
    assert metrics.prompt_tokens_total == 5180
    assert metrics.generation_tokens_total == 8912
    assert metrics.prompt_tokens_cached_total == 960
    assert metrics.prefix_cache_hit_rate == pytest.approx(0.25)
    assert metrics.preemptions_total == 2
    assert metrics.requests_finished_total == 139  # summed over finished_reason
    assert metrics.engines == 1
    assert metrics.has_load_metrics


def test_metrics_parse_agrees_with_prometheus_client() -> None:
    reference: dict[str, float] = {}
    for family in text_string_to_metric_families(VLLM_METRICS):
        for sample in family.samples:
            reference[sample.name] = reference.get(sample.name, 0.0) + sample.value
    metrics = parse_vllm_metrics(VLLM_METRICS)
    assert metrics.running == reference["vllm:num_requests_running"]
    assert metrics.waiting == reference["vllm:num_requests_waiting"]
    assert metrics.kv_usage == reference["vllm:kv_cache_usage_perc"]
    assert metrics.prompt_tokens_total == reference["vllm:prompt_tokens_total"]
    assert metrics.generation_tokens_total == reference["vllm:generation_tokens_total"]
    assert metrics.prefix_cache_hits_total == reference["vllm:prefix_cache_hits_total"]


def test_metrics_model_filter_and_data_parallel_engines() -> None:
    page = "\n".join(
        [
            'vllm:num_requests_running{engine="0",model_name="a"} 2.0',
            'vllm:num_requests_running{engine="1",model_name="a"} 3.0',
            'vllm:num_requests_waiting{engine="0",model_name="a"} 1.0',
            'vllm:num_requests_waiting{engine="1",model_name="a"} 0.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.2',
            'vllm:kv_cache_usage_perc{engine="1",model_name="a"} 0.6',
            'vllm:num_requests_running{engine="0",model_name="b"} 50.0',
        ]
    )
    a = parse_vllm_metrics(page, "a")
    assert (a.running, a.waiting, a.engines) == (5, 1, 2)
    assert a.kv_usage == pytest.approx(0.4)  # averaged over engines, not summed
    # A served name that is not the label (e.g. a second --served-model-name)
    # reads the whole server instead of an idle zero.
    other = parse_vllm_metrics(page, "alias-of-a")
    assert other.running == 55


def test_metrics_parse_non_vllm_page() -> None:
    metrics = parse_vllm_metrics("# nothing\nprocess_cpu_seconds_total 1.0\n")
    assert metrics == VllmMetrics(seen=set())
    assert not metrics.has_load_metrics
    assert metrics.prefix_cache_hit_rate is None


# ------------------------------------------------------------------ breaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_transitions() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # success resets the consecutive count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.available()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.available() and not breaker.acquire()
    clock.now += 9.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.available()
    assert breaker.acquire()  # the one probe
    assert not breaker.available() and not breaker.acquire()
    breaker.record_failure()  # probe failed: open again for a full period
    assert breaker.state is BreakerState.OPEN
    clock.now += 10.0
    assert breaker.acquire()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0


def test_breaker_release_frees_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.acquire()
    breaker.release()  # probe cancelled: no verdict, another request may probe
    assert breaker.state is BreakerState.HALF_OPEN and breaker.acquire()


# ------------------------------------------------------------------ routing


def make_replica(url: str, *, breaker_failures: int = 3, weight: float = 1.0) -> Replica:
    return Replica(
        "m", ReplicaConfig(url=url, weight=weight), CircuitBreaker(breaker_failures, 10.0)
    )


def with_metrics(replica: Replica, running: float, waiting: float, kv: float, at: float) -> Replica:
    metrics = VllmMetrics(running=running, waiting=waiting, kv_usage=kv, seen={"running"})
    replica.set_metrics(metrics, at)
    return replica


NOW = 1000.0


def test_routing_least_loaded_by_fresh_metrics() -> None:
    a = with_metrics(make_replica("http://a/v1"), 8, 4, 0.1, NOW)
    b = with_metrics(make_replica("http://b/v1"), 3, 0, 0.9, NOW)
    c = with_metrics(make_replica("http://c/v1"), 3, 0, 0.5, NOW)
    # b and c tie on running + waiting; c's lower KV usage breaks the tie.
    for rotation in range(5):
        assert pick_replica([a, b, c], now=NOW, stale_after=5, rotation=rotation) is c


def test_routing_counts_requests_sent_since_scrape() -> None:
    a = with_metrics(make_replica("http://a/v1"), 2, 0, 0.0, NOW)
    b = with_metrics(make_replica("http://b/v1"), 3, 0, 0.0, NOW)
    a.outstanding = 2  # two sent to `a` after its scrape said 2 running
    assert pick_replica([a, b], now=NOW, stale_after=5) is b


def test_routing_stale_metrics_fall_back_to_outstanding() -> None:
    a = with_metrics(make_replica("http://a/v1"), 0, 0, 0.0, NOW - 60)  # idle but stale
    b = with_metrics(make_replica("http://b/v1"), 9, 9, 0.0, NOW - 60)
    a.outstanding, b.outstanding = 5, 1
    assert pick_replica([a, b], now=NOW, stale_after=5) is b


def test_routing_ties_rotate_when_nothing_is_known() -> None:
    replicas = [make_replica(f"http://r{i}/v1") for i in range(3)]
    chosen = {pick_replica(replicas, now=NOW, stale_after=5, rotation=i).url for i in range(3)}
    assert len(chosen) == 3


def test_routing_weight_scales_load() -> None:
    small = make_replica("http://small/v1")
    big = make_replica("http://big/v1", weight=4.0)
    small.outstanding, big.outstanding = 2, 6
    assert pick_replica([small, big], now=NOW, stale_after=5) is big


def test_routing_skips_unhealthy_open_and_excluded() -> None:
    a, b, c = (make_replica(f"http://{n}/v1", breaker_failures=1) for n in "abc")
    a.healthy = False
    b.breaker.record_failure()  # opens at once
    assert pick_replica([a, b, c], now=NOW, stale_after=5) is c
    assert pick_replica([a, b, c], now=NOW, stale_after=5, exclude=[c]) is None


def test_routing_prefix_affinity_is_sticky_until_overloaded() -> None:
    replicas = [with_metrics(make_replica(f"http://r{i}/v1"), 1, 0, 0.0, NOW) for i in range(4)]
    key = affinity_hash(prefix_affinity_key("system prompt " * 40, 256))
    home = pick_replica(replicas, now=NOW, stale_after=5, key_hash=key)
    # Same key, any rotation, any order: same home.
    for rotation in range(4):
        assert (
            pick_replica(replicas[::-1], now=NOW, stale_after=5, key_hash=key, rotation=rotation)
            is home
        )
    # Somewhat busier than the best still keeps the prefix at home ...
    with_metrics(home, 5, 0, 0.0, NOW)
    assert pick_replica(replicas, now=NOW, stale_after=5, key_hash=key) is home
    # ... much busier sends it to the least loaded.
    with_metrics(home, 20, 10, 0.0, NOW)
    chosen = pick_replica(replicas, now=NOW, stale_after=5, key_hash=key)
    assert chosen is not home and chosen.metrics.load == 1
    # Different prefixes spread over the replicas.
    homes = {
        pick_replica(
            replicas[:3] + [r for r in replicas[3:] if r is not home],
            now=NOW,
            stale_after=5,
            key_hash=affinity_hash(f"prefix-{i}"),
        ).url
        for i in range(64)
    }
    assert len(homes) >= 3


def test_routing_affinity_moves_only_keys_of_removed_replica() -> None:
    replicas = [make_replica(f"http://r{i}/v1") for i in range(5)]
    keys = [affinity_hash(f"k{i}") for i in range(200)]

    def homes(pool: list[Replica]) -> list[str]:
        return [pick_replica(pool, now=NOW, stale_after=5, key_hash=k).url for k in keys]

    before = homes(replicas)
    after = homes(replicas[:-1])
    moved = [b for b, a in zip(before, after, strict=True) if b != a]
    assert moved and all(url == replicas[-1].url for url in moved)


def test_prefix_affinity_key() -> None:
    assert prefix_affinity_key("short", 256) is None
    long_a = "x" * 256 + "question one"
    long_b = "x" * 256 + "question two"
    assert prefix_affinity_key(long_a, 256) == prefix_affinity_key(long_b, 256)


def test_root_url() -> None:
    assert root_url("http://h:8000/v1/") == "http://h:8000"
    assert root_url("http://h:8000") == "http://h:8000"


# ------------------------------------------------------------------ hosted choice


def choose(config: ModelConfig, **state) -> Target:
    defaults = {
        "has_replicas": True,
        "any_ready": True,
        "best_waiting": 0.0,
        "overflow_waiting": 32.0,
    }
    return choose_target(config, **(defaults | state))


def test_hosted_choice() -> None:
    plain = ModelConfig(name="m")
    assert choose(plain) is Target.REPLICA
    assert choose(plain, any_ready=False) is Target.FAIL
    held = ModelConfig(name="m", hold_seconds=30)
    assert choose(held, any_ready=False) is Target.HOLD
    assert choose(held, any_ready=False, held=True) is Target.FAIL

    only_hosted = ModelConfig(name="m", hosted="openai/gpt-4o-mini")
    assert choose(only_hosted, has_replicas=False, any_ready=False) is Target.HOSTED

    fallback = ModelConfig(name="m", hosted="openai/gpt-4o-mini", hold_seconds=10)
    assert choose(fallback, best_waiting=1000) is Target.REPLICA  # no overflow: queue it
    assert choose(fallback, any_ready=False) is Target.HOLD  # down: wait first ...
    assert choose(fallback, any_ready=False, held=True) is Target.HOSTED  # ... then fall back

    overflow = ModelConfig(name="m", hosted="openai/gpt-4o-mini", overflow=True, hold_seconds=10)
    assert choose(overflow, best_waiting=32) is Target.REPLICA
    assert choose(overflow, best_waiting=33) is Target.HOSTED
    assert choose(overflow, best_waiting=None) is Target.REPLICA  # stale: unknown is not full
    assert choose(overflow, any_ready=False) is Target.HOSTED  # no hold when it can overflow
    tight = overflow.model_copy(update={"overflow_waiting": 2})
    assert choose(tight, best_waiting=3) is Target.HOSTED


# ------------------------------------------------------------------ discovery, errors


def test_discovery_parse() -> None:
    body = {
        "object": "list",
        "data": [
            {"id": "tiny", "object": "model", "owned_by": "vllm", "max_model_len": 512},
            {"id": "other", "object": "model", "owned_by": "someone"},
            {"object": "model"},
        ],
    }
    models = parse_models_response(body)
    assert [m.id for m in models] == ["tiny", "other"]
    assert models[0].is_vllm and not models[1].is_vllm and models[0].max_model_len == 512
    replica = replica_for("http://h:1/v1/", models[0])
    assert replica.url == "http://h:1/v1" and replica.upstream_model == "tiny" and replica.vllm
    with pytest.raises(ValueError):
        parse_models_response({"error": "Unauthorized"})


def test_errors_carry_status_and_openai_shape() -> None:
    vllm_404 = {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    err = error_from_upstream(404, vllm_404, "http://r/v1")
    assert isinstance(err, UpstreamError) and err.status == 404
    assert err.to_openai() is vllm_404 and err.message.startswith("The model")
    bare = error_from_upstream(401, {"error": "Unauthorized"})
    assert bare.message == "Unauthorized"
    assert bare.to_openai()["error"]["message"] == "Unauthorized"
    missing = ModelNotFound("x")
    assert missing.status == 404 and missing.to_openai()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------ launch


def test_launch_command() -> None:
    profile = LaunchProfile(
        name="big",
        model="TheBloke/Llama-2-13B-AWQ",
        served_name="llama-13b",
        port=8101,
        quantization="awq",
        gpu_memory_utilization=0.45,
        max_num_seqs=64,
        max_model_len=4096,
        api_key="k",
        devices="1",
        extra_args=["--enable-prefix-caching"],
        env={"VLLM_LOGGING_LEVEL": "INFO"},
    )
    assert build_command(profile) == [
        "vllm", "serve", "TheBloke/Llama-2-13B-AWQ",
        "--served-model-name", "llama-13b",
        "--host", "127.0.0.1", "--port", "8101",
        "--quantization", "awq",
        "--gpu-memory-utilization", "0.45",
        "--max-num-seqs", "64",
        "--max-model-len", "4096",
        "--scheduling-policy", "priority",
        "--api-key", "k",
        "--enable-prefix-caching",
    ]  # fmt: skip
    env = build_env(profile, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    replica = profile.replica()
    assert replica.url == "http://127.0.0.1:8101/v1" and replica.api_key == "k" and replica.vllm
    minimal = LaunchProfile(
        name="m",
        model="/models/m",
        quantization="fp8",
        scheduling_policy="fcfs",
        executable=["python", "cli.py"],
    )
    assert build_command(minimal) == [
        "python", "cli.py", "serve", "/models/m", "--host", "127.0.0.1", "--port", "8000",
        "--quantization", "fp8", "--scheduling-policy", "fcfs",
    ]  # fmt: skip


def test_launch_gpu_shares() -> None:
    a = LaunchProfile(name="a", model="x", port=1, gpu_memory_utilization=0.5, devices="0")
    b = LaunchProfile(name="b", model="y", port=2, gpu_memory_utilization=0.45, devices="0")
    check_gpu_shares([a, b])
    c = LaunchProfile(name="c", model="z", port=3, gpu_memory_utilization=0.3, devices="0,1")
    with pytest.raises(ValueError, match="GPU 0"):
        check_gpu_shares([a, b, c])
    with pytest.raises(ValueError, match="port"):
        check_gpu_shares([a, a.model_copy(update={"name": "a2", "devices": "1"})])
    with pytest.raises(ValueError):
        LaunchProfile(name="bad", model="x", gpu_memory_utilization=1.5)
