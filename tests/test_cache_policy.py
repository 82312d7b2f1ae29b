"""Which requests bypass the cache."""

import pytest

from cache.policy import CachePolicy, cache_decision

POLICY = CachePolicy()


def chat(*messages: dict, **params) -> dict:
    return {"model": "m", "messages": list(messages), "temperature": 0, **params}


USER = {"role": "user", "content": "What is the capital of France?"}


def test_deterministic_text_chat_is_cacheable() -> None:
    assert cache_decision(chat(USER), POLICY) is None
    assert cache_decision({"model": "m", "prompt": "Once upon", "temperature": 0}, POLICY) is None


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (chat(USER, n=2), "n>1"),
        ({"model": "m", "prompt": "x", "temperature": 0, "best_of": 3}, "best_of>1"),
        ({"model": "m", "messages": [USER]}, "sampling"),  # OpenAI default temperature 1.0
        (chat(USER, temperature=0.7), "sampling"),
        (chat(USER, logprobs=True), "logprobs"),
        ({"model": "m", "prompt": "x", "temperature": 0, "logprobs": 2}, "logprobs"),
        (
            chat(
                USER,
                {"role": "assistant", "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ),
            "tool_calls_in_flight",
        ),
        (
            chat(USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}),
            "tool_calls_in_flight",
        ),
        (chat({"role": "system", "content": "s"}), "no_user_turn"),
        (
            chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
            "non_text",
        ),
        (chat({"role": "user", "content": "   "}), "empty_query"),
        ({"model": "m", "prompt": [1, 2, 3], "temperature": 0}, "non_text"),
        ({"model": "m", "prompt": ["a", "b"], "temperature": 0}, "multiple_prompts"),
        ({"model": "m", "input": "x", "temperature": 0}, "unsupported_request"),
    ],
)
def test_bypass_reasons(request_: dict, reason: str) -> None:
    assert cache_decision(request_, POLICY) == reason


def test_tenant_switches() -> None:
    assert cache_decision(chat(USER), CachePolicy(enabled=False)) == "disabled"
    sampled = chat(USER, temperature=0.9)
    assert cache_decision(sampled, CachePolicy(allow_sampling=True)) is None
    assert (
        cache_decision({"model": "m", "messages": [USER]}, CachePolicy(allow_sampling=True)) is None
    )


def test_tool_use_earlier_in_the_conversation_is_fine() -> None:
    convo = chat(
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        USER,
    )
    assert cache_decision(convo, POLICY) is None


def test_unknown_operating_point_is_rejected() -> None:
    with pytest.raises(ValueError):
        CachePolicy(operating_point="reckless")
