"""Configuration: typed, frozen dataclasses read from the environment in one place.

Each component has its own section (``ApiSettings``, ``GenerationSettings``, ``LogSettings``,
listed in ``SECTIONS``); every field is set by the variable ``BROKER_<FIELD NAME IN CAPITALS>``
(the names are flat and unique across sections, so operators never need to know the sections).
``REDIS_URL`` names the store, and the openai SDK's own ``OPENAI_*`` variables the upstream
(``broker.upstream``). Unlike arq, which drops misspelled settings silently, an unknown
``BROKER_*`` variable or a value that does not parse or is out of range stops start-up with a
``ConfigError`` that names it, and so does a combination of values that cannot work
together: the settings are read once per process, checked as a whole, and passed in.

How one variable's text is parsed and range-checked is ``broker.setting_fields``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker import jobs, keys
from broker.errors import ConfigError
from broker.request import FAKE_DEFAULT_TOKENS
from broker.setting_fields import Route as Route  # re-exported: broker.routing takes it here
from broker.setting_fields import (
    one_of,
    parse_api_keys,
    parse_routes,
    parse_secrets,
    read_value,
    setting,
)
from broker.structured_logs import FORMATS, LEVELS
from broker.upstream import Upstream

ENV_PREFIX = "BROKER_"

#: A host name (RFC 1123 labels) or an IPv4 address; IPv6 addresses are checked apart.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def parse_host(raw: str) -> str:
    """An address to listen on: an IP address or a host name (as ``--host`` takes)."""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    looks_numeric = all(part.isdigit() for part in raw.split("."))  # a mistyped IPv4
    if len(raw) > 253 or looks_numeric or not _HOST_NAME.fullmatch(raw):
        raise ValueError("expected an IP address or a host name")
    return raw


@dataclass(frozen=True)
class ApiSettings:
    heartbeat_seconds: float = setting(
        15.0, min=0.05, max=3600, help="Longest silence on an event stream before a ': ping'."
    )
    retry_ms: int = setting(
        2000, min=0, max=600_000, help="The 'retry:' a client waits before it reconnects."
    )
    max_body_bytes: int = setting(
        1_048_576, min=1024, max=64 * 1_048_576, help="Largest request body (413 beyond)."
    )
    max_header_bytes: int = setting(
        16_384, min=1024, max=1_048_576, help="Largest total size of request headers (431 beyond)."
    )
    max_messages: int = setting(
        2048, min=1, max=100_000, help="Most messages one create request may carry."
    )
    api_keys: tuple[tuple[str, str], ...] = setting(
        (),
        parse=parse_api_keys,
        secret=True,
        help="API keys and their tenants, 'key1:tenant-a,key2:tenant-b'; set: every /v1/* "
        "request needs 'Authorization: Bearer <key>' and sees only its tenant's streams.",
    )
    read_token_secrets: tuple[str, ...] = setting(
        (),
        parse=parse_secrets,
        secret=True,
        help="Secrets (32+ characters, comma-separated) that sign read tokens: the first "
        "signs, all verify, so a new one is rotated in first. Needed with BROKER_API_KEYS.",
    )
    max_connections_per_tenant: int = setting(
        0,
        min=0,
        max=10_000_000,
        help="Concurrent event connections one tenant may hold over all api processes "
        "(429 beyond); 0: no limit. Needs BROKER_API_KEYS.",
    )
    connection_slot_seconds: float = setting(
        30.0,
        min=1,
        max=3600,
        help="Lifetime of a connection's slot, renewed while it is open: the slots of an "
        "api process that died are free again after this long.",
    )
    read_token_seconds: int = setting(
        86_400, min=60, max=365 * 86_400, help="How long a read token is valid."
    )
    max_tokens_limit: int = setting(
        131_072, min=1, max=10_000_000, help="Largest max_tokens a request may ask for."
    )
    models: tuple[str, ...] | None = setting(
        None, help="Comma-separated upstream models allowed; unset: those the upstream lists."
    )
    models_cache_seconds: float = setting(
        60.0, min=0, max=86_400, help="How long the upstream's GET /models answer is kept."
    )
    redis_connections: int = setting(
        8,
        min=2,
        max=10_000,
        help="Redis connections of one api process for requests and catch-up reads "
        "(its reader hub holds one more); requests wait for a free one.",
    )
    subscriber_buffer_frames: int = setting(
        256,
        min=1,
        max=1_000_000,
        help="Events buffered per client before it leaves live delivery to read the log.",
    )
    send_timeout_seconds: float = setting(
        30.0,
        min=0.1,
        max=3600,
        help="Longest one write to a client may take before the client is disconnected.",
    )
    # 0: a plain deploy (systemd, compose, nginx's passive checks) gains nothing by waiting;
    # behind an orchestrator that reads /readyz, a few probe periods (docs/configuration.md).
    drain_seconds: float = setting(
        0.0,
        min=0,
        max=3600,
        help="On SIGTERM/SIGINT, how long an api process keeps serving with /readyz 503 "
        "(draining) before it ends its event streams and stops; a second signal cuts it "
        "short. 'streambroker api --drain-seconds' overrides it.",
    )


@dataclass(frozen=True)
class GenerationSettings:
    routes: tuple[Route, ...] = setting(
        (Route("fake", "fake"), Route("*", "openai")),
        parse=parse_routes,
        help="Model-to-provider routes, first match wins: 'fake=fake,*=openai'. An entry "
        "may say how its provider continues a generation whose worker was lost or stopped: "
        "'PATTERN=PROVIDER:MODE', MODE one of exact (fake; its default), off (openai's "
        "default), continue_final_message, prefix, prefill, prompt.",
    )
    default_max_tokens: int = setting(
        FAKE_DEFAULT_TOKENS,
        min=1,
        max=10_000_000,
        help="Tokens the fake model makes when max_tokens is unset.",
    )
    # 50 ms: half the events per client of a 25 ms window at high token rates, which keeps
    # delivery latency low under fan-out (infra/bench/results/fanout.md), while 20 updates/s
    # still read smoothly; the first token after a quiet period is never held back.
    batch_max_age_ms: float = setting(
        50.0, min=0, max=10_000, help="Longest a token waits in a batch before it is appended."
    )
    batch_max_tokens: int = setting(
        64, min=1, max=100_000, help="Most tokens in one appended batch."
    )
    progress_interval_ms: float = setting(
        500.0, min=10, max=600_000, help="Cadence of progress events."
    )
    cancel_poll_ms: float = setting(
        200.0,
        min=10,
        max=10_000,
        help="How often a running job checks for a cancel request (at least every third of "
        "the lease, when it renews its lease).",
    )
    retention_seconds: int = setting(
        keys.DEFAULT_RETENTION_SECONDS,
        min=1,
        max=10 * 365 * 86_400,
        help="How long a generation is kept after its last write.",
    )
    lease_seconds: float = setting(
        5.0,
        min=1,
        max=3600,
        help="Lease a worker holds on a generation and renews; a generation whose worker "
        "stops renewing is continued by another worker (or, when its route does not "
        "continue, ended with worker_lost) about this long after.",
    )
    max_continuations: int = setting(
        2,
        min=0,
        max=100,
        help="How many times one generation may be continued after its worker was lost; past "
        "that (and with 0) it ends with worker_lost. Graceful stops (SIGTERM) do not count.",
    )
    metrics_port: int = setting(
        0,
        min=0,
        max=65_535,
        help="Port a worker process serves /healthz, /readyz and Prometheus /metrics on (0: "
        "off; the api serves its own). 'streambroker worker --port' overrides it.",
    )
    metrics_host: str = setting(
        "0.0.0.0",
        parse=parse_host,
        help="Address a worker's health and metrics endpoint listens on (BROKER_METRICS_PORT).",
    )
    queue_timeout_seconds: int = setting(
        jobs.DEFAULT_QUEUE_TIMEOUT_SECONDS,
        min=1,
        max=365 * 86_400,
        help="Longest a generation may wait for a worker: its job is dropped then, and the "
        "generation ends with error queue_timeout.",
    )
    sweep_seconds: float = setting(
        1.0,
        min=0.05,
        max=600,
        help="How often each api and worker process looks for lapsed leases.",
    )
    job_poll_seconds: float = setting(
        0.02, min=0.001, max=5, help="How often an idle worker polls the arq queue."
    )
    job_timeout_seconds: int = setting(
        3600, min=1, max=7 * 86_400, help="Longest a single generation job may run."
    )
    max_jobs: int = setting(
        100, min=1, max=100_000, help="Generations one worker process runs at once."
    )
    upstream_timeout_seconds: float = setting(
        60.0, min=0.1, max=3600, help="Timeout of each request to the OpenAI-compatible upstream."
    )
    upstream_max_retries: int = setting(
        2, min=0, max=10, help="SDK retries of a failed upstream request before any token."
    )
    # Off by default: it adds a replica round trip to every batch (measured in
    # infra/bench/results/append_wait.md) and only narrows, never closes, the window a
    # failover can lose; that loss is made explicit either way (log_lost). The timeout is
    # about one batch window: a replica that stopped answering slows a generation to about
    # one batch per timeout, which then costs little more than the batching already does.
    append_wait_replicas: int = setting(
        0,
        min=0,
        max=100,
        help="Replicas that must acknowledge each append (Redis WAIT) before the writer "
        "goes on, so a failover loses fewer events readers already have; 0: off.",
    )
    append_wait_timeout_ms: int = setting(
        50,
        min=1,
        max=60_000,
        help="Longest a writer waits for BROKER_APPEND_WAIT_REPLICAS after an append; then "
        "it goes on regardless (counted in streambroker_append_replica_shortfalls_total).",
    )

    @property
    def renew_interval_seconds(self) -> float:
        """How often a running job renews its lease (and so also polls for a cancel): a third
        of the lease, so two renewals may fail before the lease lapses; more often when the
        cancel poll asks for it."""
        return min(self.lease_seconds / 3, self.cancel_poll_ms / 1000)


@dataclass(frozen=True)
class LogSettings:
    log_format: str = setting(
        "text",
        parse=one_of(FORMATS),
        help="'json': one JSON object per line on stderr (requests, generation steps, "
        "everything else); 'text': the same lines for people.",
    )
    log_level: str = setting(
        "info",
        parse=one_of(LEVELS),
        help="Least severe level logged: debug, info, warning or error.",
    )


def parse_archive_url(raw: str) -> str:
    """A PostgreSQL connection URL (``postgresql://user:password@host:port/database``)."""
    parts = urllib.parse.urlsplit(raw.strip())
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql://user@host:port/database URL")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"bad port in the URL: {exc}") from None
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError("the URL names no host: postgresql://user@host:port/database")
    if not parts.path.strip("/"):
        raise ValueError("the URL names no database: postgresql://user@host:port/database")
    return raw.strip()


@dataclass(frozen=True)
class ArchiveSettings:
    archive_url: str | None = setting(
        None,
        parse=parse_archive_url,
        secret=True,
        help="PostgreSQL to archive finished generations in, postgresql://user@host:port/db; "
        "set on every process. Unset: generations stay in Redis until their retention.",
    )
    archive_after_seconds: int = setting(
        300,
        min=0,
        max=365 * 86_400,
        help="How long an archived generation's keys stay in Redis after the copy was "
        "committed (readers resuming right after the end hit Redis).",
    )
    archive_retention_seconds: int = setting(
        0,
        min=0,
        max=100 * 365 * 86_400,
        help="How long the archive keeps a generation after it was archived; 0: for good.",
    )


@dataclass(frozen=True)
class Settings:
    """Everything a process is configured with, checked as a whole when it is built."""

    redis_url: str | None = None
    api: ApiSettings = field(default_factory=ApiSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    log: LogSettings = field(default_factory=LogSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    #: The OpenAI-compatible server, from the SDK's own ``OPENAI_*`` variables: the api's
    #: model catalog asks it for its models, the workers' provider sends it the generations.
    upstream: Upstream = field(default_factory=Upstream)

    def __post_init__(self) -> None:
        problems = _contradictions(self)
        if problems:
            raise ConfigError("; ".join(problems))

    def require_redis_url(self, reason: str) -> str:
        """``REDIS_URL``, for a process that cannot run without it; ``reason`` says why.

        Not a check of ``from_env``: ``streambroker dev`` brings its own store when the
        variable is unset, so each process that needs one refuses to start here instead.
        """
        if not self.redis_url:
            raise ConfigError(f"REDIS_URL is not set: {reason}")
        return self.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read ``REDIS_URL``, the ``OPENAI_*`` variables and every ``BROKER_*`` variable;
        reject the unknown ``BROKER_*`` ones."""
        known = {env_name(f.name): (section, f) for section, f in _setting_fields()}
        unknown = sorted(
            name for name in environ if name.startswith(ENV_PREFIX) and name not in known
        )
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting {name}{hint}; known: {', '.join(sorted(known))}")
        values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for name, (section, f) in known.items():
            if name in environ:
                kind = typing.get_type_hints(SECTIONS[section])[f.name]
                values[section][f.name] = read_value(name, f, kind, environ[name])
        return cls(
            redis_url=environ.get("REDIS_URL") or None,
            upstream=Upstream.from_env(environ),
            **{section: kind(**values[section]) for section, kind in SECTIONS.items()},
        )


def _contradictions(settings: Settings) -> list[str]:
    """Combinations of settings that each parse but cannot work together: one line each,
    naming every setting involved. Every process checks them at start-up."""
    api, gen = settings.api, settings.generation
    problems = []
    if api.max_connections_per_tenant and not api.api_keys:
        problems.append(
            "BROKER_MAX_CONNECTIONS_PER_TENANT needs BROKER_API_KEYS: without keys there are "
            "no tenants to count"
        )
    if api.api_keys and not api.read_token_secrets:
        problems.append(
            "BROKER_API_KEYS is set but BROKER_READ_TOKEN_SECRETS is not: read tokens need a "
            "secret shared by every api process"
        )
    if gen.queue_timeout_seconds >= gen.retention_seconds:
        problems.append(
            f"BROKER_QUEUE_TIMEOUT_SECONDS={gen.queue_timeout_seconds} must be less than "
            f"BROKER_RETENTION_SECONDS={gen.retention_seconds}: a generation still queued "
            "would be deleted before it is ended"
        )
    if gen.lease_seconds + gen.sweep_seconds >= gen.retention_seconds:
        problems.append(
            f"BROKER_LEASE_SECONDS={gen.lease_seconds:g} plus BROKER_SWEEP_SECONDS="
            f"{gen.sweep_seconds:g} must be less than BROKER_RETENTION_SECONDS="
            f"{gen.retention_seconds}: a generation whose worker died would be deleted "
            "before a sweeper ends it"
        )
    archive = settings.archive
    if archive.archive_url and archive.archive_after_seconds >= gen.retention_seconds:
        problems.append(
            f"BROKER_ARCHIVE_AFTER_SECONDS={archive.archive_after_seconds} must be less than "
            f"BROKER_RETENTION_SECONDS={gen.retention_seconds}: Redis would let a generation "
            "go before its archived copy is due to replace it"
        )
    if (
        archive.archive_url
        and 0 < archive.archive_retention_seconds <= archive.archive_after_seconds
    ):
        problems.append(
            f"BROKER_ARCHIVE_RETENTION_SECONDS={archive.archive_retention_seconds} must be more "
            f"than BROKER_ARCHIVE_AFTER_SECONDS={archive.archive_after_seconds}: the archive "
            "would delete generations before Redis lets them go"
        )
    if gen.default_max_tokens > api.max_tokens_limit:
        problems.append(
            f"BROKER_DEFAULT_MAX_TOKENS={gen.default_max_tokens} is above "
            f"BROKER_MAX_TOKENS_LIMIT={api.max_tokens_limit}: a request without max_tokens "
            "would get more than any request may ask for"
        )
    return problems


#: The sections of ``Settings``: attribute name → dataclass.
SECTIONS: dict[str, type[Any]] = {
    "api": ApiSettings,
    "generation": GenerationSettings,
    "log": LogSettings,
    "archive": ArchiveSettings,
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _setting_fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    return [(section, f) for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)]


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting, for ``streambroker --help``."""
    rows = []
    for _, f in _setting_fields():
        default = f.default
        if isinstance(default, tuple) and default and isinstance(default[0], Route):
            shown = ",".join(_route_text(route) for route in default)
        elif isinstance(default, tuple) and default and isinstance(default[0], tuple):
            shown = ",".join(f"{p}={v}" for p, v in default)
        elif default is None or default == ():
            shown = "(unset)"
        else:
            shown = str(default)
        rows.append((env_name(f.name), shown, str(f.metadata["help"])))
    return rows


def _route_text(route: Route) -> str:
    """A route as ``BROKER_ROUTES`` spells it."""
    mode = f":{route.continuation}" if route.continuation is not None else ""
    return f"{route.pattern}={route.provider}{mode}"
