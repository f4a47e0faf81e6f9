"""The ``cdc`` command line: the commands (:mod:`cdc.cli.app`), the demo and the throwaway
PostgreSQL server it and the tests start."""

from cdc.cli.app import main

__all__ = ["main"]
