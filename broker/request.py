"""The create request: validation of the client's JSON and the typed form workers read.

Validation lives here, not in the api, because the stored request is the contract between
the api (which accepts it) and the workers (which run it). Every refusal names the field
path (``messages[2].role``) so a client can fix its request without guessing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

#: Body keys the broker consumes itself instead of passing them to the provider.
#: ``stream``/``stream_options``/``n`` are decided by the broker (one streamed choice with usage).
OWN_KEYS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "metadata",
        "fake",
        "stream",
        "stream_options",
        "n",
    }
)

MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_FAKE_TOKENS_PER_SECOND = 100_000.0
#: The longest a fake generation may take, so a mistyped rate cannot hold a worker for days.
MAX_FAKE_SECONDS = 3600
FAKE_DEFAULT_TOKENS = 128


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class FakeOptions:
    tokens_per_second: float = 50.0
    fail_after_tokens: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    #: The name the client gave the limit; passed upstream under the same name, because
    #: reasoning models accept only ``max_completion_tokens`` and older servers only ``max_tokens``.
    max_tokens_field: str = "max_tokens"
    #: Other OpenAI chat parameters (temperature, tools, …) passed to the provider as they are.
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    fake: FakeOptions | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the request in OpenAI chat shape, as the client could have sent it."""
        body: dict[str, Any] = {"model": self.model, "messages": self.messages, **self.params}
        if self.max_tokens is not None:
            body[self.max_tokens_field] = self.max_tokens
        if self.metadata:
            body["metadata"] = self.metadata
        if self.fake is not None:
            body["fake"] = asdict(self.fake)
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> GenerationRequest:
        """Rebuild a stored request (already validated when it was accepted)."""
        fake = body.get("fake")
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return cls(
            model=body["model"],
            messages=body["messages"],
            max_tokens=body.get(field),
            max_tokens_field=field,
            params={k: v for k, v in body.items() if k not in OWN_KEYS},
            metadata=body.get("metadata") or {},
            fake=FakeOptions(**fake) if isinstance(fake, dict) else None,
        )


def parse_create_body(
    body: Any,
    *,
    fake_model: bool,
    max_messages: int,
    max_tokens_limit: int,
    fake_default_tokens: int = FAKE_DEFAULT_TOKENS,
) -> GenerationRequest:
    """Validate a create body; ``fake_model`` says whether the model routes to the fake,
    which makes ``fake_default_tokens`` tokens when the body sets no ``max_tokens``."""
    if not isinstance(body, dict):
        raise InvalidRequest("", "the request body must be a JSON object")
    model = _model(body)
    messages = _messages(body.get("messages"), max_messages)
    max_tokens = _max_tokens(body, max_tokens_limit)
    max_tokens_field = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    metadata = _metadata(body.get("metadata"))
    if "fake" in body and not fake_model:
        raise InvalidRequest(
            "fake", f"the 'fake' options are accepted only with the fake model, not with {model!r}"
        )
    fake = _fake(body["fake"]) if fake_model and body.get("fake") is not None else None
    if fake_model and fake is None:
        fake = FakeOptions()
    if fake is not None:
        seconds = (max_tokens or fake_default_tokens) / fake.tokens_per_second
        if seconds > MAX_FAKE_SECONDS:
            raise InvalidRequest(
                "fake.tokens_per_second",
                f"is too slow: the answer would take "
                f"{seconds:.0f} s, and the fake model runs at most "
                f"{MAX_FAKE_SECONDS} s",
            )
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream", "must be true or false")
    if body.get("n") not in (None, 1):
        raise InvalidRequest("n", "only n = 1 is supported: a stream carries one choice")
    params = {k: v for k, v in body.items() if k not in OWN_KEYS}
    _check_params(params)
    return GenerationRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        params=params,
        metadata=metadata,
        fake=fake,
    )


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("model", "is required")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model", "must be a non-empty string")
    if len(model) > 256 or not model.isprintable():
        raise InvalidRequest("model", "must be at most 256 printable characters")
    return model


def _messages(messages: Any, max_messages: int) -> list[dict[str, Any]]:
    if messages is None:
        raise InvalidRequest("messages", "is required")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty array of messages")
    if len(messages) > max_messages:
        raise InvalidRequest(
            "messages", f"has {len(messages)} messages; at most {max_messages} are accepted"
        )
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")
    return messages


def _check_message(message: Any, where: str) -> None:
    """One chat message: a known role, content of a form its role allows, and for a tool's
    result the id of the call it answers."""
    if not isinstance(message, dict):
        raise InvalidRequest(where, "must be an object with 'role' and 'content'")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a list or dict cannot be hashed
        raise InvalidRequest(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}")
    _check_content(message, role, where)
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(f"{where}.tool_call_id", "is required for role 'tool'")


def _check_content(message: dict[str, Any], role: str, where: str) -> None:
    """A string, or an array of typed parts; none only from an assistant that calls tools
    instead of answering."""
    content = message.get("content")
    if content is None:
        has_calls = bool(message.get("tool_calls") or message.get("function_call"))
        if not (role == "assistant" and has_calls):
            raise InvalidRequest(f"{where}.content", "is required")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"{where}.content[{j}]", "must be an object with a string 'type'"
                )
    elif not isinstance(content, str):
        raise InvalidRequest(f"{where}.content", "must be a string or an array of parts")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    """A finite float or a 64-bit integer (bool is an int in Python, but not a number here)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, float) and math.isfinite(value)


def _max_tokens(body: dict[str, Any], limit: int) -> int | None:
    value = None
    for name in ("max_tokens", "max_completion_tokens"):
        given = body.get(name)
        if given is None:
            continue
        if not _is_int(given) or not 1 <= given <= limit:
            raise InvalidRequest(name, f"must be an integer from 1 to {limit}")
        if value is not None and given != value:
            raise InvalidRequest(name, "disagrees with max_tokens; give one of the two")
        value = given
    return value


def _metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata", "must be an object of string keys")
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest("metadata", f"has more than {MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidRequest(
                f"metadata.{key[:20]}…", f"keys are at most {MAX_METADATA_KEY_CHARS} characters"
            )
        if isinstance(value, str):
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise InvalidRequest(
                    f"metadata.{key}", f"strings are at most {MAX_METADATA_VALUE_CHARS} characters"
                )
        elif value is not None and not isinstance(value, bool) and not _is_number(value):
            raise InvalidRequest(f"metadata.{key}", "must be a string, number, boolean or null")
    return metadata


def _fake(options: Any) -> FakeOptions:
    if not isinstance(options, dict):
        raise InvalidRequest("fake", "must be an object")
    unknown = set(options) - {"tokens_per_second", "fail_after_tokens", "seed"}
    if unknown:
        raise InvalidRequest(
            f"fake.{sorted(unknown)[0]}",
            "is not an option (tokens_per_second, fail_after_tokens, seed)",
        )
    rate = options.get("tokens_per_second", FakeOptions.tokens_per_second)
    if not _is_number(rate) or not 0 < rate <= MAX_FAKE_TOKENS_PER_SECOND:
        raise InvalidRequest(
            "fake.tokens_per_second",
            f"must be a number above 0 and at most {MAX_FAKE_TOKENS_PER_SECOND:g}",
        )
    fail = options.get("fail_after_tokens")
    if fail is not None and (not _is_int(fail) or fail < 0):
        raise InvalidRequest("fake.fail_after_tokens", "must be a non-negative integer or null")
    seed = options.get("seed", 0)
    if not _is_int(seed) or abs(seed) >= 2**63:
        raise InvalidRequest("fake.seed", "must be an integer")
    return FakeOptions(tokens_per_second=float(rate), fail_after_tokens=fail, seed=seed)


def _check_params(params: dict[str, Any]) -> None:
    """Type-check the pass-through parameters the broker knows; the provider judges the rest."""
    ranges = {
        "temperature": (0.0, 2.0),
        "top_p": (0.0, 1.0),
        "presence_penalty": (-2.0, 2.0),
        "frequency_penalty": (-2.0, 2.0),
    }
    for name, (lo, hi) in ranges.items():
        if name in params and params[name] is not None:
            value = params[name]
            if not _is_number(value) or not lo <= value <= hi:
                raise InvalidRequest(name, f"must be a number from {lo:g} to {hi:g}")
    if "seed" in params and params["seed"] is not None and not _is_int(params["seed"]):
        raise InvalidRequest("seed", "must be an integer")
    stop = params.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)
        )
    ):
        raise InvalidRequest("stop", "must be a string or an array of at most 4 strings")
    tools = params.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise InvalidRequest("tools", "must be an array of tool objects")
    choice = params.get("tool_choice")
    if choice is not None and not isinstance(choice, str | dict):
        raise InvalidRequest("tool_choice", "must be a string or an object")
