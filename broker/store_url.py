"""``REDIS_URL``, read once: which Redis every process of the broker shares.

Two kinds of address:

- ``redis://``, ``rediss://``, ``unix://``: one Redis server, written as redis-py reads it.
- ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]``: whichever node
  the Sentinels at those addresses name as the master of ``service`` (port 26379 when a host
  has none; database 0 when none is given). User and password are the data nodes'; the
  Sentinels are asked without. Percent-encode ``@``, ``/``, ``,`` and ``:`` in a password.
- ``redis+cluster://[[user]:password@]host:port[,host:port…]``: a Redis Cluster, reached
  through any of those seed nodes (port 6379 when a host has none); the rest of the cluster
  is learnt from them. A cluster has no databases, so there is no path.

A malformed address is a ``ConfigError`` naming what is wrong (no service, a bad port, no
host, an unknown scheme), so every process refuses to start with one clear line instead of
failing on its first connection. Messages never show the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio.connection import parse_url

from broker.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_NODE_PORT = 6379
SENTINEL_FORM = "redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]"
CLUSTER_FORM = "redis+cluster://[[user]:password@]host:port[,host:port...]"


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
class ClusterSeeds:
    """Nodes of a Redis Cluster to learn the rest of it from, and how to log in to its nodes."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class StoreAddress:
    """``REDIS_URL`` as given, and, for a ``redis+sentinel://`` or ``redis+cluster://`` one,
    what it names."""

    url: str
    sentinel: SentinelService | None = None
    cluster: ClusterSeeds | None = None

    @property
    def follows_failover(self) -> bool:
        """Whether a master may move: connections are to be re-aimed (through Sentinel, or
        by the cluster's redirections)."""
        return self.sentinel is not None or self.cluster is not None

    def describe(self) -> str:
        """The address for a log line or an error message: no password."""
        if self.cluster is not None:
            seeds = ",".join(f"{_host_text(h)}:{p}" for h, p in self.cluster.nodes)
            return f"the Redis Cluster of seed nodes {seeds}"
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
            f"rediss://..., unix://..., {SENTINEL_FORM} or {CLUSTER_FORM}"
        )
    if scheme == SENTINEL_SCHEME:
        return StoreAddress(url, _sentinel_service(url, rest))
    if scheme == CLUSTER_SCHEME:
        return StoreAddress(url, cluster=_cluster_seeds(url, rest))
    if scheme in PLAIN_SCHEMES:
        _check_plain(url, scheme)
        return StoreAddress(url)
    raise ConfigError(
        f"REDIS_URL={redact(url)!r} has the unknown scheme {scheme!r}: use redis://, "
        "rediss://, unix://, redis+sentinel:// or redis+cluster://"
    )


#: Options a plain URL may carry in its query: how to connect, never what replies look like.
#: redis-py reads more (``decode_responses``, ``protocol``…), and each of those would change
#: the replies the broker parses: every request would fail while ``/readyz`` says ready.
PLAIN_QUERY_OPTIONS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)
PLAIN_FORM = "redis://[[user]:password@]host[:port][/db]"


def _check_plain(url: str, scheme: str) -> None:
    """What redis-py would read, checked where redis-py is lenient: it takes a database path
    that is not a number for database 0, no host for localhost, and any option."""

    def malformed(problem: str) -> ConfigError:
        return ConfigError(
            f"REDIS_URL={redact(url)!r}: {problem}; expected {PLAIN_FORM}, rediss://... or "
            "unix:///path/to/socket (percent-encode a password's special characters)"
        )

    try:
        options = parse_url(url)
        parts = urlsplit(url)
    except ValueError as exc:
        # Not redis-py's message: it quotes parts of the URL, a password's included.
        raise malformed("it is malformed") from exc
    unknown = sorted(set(parse_qs(parts.query, keep_blank_values=True)) - PLAIN_QUERY_OPTIONS)
    if unknown:
        raise malformed(f"the option(s) {', '.join(unknown)} are not supported here")
    if scheme == "unix":
        if not parts.path:
            raise malformed("no socket path")
        return
    if not parts.hostname:
        raise malformed("no host")
    database = unquote(parts.path.removeprefix("/").removesuffix("/"))
    if database and (not _decimal(database) or int(database) >= 2**31):
        raise malformed(f"the database {database!r} is not a number")
    if "db" in options and not isinstance(options["db"], int):
        raise malformed("the db option is not a number")


def _sentinel_service(url: str, rest: str) -> SentinelService:
    hosts, path, username, password = _split(url, rest, SENTINEL_FORM)
    if not hosts:
        raise _malformed(url, "no sentinel host:port", SENTINEL_FORM)
    sentinels = tuple(
        _address(part, url, DEFAULT_SENTINEL_PORT, SENTINEL_FORM) for part in hosts.split(",")
    )
    service, db = _service_and_db(path, url)
    return SentinelService(sentinels, service, db, username, password)


def _cluster_seeds(url: str, rest: str) -> ClusterSeeds:
    hosts, path, username, password = _split(url, rest, CLUSTER_FORM)
    if not hosts:
        raise _malformed(url, "no seed host:port", CLUSTER_FORM)
    if path:
        # A database number would be silently ignored: a cluster has only database 0.
        raise _malformed(url, "a Redis Cluster has no databases, so no path", CLUSTER_FORM)
    nodes = tuple(_address(part, url, DEFAULT_NODE_PORT, CLUSTER_FORM) for part in hosts.split(","))
    return ClusterSeeds(nodes, username, password)


def _split(url: str, rest: str, form: str) -> tuple[str, str, str | None, str | None]:
    """``(hosts, path, username, password)`` of what follows ``scheme://``."""
    if "?" in rest or "#" in rest:
        raise _malformed(url, "query parameters and fragments are not supported", form)
    # The credentials end at the last "@": a password may hold "/" and "@" itself.
    userinfo, at, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    username, password = _credentials(userinfo) if at else (None, None)
    return hosts, path, username, password


def _malformed(url: str, problem: str, form: str) -> ConfigError:
    return ConfigError(f"REDIS_URL={redact(url)!r}: {problem}; expected {form}")


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon and password else None)


def _address(text: str, url: str, default_port: int, form: str) -> tuple[str, int]:
    what = "sentinel" if form == SENTINEL_FORM else "seed"
    if text.startswith("["):  # [IPv6]:port
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise _malformed(url, f"{what} address {text!r} is malformed", form)
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _malformed(url, f"{what} address {text!r} has no host", form)
    if not port_text:
        return host, default_port
    if not _decimal(port_text) or not 0 < int(port_text) < 65536:
        raise _malformed(url, f"{what} address {text!r} has a bad port (1-65535)", form)
    return host, int(port_text)


def _service_and_db(path: str, url: str) -> tuple[str, int]:
    service, _, db_text = path.partition("/")
    service = unquote(service)
    if not service.isprintable():
        raise _malformed(url, "the service name holds control characters", SENTINEL_FORM)
    if not service:
        raise _malformed(
            url, "no service name (the name Sentinel monitors the master under)", SENTINEL_FORM
        )
    db_text = db_text.removesuffix("/")
    if not db_text:
        return service, 0
    if not _decimal(db_text) or int(db_text) >= 2**31:
        raise _malformed(url, f"the database {db_text!r} is not a number", SENTINEL_FORM)
    return service, int(db_text)


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes other scripts' digits ("٣")."""
    return text.isascii() and text.isdigit()
