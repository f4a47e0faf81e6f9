"""Background workloads for tests that capture while PostgreSQL keeps changing: small
transactions on an ``accounts`` table (and a ``ledger``), in a thread, until stopped.

Use them as context managers; leaving the block stops the thread and re-raises whatever
the workload raised, so a workload that died early cannot pass for a quiet database.
"""

from __future__ import annotations

import random
import threading
import time
from abc import ABC, abstractmethod
from typing import Self

import psycopg


class _WorkloadThread(ABC):
    """Runs :meth:`_step` in a daemon thread on one autocommit connection until stopped;
    ``transactions`` counts the steps done."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.transactions = 0
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    self._step(conn)
                    self.transactions += 1
        except BaseException as e:  # thread boundary: __exit__ re-raises it in the test
            self.failure = e

    @abstractmethod
    def _step(self, conn: psycopg.Connection) -> None:
        """One transaction of the workload."""

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop within 30 s"
        if self.failure is not None and exc_type is None:
            raise self.failure


class Workload(_WorkloadThread):
    """Transfers between accounts plus a ledger of inserts and deletes (see
    :func:`create_bank`); now and then a bigger transaction spanning several sink flushes."""

    def _step(self, conn: psycopg.Connection) -> None:
        a, b = self.rng.sample(range(1, 501), 2)
        amount = self.rng.randint(1, 50)
        with conn.transaction():
            conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", [amount, a])
            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", [amount, b])
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


def create_bank(conn: psycopg.Connection) -> None:
    """The tables of :class:`Workload`: 500 accounts and an empty ledger."""
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
    conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, account int, amount int)")
    conn.execute("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 500) g")


class Transfers(_WorkloadThread):
    """Many small transactions on ``accounts`` (see :func:`create_accounts`): transfers,
    and accounts opened and closed, about one every 2 ms."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(dsn, seed)
        self._next_id = 10_000

    def _step(self, conn: psycopg.Connection) -> None:
        a, b = self.rng.sample(range(1, 301), 2)
        with conn.transaction():
            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", [a])
            conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", [b])
        roll = self.rng.random()
        if roll < 0.2:
            conn.execute("INSERT INTO accounts VALUES (%s, 0)", [self._next_id])
            self._next_id += 1
        elif roll < 0.3:
            conn.execute(
                "DELETE FROM accounts WHERE id = (SELECT max(id) FROM accounts WHERE id >= 10000)"
            )
        time.sleep(0.002)


def create_accounts(conn: psycopg.Connection) -> None:
    """The table of :class:`Transfers`: 300 accounts."""
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
    conn.execute("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 300) g")
