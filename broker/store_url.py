"""``REDIS_URL``, read once: which Redis every process of the broker shares.

Two kinds of address:

- ``redis://``, ``rediss://``, ``unix://``: one Redis server, written as redis-py reads it.
- ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]``: whichever node
  the Sentinels at those addresses name as the master of ``service`` (port 26379 when a host
  has none; database 0 when none is given). User and password are the data nodes'; the
  Sentinels are asked without. Percent-encode ``@``, ``/``, ``,`` and ``:`` in a password.

A malformed address is a ``ConfigError`` naming what is wrong (no service, a bad port, no
host, an unknown scheme), so every process refuses to start with one clear line instead of
failing on its first connection. Messages never show the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from redis.asyncio.connection import parse_url

from broker.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]"


@dataclass(frozen=True)
class SentinelService:
    """Where the Sentinels are, which of their services is the broker's store, and how to
    log in to its nodes."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class StoreAddress:
    """``REDIS_URL`` as given, and, for a ``redis+sentinel://`` one, what it names."""

    url: str
    sentinel: SentinelService | None = None

    @property
    def follows_failover(self) -> bool:
        """Whether the master may move: connections are to be re-aimed through Sentinel."""
        return self.sentinel is not None

    def describe(self) -> str:
        """The address for a log line or an error message: no password."""
        if self.sentinel is None:
            return redact(self.url)
        sentinels = ",".join(f"{_host_text(h)}:{p}" for h, p in self.sentinel.sentinels)
        return (
            f"the master of Sentinel service {self.sentinel.service!r} "
            f"(sentinels {sentinels}, db {self.sentinel.db})"
        )


def redact(url: str) -> str:
    """``url`` with everything between ``://`` and its last ``@`` (user and password)
    replaced by ``***``: a password may itself hold ``@``, ``/`` or ``:``. A value that is
    not a URL at all is not shown (it may be a password pasted in the wrong place)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "***"
    _, at, location = rest.rpartition("@")
    return f"{scheme}://***@{location}" if at else url


def parse_store_url(url: str) -> StoreAddress:
    """Check ``REDIS_URL`` and say what it names; ``ConfigError`` if it names nothing."""
    if any(c.isspace() for c in url):
        # A trailing newline from a secrets file would otherwise name a service "svc\n".
        raise ConfigError(f"REDIS_URL={redact(url.strip())!r} holds whitespace")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ConfigError(
            f"REDIS_URL={redact(url)!r} is not a URL: expected redis://host:port/db, "
            f"rediss://..., unix://... or {SENTINEL_FORM}"
        )
    if scheme == SENTINEL_SCHEME:
        return StoreAddress(url, _sentinel_service(url, rest))
    if scheme in PLAIN_SCHEMES:
        try:
            parse_url(url)
        except ValueError as exc:
            # Not redis-py's message: it quotes parts of the URL, a password's included.
            raise ConfigError(
                f"REDIS_URL={redact(url)!r} is malformed: expected "
                "redis://[[user]:password@]host[:port][/db] (percent-encode a password's "
                "special characters)"
            ) from exc
        return StoreAddress(url)
    raise ConfigError(
        f"REDIS_URL={redact(url)!r} has the unknown scheme {scheme!r}: use redis://, "
        "rediss://, unix:// or redis+sentinel://"
    )


def _sentinel_service(url: str, rest: str) -> SentinelService:
    if "?" in rest or "#" in rest:
        raise _malformed(url, "query parameters and fragments are not supported")
    # The credentials end at the last "@": a password may hold "/" and "@" itself.
    userinfo, at, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    username, password = _credentials(userinfo) if at else (None, None)
    if not hosts:
        raise _malformed(url, "no sentinel host:port")
    sentinels = tuple(_sentinel_address(part, url) for part in hosts.split(","))
    service, db = _service_and_db(path, url)
    return SentinelService(sentinels, service, db, username, password)


def _malformed(url: str, problem: str) -> ConfigError:
    return ConfigError(f"REDIS_URL={redact(url)!r}: {problem}; expected {SENTINEL_FORM}")


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon and password else None)


def _sentinel_address(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise _malformed(url, f"sentinel address {text!r} is malformed")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _malformed(url, f"sentinel address {text!r} has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not _decimal(port_text) or not 0 < int(port_text) < 65536:
        raise _malformed(url, f"sentinel address {text!r} has a bad port (1-65535)")
    return host, int(port_text)


def _service_and_db(path: str, url: str) -> tuple[str, int]:
    service, _, db_text = path.partition("/")
    service = unquote(service)
    if not service:
        raise _malformed(url, "no service name (the name Sentinel monitors the master under)")
    db_text = db_text.removesuffix("/")
    if not db_text:
        return service, 0
    if not _decimal(db_text) or int(db_text) >= 2**31:
        raise _malformed(url, f"the database {db_text!r} is not a number")
    return service, int(db_text)


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes other scripts' digits ("٣")."""
    return text.isascii() and text.isdigit()
