"""The ``streambroker`` command (``broker.cli.commands``)."""

from broker.cli.commands import main

__all__ = ["main"]
