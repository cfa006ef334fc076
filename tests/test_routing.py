"""Model routing: ordered shell-style patterns, first match wins."""

from __future__ import annotations

import pytest

from broker.routing import fixed_models, route_model
from broker.settings import GenerationSettings

ROUTES = (
    ("fake", "fake"),
    ("fake-*", "fake"),
    ("llama-?b", "openai"),
    ("gpt-[34]*", "openai"),
    ("special", "openai"),
    ("*", "openai"),
)


def test_the_first_matching_route_wins() -> None:
    routes = (("gpt-4o", "fake"), ("gpt-*", "openai"), ("*", "fake"))
    assert route_model("gpt-4o", routes) == "fake"
    assert route_model("gpt-4o-mini", routes) == "openai"
    assert route_model("claude", routes) == "fake"


def test_a_later_route_cannot_override_an_earlier_one() -> None:
    assert route_model("fake", (("*", "openai"), ("fake", "fake"))) == "openai"


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("fake", "fake"),
        ("fake-slow", "fake"),
        ("llama-7b", "openai"),
        ("gpt-4o", "openai"),
        ("gpt-3.5-turbo", "openai"),
        ("anything/else:latest", "openai"),
    ],
)
def test_wildcard_patterns(model: str, provider: str) -> None:
    assert route_model(model, ROUTES) == provider


@pytest.mark.parametrize(
    "model",
    ["fakes", "Fake", "FAKE-x", "llama-70b", "llama-b", "gpt-5", "gpt-", "", "xfake"],
)
def test_no_match_is_none(model: str) -> None:
    routes = [r for r in ROUTES if r[0] != "*"]
    assert route_model(model, routes) is None


def test_no_routes_route_nothing() -> None:
    assert route_model("fake", ()) is None


def test_the_default_routes_send_fake_to_the_fake_and_the_rest_upstream() -> None:
    routes = GenerationSettings().routes
    assert route_model("fake", routes) == "fake"
    assert route_model("gpt-4o", routes) == "openai"


def test_fixed_models_are_the_exact_names_of_a_provider_in_order() -> None:
    routes = (("zeta", "openai"), ("fake", "fake"), ("alpha", "openai"), ("fake2", "fake"))
    assert fixed_models(routes, "openai") == ["zeta", "alpha"]
    assert fixed_models(routes, "fake") == ["fake", "fake2"]


def test_fixed_models_leave_out_every_wildcard_pattern() -> None:
    assert fixed_models(ROUTES, "fake") == ["fake"]
    assert fixed_models(ROUTES, "openai") == ["special"]
    assert fixed_models((("m?", "openai"), ("[ab]", "openai")), "openai") == []
    assert fixed_models(ROUTES, "nobody") == []
