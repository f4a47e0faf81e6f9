"""A bank workload for tests that kill or stop capture mid-stream: transfers between
accounts plus a ledger of inserts and deletes, in a background thread."""

from __future__ import annotations

import random
import threading

import psycopg


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
