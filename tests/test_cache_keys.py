"""Namespace, exact key and query text: what may and may not share an answer."""

from cache.keys import canonical_hash, namespace_for, query_text


def chat(question: str, system: str = "You are helpful.", **params) -> dict:
    return {
        "model": "llama",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        **params,
    }


def test_last_user_turn_is_not_part_of_the_namespace() -> None:
    assert namespace_for("t", "m", chat("How do I bake bread?")) == namespace_for(
        "t", "m", chat("What is the way to bake bread?")
    )


def test_tenant_model_system_prompt_and_params_split_namespaces() -> None:
    base = namespace_for("t", "m", chat("q"))
    assert namespace_for("other", "m", chat("q")) != base
    assert namespace_for("t", "other", chat("q")) != base
    assert namespace_for("t", "m", chat("q", system="Answer in French.")) != base
    assert namespace_for("t", "m", chat("q", temperature=0.7)) != base
    assert namespace_for("t", "m", chat("q", max_tokens=5)) != base
    assert namespace_for("t", "m", chat("q", tools=[{"type": "function"}])) != base
    assert namespace_for("t", "m", chat("q", response_format={"type": "json_object"})) != base
    # Unknown future parameters must split namespaces too (deny-list design).
    assert namespace_for("t", "m", chat("q", some_new_knob=3)) != base


def test_volatile_fields_do_not_split_namespace_or_exact_key() -> None:
    plain = chat("q")
    noisy = chat(
        "q",
        stream=True,
        stream_options={"include_usage": True},
        user="u1",
        metadata={"trace": "x"},
        store=True,
        service_tier="auto",
    )
    assert namespace_for("t", "m", plain) == namespace_for("t", "m", noisy)
    ns = namespace_for("t", "m", plain)
    assert canonical_hash(ns, plain) == canonical_hash(ns, noisy)


def test_numbers_are_normalised_and_nulls_dropped() -> None:
    assert namespace_for("t", "m", chat("q", temperature=0.0)) == namespace_for(
        "t", "m", chat("q", temperature=0)
    )
    assert namespace_for("t", "m", chat("q", stop=None)) == namespace_for("t", "m", chat("q"))


def test_earlier_turns_and_trailing_messages_are_in_the_namespace() -> None:
    first = chat("q")
    longer = chat("q")
    longer["messages"].insert(1, {"role": "user", "content": "earlier"})
    longer["messages"].insert(2, {"role": "assistant", "content": "reply"})
    assert namespace_for("t", "m", first) != namespace_for("t", "m", longer)
    prefill = chat("q")
    prefill["messages"].append({"role": "assistant", "content": "Sure:"})
    assert namespace_for("t", "m", first) != namespace_for("t", "m", prefill)


def test_exact_key_depends_on_wording_and_namespace() -> None:
    ns = namespace_for("t", "m", chat("a"))
    assert canonical_hash(ns, chat("a")) != canonical_hash(ns, chat("b"))
    assert canonical_hash(ns, chat("a")) != canonical_hash("other", chat("a"))


def test_chat_and_completion_never_share_a_namespace() -> None:
    completion = {"model": "llama", "prompt": "q", "temperature": 0}
    no_system = {"model": "llama", "messages": [{"role": "user", "content": "q"}], "temperature": 0}
    assert namespace_for("t", "m", completion) != namespace_for("t", "m", no_system)


def test_query_text() -> None:
    assert query_text(chat("  hello ")) == "  hello "
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            }
        ]
    }
    assert query_text(parts) == "one\ntwo"
    assert query_text({"prompt": "complete me"}) == "complete me"
    assert query_text({"prompt": ["only one"]}) == "only one"
    assert query_text({"messages": [{"role": "system", "content": "s"}]}) == ""
