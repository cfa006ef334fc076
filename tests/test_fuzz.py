"""Fuzzing the HTTP surface: whatever a client sends, the answer is never a 5xx, every error
is the JSON error shape, and what is stored stays intact. The real app runs in-process on
the session's redis-server, with auth on (so the auth paths are fuzzed too); hypothesis
generates the requests. Sized to run in seconds; HYPOTHESIS_PROFILE=long runs more.

Numbers are fuzzed in the characters ``int()``, ``float()`` and ``str.isdigit()`` read besides
ASCII 0-9 (a superscript in ``?limit=²`` was a 500): each must be refused, never crash.

Each test starts from an emptied store with an app and a witness stream of its own, and checks
after each example that the witness is intact; what it needs stored (the listing's streams
with fuzzed metadata) each example stores itself. So none depends on another having run
before it, on the order they run in, or on what other modules left in the store."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.support import fuzzing
from tests.support.fuzzing import FUZZ
from tests.support.generations import bearer, create_request, create_stream, stream_state
from tests.support.processes import Launcher

pytestmark = pytest.mark.redis

KEY = "key-of-the-fuzzing-tenant-0123"
AUTH = bearer(KEY)
json_values = fuzzing.json_values()
#: Bodies shaped like a create, with any field swapped for junk: deeper than pure noise.
create_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("fake"), json_values),
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "role": json_values | st.sampled_from(["user", "system"]),
                        "content": json_values,
                    },
                ),
                max_size=3,
            ),
            json_values,
        ),
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=2**70), json_values),
        "fake": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "tokens_per_second": st.one_of(st.floats(), json_values),
                    "seed": json_values,
                    "fail_after_tokens": json_values,
                },
            ),
            json_values,
        ),
        "metadata": json_values,
    },
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
stream_ids = st.text(alphabet="0123456789abcdefghjkmnpqrstvwxyz", min_size=26, max_size=26)
path_ids = st.one_of(
    stream_ids,
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
        max_size=30,
    ),
)
#: What str.isdigit() accepts besides ASCII 0-9: superscripts, subscripts and circled digits
#: (Unicode category No: int() raises on them), other scripts' decimal digits (Nd: Arabic-Indic,
#: Persian, Devanagari, full-width, NKo; int() reads them).
DIGIT_LOOKALIKES = "²³¹⁰⁹₀₉①⑨❶\u0661\u0669\u06f4\u0966\uff11\uff19\u07c0"
#: Numbers as a query parameter, a cursor or a token may carry them: what str.isdigit()
#: passes; any Unicode numeral mixed with what int() and float() skip or read ('+', '-', '_',
#: '.', 'e', spaces); plain integers.
number_text = st.one_of(
    st.text(alphabet="0123456789" + DIGIT_LOOKALIKES, min_size=1, max_size=6),
    st.text(
        alphabet=st.sampled_from("0123456789+-_. e") | st.characters(categories=["Nd", "No"]),
        max_size=8,
    ),
    st.integers(min_value=-5, max_value=2**70).map(str),
)
#: The same in a header: latin-1 bytes (Starlette decodes a header as latin-1), whose only
#: numerals besides ASCII are superscripts and vulgar fractions.
header_numbers = st.text(alphabet="0123456789²³¹¼½¾+-_. \t", max_size=8).map(
    lambda text: text.encode("latin-1")
)
query_values = st.one_of(header_text, number_text)
cursors = st.builds("{}.{}".format, number_text, st.one_of(stream_ids, header_text))
#: Shaped like ``<stream id>.<expiry>.<signature>`` (``broker.read_token_signing``), so the
#: expiry is parsed, or any text; none is signed with the app's secret.
read_tokens = st.one_of(
    st.builds(
        "{}.{}.{}".format,
        stream_ids,
        number_text,
        st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    ),
    header_text,
)
ASCII_DECIMAL = re.compile(r"[0-9]+")


@pytest.fixture
def app_client(launch: Launcher) -> TestClient:
    """The app of one test (all its examples), on a store emptied for it."""
    env = {
        "BROKER_API_KEYS": f"{KEY}:fuzz",
        "BROKER_READ_TOKEN_SECRETS": "t" * 32,
        "BROKER_MAX_BODY_BYTES": "4096",
    }
    return launch.app(env, flush=True, raise_server_exceptions=False)


@pytest.fixture
def witness(app_client: TestClient) -> dict[str, Any]:
    """A stream created before the test's fuzzing: every example must leave it as it was."""
    created = create_stream(
        app_client, key=KEY, max_tokens=2, messages=[{"role": "user", "content": "keep me"}]
    )
    return stream_state(app_client, created["id"], KEY)


def assert_answer_is_sane(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str)
        assert error["code"]
        assert isinstance(error["message"], str)
        assert "Traceback" not in response.text


def assert_witness_intact(app_client: TestClient, witness: dict[str, Any]) -> None:
    """Checked after each example, not by a test that runs last: whichever test damages the
    witness fails, with the example that did it, whatever ran before."""
    now = app_client.get(f"/v1/streams/{witness['id']}", headers=AUTH).json()
    counters = ("connections", "resumes")  # they count the fuzzing's own event requests
    assert {k: v for k, v in now.items() if k not in counters} == {
        k: v for k, v in witness.items() if k not in counters
    }


def refusal(app_client: TestClient, url: str, **kwargs: Any) -> Any:
    """The answer to a GET, None when it was accepted: the witness is queued (no worker runs
    here), so an accepted events request would stream forever; no 200 is read."""
    with app_client.stream("GET", url, **kwargs) as response:
        if response.status_code == 200:
            return None
        response.read()
    return response


@FUZZ
@given(
    body=st.one_of(create_like, json_values),
    raw=st.booleans(),
    junk=st.binary(max_size=200),
    content_length=st.one_of(st.none(), header_numbers),
)
def test_any_create_body_gets_a_sane_answer(
    app_client: TestClient,
    witness: dict[str, Any],
    body: Any,
    raw: bool,
    junk: bytes,
    content_length: bytes | None,
) -> None:
    headers: dict[str, Any] = {**AUTH, "Content-Type": "application/json"}
    if content_length is not None:
        headers["Content-Length"] = content_length
    if raw:
        response = app_client.post("/v1/streams", content=junk, headers=headers)
    else:
        try:
            content = json.dumps(body, allow_nan=True)
        except (ValueError, RecursionError):
            return
        response = app_client.post("/v1/streams", content=content, headers=headers)
    assert_answer_is_sane(response)
    if response.status_code == 201:
        assert response.json()["status"] == "queued"
    assert_witness_intact(app_client, witness)


@FUZZ
@given(
    stream_id=path_ids,
    last_event_id=st.one_of(
        st.none(), header_text, header_numbers, st.integers(min_value=-5, max_value=2**70).map(str)
    ),
    query=st.dictionaries(
        st.sampled_from(["last_event_id", "token", "replay", "x"]), query_values, max_size=3
    ),
    authorization=st.one_of(st.none(), st.just(AUTH["Authorization"]), header_text),
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    suffix=st.sampled_from(["", "/events", "/cancel", "/nope"]),
)
def test_any_stream_request_gets_a_sane_answer(
    app_client: TestClient,
    witness: dict[str, Any],
    stream_id: str,
    last_event_id: str | bytes | None,
    query: dict[str, str],
    authorization: str | None,
    method: str,
    suffix: str,
) -> None:
    headers: dict[str, Any] = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    if suffix == "/events" and method == "GET":
        return  # a live stream would not end; events are fuzzed on the witness below
    response = app_client.request(
        method, f"/v1/streams/{stream_id}{suffix}", headers=headers, params=query
    )
    assert_answer_is_sane(response)
    assert_witness_intact(app_client, witness)


@FUZZ
@given(
    last_event_id=st.one_of(
        st.none(),
        header_text,
        header_numbers,
        st.integers(min_value=-5, max_value=2**70).map(str),
    ),
    query=st.dictionaries(
        st.sampled_from(["last_event_id", "token", "replay"]), query_values, max_size=3
    ),
)
def test_any_resume_point_on_a_stream_gets_a_sane_answer(
    app_client: TestClient,
    witness: dict[str, Any],
    last_event_id: str | bytes | None,
    query: dict[str, str],
) -> None:
    url = f"/v1/streams/{witness['id']}/events"
    headers: dict[str, Any] = dict(AUTH)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    response = refusal(app_client, url, headers=headers, params=query)
    if response is None:
        # Accepted: a speed is digits with at most one '.' between them, nothing else.
        speed = query.get("replay")
        assert speed is None or re.fullmatch(r"[0-9]+(\.[0-9]+)?", speed), speed
    else:
        assert_answer_is_sane(response)
    assert_witness_intact(app_client, witness)


@FUZZ
@given(token=read_tokens, suffix=st.sampled_from(["", "/events"]))
def test_any_read_token_is_refused_as_invalid(
    app_client: TestClient, witness: dict[str, Any], token: str, suffix: str
) -> None:
    """No key is needed to send a token, so whatever it holds is refused with 401: none is
    signed with the app's secret."""
    url = f"/v1/streams/{witness['id']}{suffix}"
    response = refusal(app_client, url, params={"token": token})
    assert response is not None, "a forged token was accepted"
    assert_answer_is_sane(response)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_token"
    assert_witness_intact(app_client, witness)


@FUZZ
@given(
    stored=st.lists(
        st.dictionaries(st.sampled_from(["session", "user"]), query_values | json_values),
        max_size=3,
    ),
    query=st.fixed_dictionaries(
        {},
        optional={
            "limit": number_text,
            "cursor": st.one_of(cursors, header_text),
            "status": st.one_of(st.sampled_from(["queued", "completed"]), header_text),
            "created_after": query_values,
            "metadata.session": query_values,
            "x": query_values,
        },
    ),
)
def test_any_listing_query_gets_a_sane_answer(
    app_client: TestClient,
    witness: dict[str, Any],
    stored: list[dict[str, Any]],
    query: dict[str, str],
) -> None:
    """The listing of streams this example stored, with fuzzed metadata (a create may refuse
    it, sanely), besides the witness: not of whatever another test happened to leave."""
    headers = {**AUTH, "Content-Type": "application/json"}
    for metadata in stored:
        # As a client's bytes: NaN and Infinity included, which a create must refuse sanely.
        content = json.dumps(create_request(metadata=metadata), allow_nan=True)
        assert_answer_is_sane(app_client.post("/v1/streams", content=content, headers=headers))
    response = app_client.get("/v1/streams", params=query, headers=AUTH)
    assert_answer_is_sane(response)
    if "limit" in query and not ASCII_DECIMAL.fullmatch(query["limit"]):
        assert response.status_code == 400, query["limit"]
    assert_witness_intact(app_client, witness)
