"""A stand-in for a broker that answers every request with the same raw HTTP bytes, for the
failures a real api will not produce on demand: a 500, a body that is not JSON, an export
cut in the middle of its chunked body, a connection held open without a word.

Raw bytes, not a web framework, so that a test says exactly what goes on the wire::

    with ScriptedBroker(answer(500, ERROR_500)) as broker:
        broker.url                       # "http://127.0.0.1:PORT"
        broker.requested.wait(10)        # set once a request has been read

``hold=True`` keeps each connection open after the bytes (until the broker is stopped), as a
wedged proxy does; otherwise the connection is closed right after them.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading

from tests.support.background import Background


def answer(
    status: int, body: bytes, content_type: str = "application/json", *, reason: str = "X"
) -> bytes:
    """A whole response with a Content-Length."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def chunked(status: int, chunks: list[bytes], content_type: str, *, complete: bool) -> bytes:
    """A chunked response; ``complete=False`` leaves out the last (empty) chunk, which is
    how a connection cut mid-body looks to the client."""
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return head.encode() + body + (b"0\r\n\r\n" if complete else b"")


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class ScriptedBroker(Background):
    def __init__(self, response: bytes, *, hold: bool = False) -> None:
        self.response = response
        self.hold = hold
        self.requested = threading.Event()
        self.requests = 0
        self._released = threading.Event()
        broker = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                connection: socket.socket = self.request
                connection.settimeout(10)
                try:
                    _read_request(connection)
                    broker.requests += 1
                    broker.requested.set()
                    connection.sendall(broker.response)
                    if broker.hold:
                        broker._released.wait(60)
                except OSError:
                    pass  # the client left first: nothing to answer

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _read_request(connection: socket.socket) -> None:
    """Reads the head and a Content-Length body (an import's archive), then returns."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return
        body += chunk
