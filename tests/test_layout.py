"""The package boundaries the layout promises (ARCHITECTURE.md, "Layout"): the core never
depends on its users, and the client's public surface is what ``__all__`` says."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import broker
import broker.client

ROOT = Path(__file__).resolve().parent.parent


def broker_modules() -> list[str]:
    """Every module of the package (``__main__`` runs the command line when imported)."""
    walked = pkgutil.walk_packages(broker.__path__, prefix="broker.")
    return sorted(info.name for info in walked if not info.name.endswith("__main__"))


def test_importing_any_broker_module_loads_neither_api_nor_workers() -> None:
    """``broker`` is the core (and the command line, whose serving commands import the api
    and the workers only when they run): importing it must not pull its users in."""
    modules = broker_modules()
    assert "broker.generation_log" in modules
    assert "broker.cli.serve" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('api', 'workers'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "", f"broker imports {result.stdout.strip()}"


def test_the_client_exports_exactly_its_public_names() -> None:
    exported = broker.client.__all__
    assert sorted(exported, key=str.lower) == sorted(set(exported), key=str.lower)
    for name in exported:
        value = getattr(broker.client, name)
        module = getattr(value, "__module__", "broker.client")
        assert module.startswith("broker.client"), (name, module)
    public = {
        name
        for name, value in vars(broker.client).items()
        if not name.startswith("_") and not isinstance(value, type(broker))
    }
    assert public == set(exported)


def test_the_operator_commands_use_only_the_clients_public_names() -> None:
    tree = ast.parse((ROOT / "broker" / "cli" / "operator.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("broker.client"):
            assert node.module == "broker.client", f"imports from {node.module}"
            assert {alias.name for alias in node.names} <= set(broker.client.__all__)


def test_every_module_imports() -> None:
    for name in broker_modules():
        importlib.import_module(name)
