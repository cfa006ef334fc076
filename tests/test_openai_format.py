"""OpenAI's shapes without processes: stream:false folding (tool calls, errors) and error
bodies. The streamed chunks are in ``test_wire_formats.py``."""

from __future__ import annotations

from api.openai_format import Completion, error_body


def test_completion_folds_text_tool_calls_and_errors() -> None:
    completion = Completion("s1", "m", 100)
    for event, data in [
        ("metadata", {}),
        ("tool_call", {"index": 1, "id": "c2", "name": "g", "arguments": "{"}),
        ("tool_call", {"index": 0, "id": "c1", "name": "f", "arguments": "{}"}),
        ("tool_call", {"index": 1, "arguments": "}"}),
        ("done", {"finish_reason": "tool_calls", "usage": {"total_tokens": 3}}),
    ]:
        completion.add(event, data)
    body = completion.body()
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in message["tool_calls"]] == [("c1", "f", "{}"), ("c2", "g", "{}")]  # fmt: skip
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {"total_tokens": 3}
    failed = Completion("s2", "m", 100)
    failed.add("token", {"text": "a"})
    failed.add("error", {"code": "x", "message": "m", "retryable": True})
    assert failed.error == {"code": "x", "message": "m", "retryable": True}


def test_error_bodies_have_openai_types_and_the_broker_code() -> None:
    assert error_body(401, "unauthorized", "no")["error"] == {
        "message": "no",
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
    }
    assert error_body(503, "store_unavailable", "x")["error"]["type"] == "server_error"
    assert error_body(429, "too_many", "x")["error"]["type"] == "rate_limit_error"
