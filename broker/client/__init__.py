"""The Python client of streambroker: ``AsyncClient`` and ``Client`` (sync).

>>> from broker.client import Client, Token, Done
>>> with Client("http://127.0.0.1:8000") as sb:
...     stream = sb.create("fake", [{"role": "user", "content": "Hello"}], max_tokens=20)
...     for event in sb.watch(stream.id):
...         if isinstance(event, Token):
...             print(event.text, end="", flush=True)

``watch`` reconnects by itself (backoff with jitter, ``Last-Event-ID``), times a silent
connection out (no byte, not even a ``: ping``, for longer than the server's heartbeat
allows) and stops after the terminal event; every event comes once, in order.
"""

from broker.client.aio import DEFAULT_URL, AsyncClient, Created, Page
from broker.client.backoff import Backoff
from broker.client.errors import APIError, ClientError, ConnectionFailed
from broker.client.events import (
    Done,
    Metadata,
    Progress,
    Resumed,
    StreamEvent,
    StreamFailed,
    Token,
    ToolCall,
    UnknownEvent,
)
from broker.client.sync import Client, SyncWatch
from broker.client.watch import Watch, WatchStats

__all__ = [
    "DEFAULT_URL",
    "APIError",
    "AsyncClient",
    "Backoff",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "Created",
    "Done",
    "Metadata",
    "Page",
    "Progress",
    "Resumed",
    "StreamEvent",
    "StreamFailed",
    "SyncWatch",
    "Token",
    "ToolCall",
    "UnknownEvent",
    "Watch",
    "WatchStats",
]
