"""The operator console on a generation Redis no longer holds (archived to PostgreSQL, its
keys deleted): the table lists it among the others, and its view shows the exact text, its
status and every event, as for one in Redis. Real headless Chromium, real api and worker
processes, a scratch database of the shared PostgreSQL."""

from __future__ import annotations

import re

import pytest
import redis
from playwright.sync_api import expect

from broker import keys
from tests.support.browser import OpenPage
from tests.support.console import finish, output_text, stream_view, wait_ended
from tests.support.generations import MESSAGES, create_stream, stream_state
from tests.support.processes import api_and_worker
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually
from workers.providers.fake import fake_tokens

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def test_the_console_shows_an_archived_stream_as_it_showed_it_from_redis(
    redis_server: RedisServer, archive_url: str, open_page: OpenPage
) -> None:
    env = {
        "BROKER_ARCHIVE_URL": archive_url,
        "BROKER_ARCHIVE_AFTER_SECONDS": "0",
        "BROKER_SWEEP_SECONDS": "0.2",
    }
    with api_and_worker(redis_server.url, env, worker_env=env) as api:
        stream_id = create_stream(api.url, seed=8, max_tokens=30, rate=300)["id"]
        finish(api.url, stream_id)
        with redis.Redis.from_url(redis_server.url) as store:
            eventually(
                lambda: not store.exists(keys.meta_key(stream_id)),
                what="the stream archived and let go",
            )
        page, log = open_page()
        page.goto(f"{api.url}/console")
        row = page.locator(f"tr[data-id='{stream_id}']")
        expect(row.locator(".col-status")).to_have_text("completed")
        row.locator(".col-model").click()
        expect(page).to_have_url(re.compile(f"#/streams/{stream_id}$"))
        view = stream_view(page, stream_id)
        wait_ended(page, stream_id)
        expect(view).to_have_attribute("data-outcome", "completed")
        assert output_text(page) == "".join(fake_tokens(MESSAGES, 30, 8))
        expect(page.locator("[data-role=log] tr")).to_have_count(
            stream_state(api.url, stream_id)["last_event_id"]
        )
        assert log.errors == []
