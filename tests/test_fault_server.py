"""The fault-injecting upstream does what retry/failover tests rely on."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.fault_server import Fault, FaultServer

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "ping the upstream"}]


def sdk(server: FaultServer, timeout: float = 5.0) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=timeout)


def test_normal_mode_answers_like_openai(fault_server: FaultServer):
    client = sdk(fault_server)
    assert [m.id for m in client.models.list()] == ["tiny"]

    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=50)
    assert reply.choices[0].message.content == "echo: ping the upstream - fault server says hello."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 9
    assert reply.usage.prompt_tokens == 3 + 2
    assert reply.usage.total_tokens == 14

    short = client.completions.create(model="tiny", prompt="one two", max_tokens=2)
    assert short.choices[0].text == "echo: one"
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2

    assert fault_server.request_count() == 3
    assert fault_server.request_count(CHAT) == 1
    assert fault_server.requests[1].body["max_tokens"] == 50


def test_stream_with_usage(fault_server: FaultServer):
    chunks = list(
        sdk(fault_server).chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: ping the upstream"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_status_fault_then_recovery(fault_server: FaultServer, status: int):
    fault_server.set_fault("status", status=status, times=1)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(fault_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.body["message"].startswith("fault server")
    # times=1: the next request is answered normally
    assert sdk(fault_server).chat.completions.create(model="tiny", messages=MESSAGES).usage
    assert fault_server.request_count(CHAT) == 2


def test_hang_times_out_and_counts_the_disconnect(fault_server: FaultServer):
    fault_server.set_fault("hang")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        sdk(fault_server, timeout=0.5).chat.completions.create(model="tiny", messages=MESSAGES)
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 3
    while fault_server.disconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fault_server.disconnects == 1


def test_release_hangs_ends_a_hanging_request(fault_server: FaultServer):
    fault_server.set_fault("hang")
    errors = []

    def call():
        try:
            httpx.post(fault_server.base_url + "/completions", json={"prompt": "x"}, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10  # a busy machine may take a while to connect
    while fault_server.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fault_server.in_flight == 1
    fault_server.release_hangs()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(errors[0], httpx.RemoteProtocolError)


def test_delay(fault_server: FaultServer):
    fault_server.set_fault("delay", delay=0.4)
    started = time.monotonic()
    sdk(fault_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert time.monotonic() - started >= 0.4


def test_drop_stream_after_k_chunks(fault_server: FaultServer):
    fault_server.set_fault("drop_stream", after_chunks=2)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream(
            "POST",
            fault_server.base_url + "/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "stream": True},
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line)
    assert len(received) == 2 and "[DONE]" not in "".join(received)


@pytest.mark.parametrize("mode", ["close", "reset"])
def test_connection_faults(fault_server: FaultServer, mode: str):
    fault_server.set_fault(mode)
    with pytest.raises(openai.APIConnectionError):
        sdk(fault_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert fault_server.request_count(CHAT) == 1


def test_fault_queue_and_path_filter(fault_server: FaultServer):
    fault_server.set_faults([Fault("status", status=503, times=2), Fault("close", times=1)])
    client = sdk(fault_server)
    assert client.models.list().data  # /v1/models is not an inference path: unaffected
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="tiny", messages=MESSAGES)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES).usage

    fault_server.set_fault("status", status=503, paths="*")
    assert httpx.get(fault_server.root_url + "/health").status_code == 503


def test_admin_endpoints_and_metrics(fault_server: FaultServer):
    root = fault_server.root_url
    assert httpx.post(root + "/_fault", json={"mode": "status", "status": 502}).status_code == 200
    assert httpx.post(root + "/v1/completions", json={"prompt": "a"}).status_code == 502
    assert httpx.get(root + "/_fault/stats").json()["by_path"] == {"/v1/completions": 1}
    assert httpx.post(root + "/_fault", json={"mode": "nonsense"}).status_code == 400
    httpx.post(root + "/_fault/reset")
    ok = httpx.post(root + "/v1/completions", json={"prompt": "a b", "max_tokens": 3}).json()
    assert ok["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    metrics = httpx.get(root + "/metrics").text
    assert "vllm:generation_tokens_total" in metrics and "vllm:num_requests_running" in metrics
