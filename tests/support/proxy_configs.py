"""The shipped load balancer configurations, parsed: ``infra/nginx/`` (nginx's grammar, enough
for these files: directives, blocks, quotes, comments, includes) and
``infra/haproxy/haproxy.cfg`` (its sections and the api servers between its
``# BEGIN api servers`` and ``# END api servers`` lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.support.deploy_files import HAPROXY_CFG, NGINX_DIR

# == nginx ==================================================================================


@dataclass
class NginxDirective:
    name: str
    args: list[str]
    block: list[NginxDirective] | None = None

    def find(self, name: str) -> list[NginxDirective]:
        return [d for d in self.block or [] if d.name == name]

    def value(self, name: str) -> str:
        found = self.find(name)
        assert len(found) == 1, f"{self.name} {self.args}: {len(found)} {name}"
        return found[0].args[0]

    def location(self, *args: str) -> NginxDirective:
        found = [d for d in self.find("location") if d.args == list(args)]
        assert found, f"no location {args}"
        return found[0]


def parse_nginx(path: Path) -> list[NginxDirective]:
    """nginx's grammar, enough for these files: directives, blocks, quotes, comments,
    ``include`` of a file beside this one."""
    grammar = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|#[^\n]*|[{};]|[^\s{};]+"
    tokens = re.findall(grammar, path.read_text())
    tokens = [t.strip("'\"") if t[0] in "'\"" else t for t in tokens if not t.startswith("#")]
    position = 0

    def directives() -> list[NginxDirective]:
        nonlocal position
        found: list[NginxDirective] = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == ";":
                if words[0] == "include" and (path.parent / words[1]).exists():
                    found += parse_nginx(path.parent / words[1])
                else:
                    found.append(NginxDirective(words[0], words[1:]))
                words = []
            elif token == "{":
                found.append(NginxDirective(words[0], words[1:], directives()))
                words = []
            elif token == "}":
                return found
            else:
                words.append(token)
        return found

    return directives()


def nginx_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def nginx_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, value
    unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * unit


def nginx_http() -> NginxDirective:
    top = NginxDirective("main", [], parse_nginx(NGINX_DIR / "nginx.conf"))
    (http,) = top.find("http")
    return http


def nginx_servers() -> list[str]:
    text = (NGINX_DIR / "upstreams.inc").read_text()
    return re.findall(r"^\s*server\s+(\S+)", text, re.M)


# == HAProxy ================================================================================


def haproxy_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def haproxy_seconds(value: str) -> float:
    return nginx_seconds(value)


def haproxy_api_servers_block(text: str) -> re.Match[str]:
    """Where the api servers are listed in haproxy.cfg's ``text``: group 1, the lines between
    ``# BEGIN api servers`` and ``# END api servers``."""
    block = re.search(r"# BEGIN api servers[^\n]*\n(.*?)\n\s*# END api servers", text, re.S)
    assert block, "haproxy.cfg has no BEGIN/END api servers block"
    return block


def haproxy_servers(text: str | None = None) -> list[str]:
    text = text if text is not None else HAPROXY_CFG.read_text()
    block = haproxy_api_servers_block(text)
    return re.findall(r"^\s*server\s+\S+\s+(\S+)", block.group(1), re.M)
