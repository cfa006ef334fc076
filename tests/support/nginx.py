"""nginx run from the shipped files, ``infra/nginx/``, on loopback.

``render_nginx`` copies them with only what must differ on one machine substituted: the
listen line (a free port of 127.0.0.1) and the servers of ``upstreams.inc`` (the given api
ports, each with the shipped lines' own parameters: ``max_fails``, ``fail_timeout``).
``Nginx`` checks that copy (``nginx -t``) and runs it in the foreground. In front of real
apis: ``tests.support.topology``; of fake ones: ``tests.support.proxies``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from tests.support.deploy_files import NGINX_DIR
from tests.support.deploy_tools import run
from tests.support.redis_server import free_port
from tests.support.server_process import ServerProcess


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (apt-get install nginx); .ci/run installs it")
    return binary


def render_nginx(into: Path, listen_port: int, api_ports: list[int]) -> Path:
    """A copy of ``infra/nginx`` in ``into`` that listens on ``listen_port`` of 127.0.0.1 and
    proxies to ``api_ports``; the path of its ``nginx.conf``."""
    for shipped in NGINX_DIR.iterdir():
        shutil.copy(shipped, into / shipped.name)
    conf = into / "streambroker.conf"
    text, listens = re.subn(
        r"^(\s*)listen\s+[^;]+;",
        rf"\1listen 127.0.0.1:{listen_port};",
        conf.read_text(),
        flags=re.M,
    )
    assert listens == 1, "streambroker.conf should have one listen line"
    conf.write_text(text)
    upstreams = into / "upstreams.inc"
    text = upstreams.read_text()
    shipped_servers = re.findall(r"^server\s+\S+\s*([^;]*);", text, flags=re.M)
    assert shipped_servers, "upstreams.inc should list server lines"
    parameters = shipped_servers[0]
    servers = "".join(f"server 127.0.0.1:{port} {parameters};\n" for port in api_ports)
    upstreams.write_text(re.sub(r"(?m)^server .*\n?", "", text) + servers)
    return into / "nginx.conf"


class Nginx:
    """nginx in the foreground on a rendered copy of the shipped files, in a temporary
    prefix (removed on ``stop``). ``binary``: which nginx (``nginx_binary()`` by default)."""

    def __init__(self, api_ports: list[int], binary: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sb-nginx-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            os.chmod(self.dir, 0o755)
            self.conf = render_nginx(self.dir, self.port, api_ports)
            # As root, nginx's workers would otherwise run as an account without the prefix.
            options = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
            prefix = ["-c", str(self.conf), "-p", str(self.dir), "-e", "stderr", "-g", options]
            self.args = [binary or nginx_binary(), *prefix]
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.server = ServerProcess(self.args, self.port, self.dir / "nginx.log", "nginx")

    def start(self) -> Nginx:
        """Check the configuration (``nginx -t``), then start it and wait until it listens."""
        try:
            checked = run([*self.args, "-t"])
            assert checked.returncode == 0, checked.stderr
            self.server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def output(self) -> str:
        return self.server.output()

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
