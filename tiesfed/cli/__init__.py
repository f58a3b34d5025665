"""The `tiesfed` command line (console script `tiesfed = tiesfed.cli:main`)."""

from tiesfed.cli.app import main

__all__ = ["main"]
