"""Settings from the environment: defaults, typed parsing, and loud refusal of bad values."""

from __future__ import annotations

import dataclasses

import pytest

from broker.errors import ConfigError
from broker.routing import continuation_mode
from broker.setting_fields import Continuation, Route
from broker.settings import (
    SECTIONS,
    ApiSettings,
    GenerationSettings,
    Settings,
    describe,
    env_name,
)
from broker.upstream import Upstream


def all_fields() -> list[dataclasses.Field[object]]:
    return [f for section in SECTIONS.values() for f in dataclasses.fields(section)]


def test_an_empty_environment_gives_the_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.redis_url is None
    assert settings.api.heartbeat_seconds == 15.0
    assert settings.api.models is None
    assert settings.generation.default_max_tokens == 128
    assert settings.generation.routes == (Route("fake", "fake"), Route("*", "openai"))


def test_variables_without_the_prefix_are_ignored() -> None:
    settings = Settings.from_env({"PATH": "/bin", "HOME": "/root", "BROKERX": "1"})
    assert settings == Settings()


def test_redis_url_is_read_and_an_empty_one_means_unset() -> None:
    assert Settings.from_env({"REDIS_URL": "redis://h:6380/2"}).redis_url == "redis://h:6380/2"
    assert Settings.from_env({"REDIS_URL": ""}).redis_url is None


def test_a_process_that_needs_redis_is_refused_without_it_saying_why() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://h:6380/2"})
    assert settings.require_redis_url("the api needs it") == "redis://h:6380/2"
    with pytest.raises(ConfigError, match=r"^REDIS_URL is not set: the api needs it$"):
        Settings.from_env({}).require_redis_url("the api needs it")


def test_the_upstream_is_read_from_the_sdks_own_variables() -> None:
    settings = Settings.from_env(
        {
            "OPENAI_BASE_URL": "http://llm:8000/v1",
            "OPENAI_API_KEY": "sk-secret-0123456789",
            "OPENAI_ORG_ID": "org-1",
            "OPENAI_PROJECT_ID": "proj-1",
        }
    )
    assert settings.upstream == Upstream(
        base_url="http://llm:8000/v1",
        api_key="sk-secret-0123456789",
        organization="org-1",
        project="proj-1",
    )
    assert settings.upstream.configured
    assert "sk-secret-0123456789" not in repr(settings)


def test_an_empty_upstream_variable_means_unset() -> None:
    settings = Settings.from_env({"OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""})
    assert settings.upstream == Upstream()
    assert not settings.upstream.configured


def test_every_field_has_a_unique_broker_variable() -> None:
    names = [env_name(f.name) for f in all_fields()]
    assert len(names) == len(set(names))
    assert all(name.startswith("BROKER_") and name == name.upper() for name in names)


def test_an_int_setting_is_parsed_as_int() -> None:
    settings = Settings.from_env({"BROKER_RETRY_MS": " 1500 ", "BROKER_MAX_JOBS": "7"})
    assert settings.api.retry_ms == 1500
    assert type(settings.api.retry_ms) is int
    assert settings.generation.max_jobs == 7


def test_a_float_setting_is_parsed_as_float() -> None:
    settings = Settings.from_env(
        {"BROKER_HEARTBEAT_SECONDS": "2.5", "BROKER_BATCH_MAX_AGE_MS": "10"}
    )
    assert settings.api.heartbeat_seconds == 2.5
    assert settings.generation.batch_max_age_ms == 10.0
    assert isinstance(settings.generation.batch_max_age_ms, float)


def test_values_go_to_their_own_section_and_leave_the_rest_default() -> None:
    settings = Settings.from_env({"BROKER_MAX_MESSAGES": "10"})
    assert settings.api == dataclasses.replace(ApiSettings(), max_messages=10)
    assert settings.generation == GenerationSettings()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("fake,llama-3", ("fake", "llama-3")),
        (" fake , gpt-4o ,", ("fake", "gpt-4o")),
        ("only", ("only",)),
        ("", None),
    ],
)
def test_an_optional_tuple_setting_is_a_comma_separated_list(
    raw: str, expected: tuple[str, ...] | None
) -> None:
    assert Settings.from_env({"BROKER_MODELS": raw}).api.models == expected


def test_routes_keep_their_order() -> None:
    settings = Settings.from_env({"BROKER_ROUTES": "fake=fake, llama-*=openai ,*=openai"})
    assert settings.generation.routes == (
        Route("fake", "fake"),
        Route("llama-*", "openai"),
        Route("*", "openai"),
    )


def test_a_route_may_say_how_its_provider_continues() -> None:
    raw = "fake=fake:off, vllm-*=openai:continue_final_message, ds-*=openai:prefix, *=openai"
    routes = Settings.from_env({"BROKER_ROUTES": raw}).generation.routes
    assert [r.continuation for r in routes] == [
        Continuation.OFF,
        Continuation.CONTINUE_FINAL_MESSAGE,
        Continuation.PREFIX,
        None,
    ]
    assert continuation_mode("fake", routes) is Continuation.OFF
    assert continuation_mode("vllm-7b", routes) is Continuation.CONTINUE_FINAL_MESSAGE
    assert continuation_mode("gpt-4o", routes) is Continuation.OFF  # openai's default


def test_the_fake_continues_exactly_and_openai_not_at_all_by_default() -> None:
    routes = Settings.from_env({}).generation.routes
    assert continuation_mode("fake", routes) is Continuation.EXACT
    assert continuation_mode("gpt-4o", routes) is Continuation.OFF
    assert continuation_mode("anything", ()) is Continuation.OFF


def test_an_unknown_variable_is_named_with_the_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BROKER_HEARTBEAT_SECOND": "5"})
    message = str(info.value)
    assert "BROKER_HEARTBEAT_SECOND" in message
    assert "did you mean BROKER_HEARTBEAT_SECONDS" in message


def test_an_unknown_variable_without_a_close_match_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="BROKER_ZZZZZZZZZZZZZZZZZZZZZZZZ") as info:
        Settings.from_env({"BROKER_ZZZZZZZZZZZZZZZZZZZZZZZZ": "1"})
    assert "did you mean" not in str(info.value)


def test_an_unknown_variable_is_refused_even_next_to_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"BROKER_MAX_JOB\b"):
        Settings.from_env({"BROKER_MAX_JOBS": "3", "BROKER_MAX_JOB": "3"})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("BROKER_RETRY_MS", "fast"),
        ("BROKER_RETRY_MS", "2.5"),
        ("BROKER_RETRY_MS", ""),
        ("BROKER_MAX_JOBS", "1e3"),
        ("BROKER_HEARTBEAT_SECONDS", "soon"),
        ("BROKER_HEARTBEAT_SECONDS", "nan"),
        ("BROKER_HEARTBEAT_SECONDS", "inf"),
        ("BROKER_HEARTBEAT_SECONDS", "1e1"),
        ("BROKER_MAX_JOBS", "\u0661\u0660"),  # Arabic-Indic 10: int() reads it
        ("BROKER_MAX_JOBS", "1_0"),
        ("BROKER_LEASE_SECONDS", "\uff15"),  # full-width 5
        ("BROKER_MODELS", " , ,"),
        ("BROKER_ROUTES", ""),
        ("BROKER_ROUTES", "fake"),
        ("BROKER_ROUTES", "=fake"),
        ("BROKER_ROUTES", "fake=nosuchprovider"),
        ("BROKER_ROUTES", "fake=fake,*"),
        ("BROKER_ROUTES", "fake=fake:prefix"),
        ("BROKER_ROUTES", "*=openai:exact"),
        ("BROKER_ROUTES", "*=openai:sometimes"),
    ],
)
def test_a_malformed_value_is_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("BROKER_MAX_MESSAGES", "0"),
        ("BROKER_MAX_MESSAGES", "100001"),
        ("BROKER_RETRY_MS", "-1"),
        ("BROKER_HEARTBEAT_SECONDS", "0.01"),
        ("BROKER_HEARTBEAT_SECONDS", "3601"),
        ("BROKER_BATCH_MAX_AGE_MS", "-0.5"),
        ("BROKER_PROGRESS_INTERVAL_MS", "1"),
        ("BROKER_UPSTREAM_MAX_RETRIES", "11"),
        ("BROKER_MAX_TOKENS_LIMIT", "0"),
    ],
)
def test_an_out_of_range_value_is_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: raw})


@pytest.mark.parametrize(
    ("name", "raw", "section", "attr", "expected"),
    [
        ("BROKER_MAX_MESSAGES", "1", "api", "max_messages", 1),
        ("BROKER_MAX_MESSAGES", "100000", "api", "max_messages", 100_000),
        ("BROKER_BATCH_MAX_AGE_MS", "0", "generation", "batch_max_age_ms", 0.0),
        ("BROKER_HEARTBEAT_SECONDS", "0.05", "api", "heartbeat_seconds", 0.05),
    ],
)
def test_the_bounds_themselves_are_accepted(
    name: str, raw: str, section: str, attr: str, expected: float
) -> None:
    settings = Settings.from_env({name: raw})
    assert getattr(getattr(settings, section), attr) == expected


def test_describe_lists_every_setting_once_with_help() -> None:
    rows = describe()
    names = [name for name, _, _ in rows]
    assert sorted(names) == sorted(env_name(f.name) for f in all_fields())
    assert len(names) == len(set(names))
    assert all(help_text.strip() for _, _, help_text in rows)


def test_describe_shows_defaults_that_parse_back_to_the_defaults() -> None:
    defaults = Settings()
    section_of = {f.name: name for name, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    by_env = {env_name(f.name): f.name for f in all_fields()}
    for name, shown, _ in describe():
        attr = by_env[name]
        section = section_of[attr]
        default = getattr(getattr(defaults, section), attr)
        if default is None or default == ():
            assert shown == "(unset)", name  # unset: the feature is off
            continue
        parsed = Settings.from_env({name: shown})
        assert getattr(getattr(parsed, section), attr) == default, name


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {"BROKER_RETENTION_SECONDS": "3600"},
            ("BROKER_QUEUE_TIMEOUT_SECONDS", "BROKER_RETENTION_SECONDS"),
        ),
        (
            {"BROKER_RETENTION_SECONDS": "5", "BROKER_QUEUE_TIMEOUT_SECONDS": "1"},
            ("BROKER_LEASE_SECONDS", "BROKER_SWEEP_SECONDS", "BROKER_RETENTION_SECONDS"),
        ),
        (
            {"BROKER_DEFAULT_MAX_TOKENS": "500", "BROKER_MAX_TOKENS_LIMIT": "100"},
            ("BROKER_DEFAULT_MAX_TOKENS", "BROKER_MAX_TOKENS_LIMIT"),
        ),
        (
            {"BROKER_MAX_CONNECTIONS_PER_TENANT": "5"},
            ("BROKER_MAX_CONNECTIONS_PER_TENANT", "BROKER_API_KEYS"),
        ),
    ],
)
def test_settings_that_cannot_work_together_are_refused_naming_each(
    env: dict[str, str], names: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    message = str(refused.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_a_cancel_poll_longer_than_the_lease_still_renews_within_it() -> None:
    """The combination of the report: an 8 s cancel poll against the 5 s lease. The renewal
    cadence follows the lease, so the combination works and is accepted."""
    settings = Settings.from_env({"BROKER_CANCEL_POLL_MS": "8000", "BROKER_LEASE_SECONDS": "5"})
    assert settings.generation.renew_interval_seconds <= 5 / 3
    quick = Settings.from_env({"BROKER_CANCEL_POLL_MS": "100"})
    assert quick.generation.renew_interval_seconds == 0.1
