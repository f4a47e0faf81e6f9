"""Helpers for tests that run the ``cdc`` command as a user does: :func:`cdc` and
:func:`cdc_run` build command lines, :func:`run_cdc` runs one to completion."""

from __future__ import annotations

import os
import subprocess
import sys


def cdc(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdc", *args]


def cdc_run(dsn: str, lake: str, *, flush_seconds: float) -> list[str]:
    """``cdc run`` of the pipeline named ``test`` (the name the in-process helpers use)."""
    return cdc(
        "run",
        "--source",
        dsn,
        "--lake",
        lake,
        "--name",
        "test",
        "--flush-seconds",
        str(flush_seconds),
    )


def run_cdc(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cdc ARGS`` to completion; ``env`` adds to the environment."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(cdc(*args), capture_output=True, text=True, timeout=timeout, env=full_env)
