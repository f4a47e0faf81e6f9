"""Helpers for tests that run the ``cdc`` command as a user does, and a steady writer.

* :func:`cdc`, :func:`cdc_run`, :func:`run_cdc`: command lines and one-shot runs.
* :class:`Workload`: transfers between accounts plus a ledger of inserts and deletes, in a
  thread, until stopped (:func:`create_bank` makes its tables).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import psycopg


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


class Workload:
    """Transfers between accounts plus a ledger of inserts and deletes, until stopped."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.transactions = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                a, b = self.rng.sample(range(1, 501), 2)
                amount = self.rng.randint(1, 50)
                with conn.transaction():
                    conn.execute(
                        "UPDATE accounts SET balance = balance - %s WHERE id = %s", [amount, a]
                    )
                    conn.execute(
                        "UPDATE accounts SET balance = balance + %s WHERE id = %s", [amount, b]
                    )
                    conn.execute(
                        "INSERT INTO ledger (account, amount) VALUES (%s, %s), (%s, %s)",
                        [a, -amount, b, amount],
                    )
                roll = self.rng.random()
                if roll < 0.05:  # a bigger transaction, spanning several sink flushes
                    conn.execute(
                        "INSERT INTO ledger (account, amount) SELECT 1 + g % 500, 0 "
                        "FROM generate_series(1, 2000) g"
                    )
                elif roll < 0.15:
                    conn.execute(
                        "DELETE FROM ledger WHERE id IN (SELECT id FROM ledger ORDER BY random() LIMIT 5)"
                    )
                self.transactions += 1

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def create_bank(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
    conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, account int, amount int)")
    conn.execute("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 500) g")
