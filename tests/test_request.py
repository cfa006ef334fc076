"""The create request: every refusal names its field; accepted requests survive storage."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from broker.request import (
    FakeOptions,
    GenerationRequest,
    InvalidRequest,
    parse_create_body,
)

LIMIT = 1000
MAX_MESSAGES = 4


def good(model: str = "fake") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}]}


def parse(body: Any, *, fake_model: bool = True) -> GenerationRequest:
    return parse_create_body(
        body, fake_model=fake_model, max_messages=MAX_MESSAGES, max_tokens_limit=LIMIT
    )


def edit(**changes: Any) -> Callable[[dict[str, Any]], Any]:
    def apply(body: dict[str, Any]) -> dict[str, Any]:
        body.update(changes)
        return body

    return apply


def drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def apply(body: dict[str, Any]) -> dict[str, Any]:
        del body[key]
        return body

    return apply


def message(**fields: Any) -> Callable[[dict[str, Any]], Any]:
    return edit(messages=[{"role": "user", "content": "Hi"}, fields])


# (case id, change to a good fake-model body, expected .field)
BAD: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("body is a list", lambda b: [b], ""),
    ("body is a string", lambda b: "hello", ""),
    ("body is null", lambda b: None, ""),
    ("model missing", drop("model"), "model"),
    ("model not a string", edit(model=7), "model"),
    ("model empty", edit(model="  "), "model"),
    ("model not printable", edit(model="fa\nke"), "model"),
    ("messages missing", drop("messages"), "messages"),
    ("messages empty", edit(messages=[]), "messages"),
    ("messages not a list", edit(messages={"role": "user", "content": "x"}), "messages"),
    ("messages a string", edit(messages="Hello"), "messages"),
    ("too many messages", edit(messages=[{"role": "user", "content": "x"}] * 5), "messages"),
    (
        "message not an object",
        edit(messages=[{"role": "user", "content": "x"}, "hi"]),
        "messages[1]",
    ),
    ("bad role", message(role="robot", content="x"), "messages[1].role"),
    ("role missing", message(content="x"), "messages[1].role"),
    # Regression (found by tests/test_fuzz.py): an unhashable role was a TypeError, a 500.
    ("role a list", message(role=[], content="x"), "messages[1].role"),
    ("role an object", message(role={"r": 1}, content="x"), "messages[1].role"),
    ("content missing", message(role="user"), "messages[1].content"),
    ("content a number", message(role="user", content=5), "messages[1].content"),
    ("assistant without content or calls", message(role="assistant"), "messages[1].content"),
    (
        "content part not an object",
        message(role="user", content=["text"]),
        "messages[1].content[0]",
    ),
    (
        "content part without type",
        message(role="user", content=[{"type": "text", "text": "a"}, {"text": "b"}]),
        "messages[1].content[1]",
    ),
    (
        "tool message without tool_call_id",
        message(role="tool", content="42"),
        "messages[1].tool_call_id",
    ),
    (
        "tool_call_id not a string",
        message(role="tool", content="42", tool_call_id=3),
        "messages[1].tool_call_id",
    ),
    ("max_tokens zero", edit(max_tokens=0), "max_tokens"),
    ("max_tokens negative", edit(max_tokens=-5), "max_tokens"),
    ("max_tokens float", edit(max_tokens=10.0), "max_tokens"),
    ("max_tokens bool", edit(max_tokens=True), "max_tokens"),
    ("max_tokens string", edit(max_tokens="10"), "max_tokens"),
    ("max_tokens over limit", edit(max_tokens=LIMIT + 1), "max_tokens"),
    (
        "max_completion_tokens over limit",
        edit(max_completion_tokens=LIMIT + 1),
        "max_completion_tokens",
    ),
    (
        "max_tokens vs max_completion_tokens",
        edit(max_tokens=10, max_completion_tokens=20),
        "max_completion_tokens",
    ),
    ("metadata a list", edit(metadata=["a"]), "metadata"),
    ("metadata a string", edit(metadata="a"), "metadata"),
    ("metadata value an object", edit(metadata={"session": {"a": 1}}), "metadata.session"),
    ("metadata value a list", edit(metadata={"tags": ["a"]}), "metadata.tags"),
    ("metadata value too long", edit(metadata={"note": "x" * 513}), "metadata.note"),
    ("metadata too many keys", edit(metadata={f"k{i}": i for i in range(65)}), "metadata"),
    ("stream not a bool", edit(stream="yes"), "stream"),
    ("stream a number", edit(stream=1), "stream"),
    ("n is 2", edit(n=2), "n"),
    ("n is 0", edit(n=0), "n"),
    ("temperature too high", edit(temperature=2.5), "temperature"),
    ("temperature negative", edit(temperature=-0.1), "temperature"),
    ("temperature a string", edit(temperature="hot"), "temperature"),
    ("temperature a bool", edit(temperature=True), "temperature"),
    ("top_p above one", edit(top_p=1.01), "top_p"),
    ("presence_penalty out of range", edit(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty out of range", edit(frequency_penalty=-2.5), "frequency_penalty"),
    ("seed a string", edit(seed="1"), "seed"),
    ("stop a number", edit(stop=5), "stop"),
    ("stop with a non-string", edit(stop=["a", 1]), "stop"),
    ("stop with five strings", edit(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("tools not a list", edit(tools={"type": "function"}), "tools"),
    ("tools with a non-object", edit(tools=[{"type": "function"}, "x"]), "tools"),
    ("tool_choice a number", edit(tool_choice=1), "tool_choice"),
    ("fake not an object", edit(fake=[1]), "fake"),
    ("fake unknown option", edit(fake={"speed": 3}), "fake.speed"),
    ("fake rate zero", edit(fake={"tokens_per_second": 0}), "fake.tokens_per_second"),
    ("fake rate negative", edit(fake={"tokens_per_second": -1}), "fake.tokens_per_second"),
    ("fake rate a string", edit(fake={"tokens_per_second": "fast"}), "fake.tokens_per_second"),
    ("fake rate too high", edit(fake={"tokens_per_second": 1e9}), "fake.tokens_per_second"),
    (
        "fake negative fail_after_tokens",
        edit(fake={"fail_after_tokens": -1}),
        "fake.fail_after_tokens",
    ),
    (
        "fake float fail_after_tokens",
        edit(fake={"fail_after_tokens": 1.5}),
        "fake.fail_after_tokens",
    ),
    (
        "fake bool fail_after_tokens",
        edit(fake={"fail_after_tokens": False}),
        "fake.fail_after_tokens",
    ),
    ("fake bool seed", edit(fake={"seed": True}), "fake.seed"),
    ("fake string seed", edit(fake={"seed": "7"}), "fake.seed"),
    ("fake huge seed", edit(fake={"seed": 2**63}), "fake.seed"),
]


@pytest.mark.parametrize(
    ("change", "field"), [(c, f) for _, c, f in BAD], ids=[name for name, _, _ in BAD]
)
def test_a_bad_request_names_its_field(change: Callable[[dict[str, Any]], Any], field: str) -> None:
    body = change(good())
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.field == field
    assert info.value.message
    if field:
        assert str(info.value).startswith(field)


def test_a_long_metadata_key_is_refused_under_metadata() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse({**good(), "metadata": {"k" * 65: "v"}})
    assert info.value.field.startswith("metadata.")


@pytest.mark.parametrize("fake", [{"seed": 1}, {}, None])
def test_fake_options_are_refused_with_a_model_that_is_not_the_fake(fake: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse({**good("gpt-4o"), "fake": fake}, fake_model=False)
    assert info.value.field == "fake"
    assert "gpt-4o" in info.value.message


def test_invalid_request_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="model"):
        parse({"messages": [{"role": "user", "content": "x"}]})


GOOD: list[tuple[str, dict[str, Any], bool]] = [
    ("minimal fake", good(), True),
    ("minimal upstream", good("gpt-4o"), False),
    (
        "everything",
        {
            "model": "fake",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "w", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "max_tokens": 200,
            "metadata": {"session": "abc", "n": 3, "ok": True, "none": None, "ü": "é"},
            "fake": {"tokens_per_second": 1000, "fail_after_tokens": 7, "seed": -42},
            "temperature": 0.7,
            "top_p": 1,
            "stop": ["\n\n"],
            "seed": 5,
            "tools": [{"type": "function", "function": {"name": "w"}}],
            "tool_choice": "auto",
            "stream": True,
            "n": 1,
            "user": "u-1",
        },
        True,
    ),
    (
        "max_completion_tokens",
        {**good("gpt-4o"), "max_completion_tokens": 50, "response_format": {"type": "json_object"}},
        False,
    ),
    ("both token limits agree", {**good(), "max_tokens": 9, "max_completion_tokens": 9}, True),
    (
        "stop as a string, nulls as absent",
        {
            **good("gpt-4o"),
            "stop": "END",
            "temperature": None,
            "max_tokens": None,
            "metadata": None,
        },
        False,
    ),
    ("fake null", {**good(), "fake": None}, True),
]


@pytest.mark.parametrize(
    ("body", "fake_model"), [(b, f) for _, b, f in GOOD], ids=[name for name, _, _ in GOOD]
)
def test_a_good_request_round_trips_through_its_stored_form(
    body: dict[str, Any], fake_model: bool
) -> None:
    sent = copy.deepcopy(body)
    request = parse(body, fake_model=fake_model)
    assert body == sent, "parsing must not change the client's body"
    stored = json.loads(json.dumps(request.to_dict()))
    again = GenerationRequest.from_dict(stored)
    assert again == request
    assert again.to_dict() == request.to_dict()
    # The stored form is itself an acceptable create body that parses to the same request.
    assert parse(stored, fake_model=fake_model) == request


def test_fields_are_parsed_into_the_typed_request() -> None:
    request = parse(GOOD[2][1])
    assert request.model == "fake"
    assert len(request.messages) == 4
    assert request.max_tokens == 200
    assert request.metadata == {"session": "abc", "n": 3, "ok": True, "none": None, "ü": "é"}
    assert request.fake == FakeOptions(tokens_per_second=1000.0, fail_after_tokens=7, seed=-42)


def test_pass_through_parameters_are_kept_and_own_keys_are_not() -> None:
    request = parse(GOOD[2][1])
    assert request.params == {
        "temperature": 0.7,
        "top_p": 1,
        "stop": ["\n\n"],
        "seed": 5,
        "tools": [{"type": "function", "function": {"name": "w"}}],
        "tool_choice": "auto",
        "user": "u-1",
    }
    stored = request.to_dict()
    for own in ("stream", "n", "max_completion_tokens"):
        assert own not in stored
    assert stored["temperature"] == 0.7
    assert stored["user"] == "u-1"


def test_max_completion_tokens_becomes_max_tokens() -> None:
    request = parse({**good("gpt-4o"), "max_completion_tokens": 50}, fake_model=False)
    assert request.max_tokens == 50
    assert request.params == {}


def test_the_fake_model_gets_default_options() -> None:
    request = parse(good())
    assert request.fake == FakeOptions()
    assert parse({**good(), "fake": None}).fake == FakeOptions()
    partial = parse({**good(), "fake": {"seed": 3}}).fake
    assert partial == FakeOptions(seed=3)


def test_another_model_has_no_fake_options_and_no_max_tokens_by_default() -> None:
    request = parse(good("gpt-4o"), fake_model=False)
    assert request.fake is None
    assert request.max_tokens is None
    assert "fake" not in request.to_dict()
    assert "max_tokens" not in request.to_dict()


def test_max_tokens_at_the_limit_is_accepted() -> None:
    assert parse({**good(), "max_tokens": LIMIT}).max_tokens == LIMIT
    assert parse({**good(), "max_tokens": 1}).max_tokens == 1


def test_null_is_absent_for_n_and_stream_as_in_openai() -> None:
    # OpenAI's chat API documents both as nullable ("integer or null", "boolean or null"),
    # and this module treats null as absent for max_tokens, temperature, metadata and stop.
    request = parse({**good(), "n": None, "stream": None})
    assert request == parse(good())
