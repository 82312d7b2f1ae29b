"""The `bearpaw` command line."""

from gateway.cli.main import app

__all__ = ["app"]
