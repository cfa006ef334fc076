"""``REDIS_URL`` and the connections built from it (``broker.store_url``,
``broker.store_connections``), and what the broker does with a store that takes no writes.

- Parsing: every supported form, and a one-line ``ConfigError`` (without the password) for
  each malformed one; the CLI refuses to start on one.
- Pools: the api's pool is bounded (blocking) for a plain URL and for Sentinel alike; arq's
  settings name the same store.
- A plain ``redis://`` URL naming a replica (what a demoted master is after a failover):
  ``/readyz`` is 503 and create, cancel and watch answer 503 ``store_unavailable``, never
  500; the worker's queue poll rides it out. A master that lost its replicas
  (``min-replicas-to-write``, ``NOREPLICAS``) is unavailable in the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions as redis_errors
from arq.connections import RedisSettings
from redis.asyncio import BlockingConnectionPool, ConnectionPool

from broker.errors import ConfigError, StoreUnavailable
from broker.log_errors import is_no_replicas, means_store_unavailable, store_errors
from broker.settings import Settings
from broker.store_connections import (
    BlockingSentinelMasterPool,
    SentinelMasterConnection,
    SentinelMasterPool,
    arq_redis_settings,
    bounded_pool,
    pool,
)
from broker.store_url import (
    ClusterSeeds,
    SentinelService,
    StoreAddress,
    parse_store_url,
    redact,
)
from tests.support.generations import create_request, create_stream
from tests.support.processes import Launcher, run_cli
from tests.support.redis_server import RedisServer, running_server
from tests.support.replication import master_and_replica
from tests.support.waiting import eventually

# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,10.0.0.3/mymaster",
            SentinelService(
                (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)), "mymaster"
            ),
        ),
        (
            "redis+sentinel://:s3cret@h1:1,h2:2/streambroker/3",
            SentinelService((("h1", 1), ("h2", 2)), "streambroker", 3, None, "s3cret"),
        ),
        (
            "redis+sentinel://broker:p%40ss%2Fw@[::1]:26379/svc/0/",
            SentinelService((("::1", 26379),), "svc", 0, "broker", "p@ss/w"),
        ),
        ("REDIS+SENTINEL://h/svc", SentinelService((("h", 26379),), "svc")),
    ],
)
def test_a_sentinel_url_names_its_sentinels_service_db_and_login(
    url: str, expected: SentinelService
) -> None:
    address = parse_store_url(url)
    assert address.sentinel == expected
    assert address.follows_failover
    assert "s3cret" not in address.describe()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@redis:6380",
        "rediss://user:pw@redis.example:6380/2",
        "unix:///run/redis.sock?db=1",
        "rediss://h:6380/0?ssl_cert_reqs=none&socket_timeout=5",
        "redis://h:6379/",
    ],
)
def test_plain_urls_are_kept_as_redis_py_reads_them(url: str) -> None:
    address = parse_store_url(url)
    assert address == StoreAddress(url)
    assert not address.follows_failover


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+cluster://h1:7000,h2:7001", ClusterSeeds((("h1", 7000), ("h2", 7001)))),
        ("redis+cluster://h1", ClusterSeeds((("h1", 6379),))),
        (
            "redis+cluster://broker:s3cret@[::1]:7000,h2:7001",
            ClusterSeeds((("::1", 7000), ("h2", 7001)), "broker", "s3cret"),
        ),
    ],
)
def test_a_cluster_url_names_its_seed_nodes_and_login(url: str, expected: ClusterSeeds) -> None:
    address = parse_store_url(url)
    assert address.cluster == expected
    assert address.sentinel is None
    assert address.follows_failover
    assert "s3cret" not in address.describe()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "no service name"),
        ("redis+sentinel://h1:26379/", "no service name"),
        ("redis+sentinel://:pw@h1:port/svc", "bad port"),
        ("redis+sentinel://h1:0/svc", "bad port"),
        ("redis+sentinel://h1:65536/svc", "bad port"),
        ("redis+sentinel://h1:-1/svc", "bad port"),
        ("redis+sentinel:///svc", "no sentinel host"),
        ("redis+sentinel://:pw@/svc", "no sentinel host"),
        ("redis+sentinel://h1,,h2/svc", "has no host"),
        ("redis+sentinel://[::1/svc", "malformed"),
        ("redis+sentinel://h1/svc/zero", "not a number"),
        ("redis+sentinel://h1/svc/0/more", "not a number"),
        ("redis+sentinel://h1/svc?db=1", "query parameters"),
        ("sentinel://h1:26379/svc", "unknown scheme 'sentinel'"),
        ("http://h1:6379", "unknown scheme 'http'"),
        ("rediss+sentinel://h1/svc", "unknown scheme"),
        ("localhost:6379", "not a URL"),
        ("redis://:pw@h1:port/0", "malformed"),
        # redis-py would take these for database 0, or localhost, without a word:
        ("redis://:pw@127.0.0.1:6379/notanumber", "not a number"),
        ("redis://:pw@h/1x", "not a number"),
        ("redis://", "no host"),
        ("unix://", "no socket path"),
        ("unix:///run/redis.sock?db=x", "malformed"),
        # ...and these would change the replies the broker parses:
        ("redis://:pw@h:1/0?decode_responses=true", "decode_responses are not supported"),
        ("redis://:pw@h:1?protocol=3", "protocol are not supported"),
        ("redis+sentinel://h1/svc%00x", "control characters"),
        ("redis+cluster://", "no seed host"),
        ("redis+cluster://:pw@h1:7000/0", "no databases"),
        ("redis+cluster://h1:7000,h2:x", "bad port"),
        ("redis+cluster://h1:7000?x=1", "query parameters"),
    ],
)
def test_a_malformed_url_is_a_config_error_that_says_why(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_store_url(url)
    message = str(raised.value)
    assert problem in message
    assert "REDIS_URL" in message
    assert "pw@" not in message  # the password is never shown


def test_redaction_hides_the_credentials_and_keeps_the_address() -> None:
    assert redact("redis://user:pw@h:1/0") == "redis://***@h:1/0"
    assert redact("redis+sentinel://:pw@h1:1,h2:2/s") == "redis+sentinel://***@h1:1,h2:2/s"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:ss@SECRET@127.0.0.1:1/0",  # a raw "@" in the password
        "redis://:pa/ssSECRET@h:1/0",  # a raw "/"
        "redis://:pw#SECRET@host/0",  # a raw "#"
        "redis+sentinel://:pa/ssSECRET@h:1/svc",
        "redis+sentinel://:pa:SECRET@h:x/svc",
        "SECRET",  # not a URL: perhaps the password itself, pasted in the wrong place
        "foo://u:SECRET@h",
        "redis://:SECRET@h:1/0\n",
    ],
)
def test_no_message_about_a_url_shows_any_of_its_password(url: str) -> None:
    """Generated passwords hold "@", "/", ":" and "#"; neither an error nor what the
    processes print of a valid URL may show any part of one."""
    try:
        shown = parse_store_url(url).describe()
    except ConfigError as exc:
        shown = str(exc)
    assert "SECRET" not in shown


@pytest.mark.parametrize("command", ["api", "worker", "dev"])
def test_the_cli_refuses_a_malformed_url_in_one_line(command: str) -> None:
    ran = run_cli(command, env={"REDIS_URL": "redis+sentinel://:pw@h1:x/svc"}, text=True)
    assert ran.returncode == 2, ran
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert "configuration error" in lines[0]
    assert "bad port" in lines[0]
    assert "pw@" not in ran.stderr


# -- pools and arq --------------------------------------------------------------------------

SENTINEL_URL = "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/svc/4"


def test_the_api_pool_is_bounded_and_blocking_for_both_kinds() -> None:
    plain = bounded_pool(
        parse_store_url("redis://127.0.0.1:1/0"),
        max_connections=3,
        wait_seconds=7,
        client_name="t",
    )
    sentinel = bounded_pool(
        parse_store_url(SENTINEL_URL), max_connections=3, wait_seconds=7, client_name="t"
    )
    for built in (plain, sentinel):
        assert isinstance(built, BlockingConnectionPool)
        assert built.max_connections == 3
        assert built.timeout == 7
        assert built.connection_kwargs["client_name"] == "t"
    assert isinstance(sentinel, BlockingSentinelMasterPool)
    assert sentinel.service_name == "svc"
    assert sentinel.is_master
    assert sentinel.connection_class is SentinelMasterConnection
    assert sentinel.connection_kwargs["db"] == 4
    assert sentinel.connection_kwargs["password"] == "pw"
    hosts = [
        (s.connection_pool.connection_kwargs["port"]) for s in sentinel.sentinel_manager.sentinels
    ]
    assert hosts == [1, 2]


def test_the_hub_and_worker_pools_are_plain_pools_aimed_at_the_master() -> None:
    one = pool(parse_store_url(SENTINEL_URL), client_name="hub", max_connections=1)
    assert isinstance(one, SentinelMasterPool)
    assert not isinstance(one, BlockingConnectionPool)
    assert one.max_connections == 1
    plain = pool(parse_store_url("redis://127.0.0.1:1/2"), client_name="w")
    assert type(plain) is ConnectionPool
    assert plain.connection_kwargs["db"] == 2


def test_arq_settings_name_the_same_store() -> None:
    sentinel = arq_redis_settings(parse_store_url(SENTINEL_URL))
    assert sentinel.sentinel
    assert sentinel.host == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    assert sentinel.sentinel_master == "svc"
    assert (sentinel.database, sentinel.password) == (4, "pw")
    plain = arq_redis_settings(parse_store_url("redis://:pw@h:6380/3"))
    assert plain == RedisSettings.from_dsn("redis://:pw@h:6380/3")


def test_refusals_that_pass_count_as_the_store_being_away() -> None:
    no_replicas = redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write.")
    in_pipeline = redis_errors.ResponseError(
        "Command # 1 (HSET k f v) of pipeline caused error: NOREPLICAS Not enough good "
        "replicas to write."
    )
    in_transaction = redis_errors.ResponseError(
        "Command # 1 (HSET k f v) of pipeline caused error: ('NOREPLICAS Not enough good "
        "replicas to write.',)"
    )
    for passing in (
        no_replicas,
        in_pipeline,
        in_transaction,
        redis_errors.ReadOnlyError("You can't write against a read only replica."),
        redis_errors.ConnectionError("gone"),
        redis_errors.TimeoutError("slow"),
    ):
        assert means_store_unavailable(passing), passing
        with pytest.raises(StoreUnavailable), store_errors():
            raise passing
    assert is_no_replicas(in_pipeline)
    other = redis_errors.ResponseError("WRONGTYPE Operation against a key")
    assert not is_no_replicas(
        redis_errors.ResponseError("Command # 1 (SET NOREPLICAS x) of pipeline caused error: ERR")
    )
    assert not means_store_unavailable(other)
    with pytest.raises(redis_errors.ResponseError), store_errors():
        raise other


# -- a store that takes no writes ---------------------------------------------------------


@pytest.fixture
def replicated() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and a real replica of it, in sync (``tests.support.replication``)."""
    with master_and_replica() as pair:
        yield pair


@pytest.mark.redis
def test_pointed_at_a_replica_the_api_is_not_ready_and_answers_503(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = replicated
    with Launcher(master.url) as launch:
        on_master = launch.app()
        assert on_master.get("/readyz").json() == {"status": "ready"}
        stream_id = create_stream(on_master, max_tokens=5)["id"]
        eventually(lambda: _replicated(replica, stream_id), what="the stream on the replica")

        on_replica = launch.app(redis_url=replica.url)
        ready = on_replica.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["retry-after"] == "1"
        error = ready.json()["error"]
        assert error["code"] == "store_unavailable"
        assert "replica" in error["message"]

        attempts = {
            "create": on_replica.post("/v1/streams", json=create_request()),
            "cancel": on_replica.post(f"/v1/streams/{stream_id}/cancel"),
            "watch": on_replica.get(f"/v1/streams/{stream_id}/events"),
        }
        for name, answer in attempts.items():
            assert answer.status_code == 503, (name, answer.text)
            assert answer.json()["error"]["code"] == "store_unavailable", name
            assert answer.headers["retry-after"] == "1", name


def _replicated(replica: RedisServer, stream_id: str) -> bool:
    with redis.Redis(port=replica.port) as client:
        return bool(client.exists(f"sb:{{{stream_id}}}:meta"))


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_worker_pointed_at_a_replica_keeps_polling(
    replicated: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """arq writes on its first poll (its health key): a replica refuses, and the poll
    backs off instead of ending the worker."""
    from workers.worker import create_worker

    _, replica = replicated
    worker = create_worker(Settings(redis_url=replica.url), handle_signals=False)
    try:
        await worker._poll_iteration()
    finally:
        await worker.pool.aclose(close_connection_pool=True)
    assert "read only replica" in caplog.text


@pytest.fixture
def master_without_replicas(tmp_path: Path) -> Iterator[RedisServer]:
    """A master that needs a replica to take writes, and has none: ``NOREPLICAS``."""
    config = tmp_path / "lonely.conf"
    config.write_text("min-replicas-to-write 1\nmin-replicas-max-lag 2\nsave ''\n")
    with running_server(config=config) as server:
        yield server


@pytest.mark.redis
def test_a_master_without_its_replicas_answers_503_not_500(
    master_without_replicas: RedisServer,
) -> None:
    with Launcher(master_without_replicas.url) as launch:
        app = launch.app()
        answer = app.post("/v1/streams", json=create_request())
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "store_unavailable"


@pytest.mark.redis
def test_a_master_refusing_writes_is_not_ready_and_no_line_repeats_the_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``min-replicas-to-write 1`` and no replica: ``ROLE`` says master, yet every write is
    refused (``NOREPLICAS``). Not ready; a create is 503; and what is logged of the failure
    is Redis's reply, not the command that carried the user's prompt."""
    config = tmp_path / "cut-off-master.conf"
    config.write_text("min-replicas-to-write 1\nsave ''\n")
    prompt = "words only their author should read"
    with running_server(config=config) as master, Launcher(master.url) as launch:
        app = launch.app()
        ready = app.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "min-replicas-to-write" in ready.json()["error"]["message"]
        with caplog.at_level(logging.INFO):
            answer = app.post(
                "/v1/streams",
                json=create_request(messages=[{"role": "user", "content": prompt}]),
            )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "store_unavailable"
    assert "NOREPLICAS" in caplog.text
    assert prompt not in caplog.text
    assert prompt not in answer.text
