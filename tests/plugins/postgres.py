"""Pytest plugin: a private PostgreSQL server for the session and a fresh database per test.

Fixtures:

* ``pg_server`` (session): a started :class:`cdc.cli.local_postgres.LocalPostgres` with
  ``wal_level=logical``; stopped, and its directory removed, at session end.
* ``pg_dsn`` (function): DSN of a new, empty database ``test_<hex>`` on that server. After the
  test, replication slots on it are dropped (their walsenders terminated first, since an
  active slot cannot be dropped) and then the database itself (``WITH (FORCE)``).
* ``pg_conn`` (function): an autocommit psycopg connection to ``pg_dsn``.

Tests that use them should be marked ``@pytest.mark.postgres``. When PostgreSQL is not
installed, ``pg_server`` errors with the install hint from :class:`LocalPostgres`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

from cdc.cli.local_postgres import LocalPostgres

#: How long teardown waits for a terminated walsender to release its slot.
_SLOT_RELEASE_TIMEOUT = 10.0


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    """A throwaway PostgreSQL server shared by the whole session (fsync off: data is disposable)."""
    # base_dir=None: pytest's tmp_path_factory lives under a 0700 directory of the current
    # user, which the postgres OS user (used when we are root) cannot enter.
    server = LocalPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server: LocalPostgres) -> Iterator[str]:
    """DSN of a fresh database on ``pg_server``; slots and the database are dropped afterwards."""
    with temporary_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, closed after the test."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@contextmanager
def temporary_database(server: LocalPostgres) -> Iterator[str]:
    """Create ``test_<hex>`` on ``server``, yield its DSN, then drop its slots and itself.

    ``pg_dsn`` is built on this; a test that needs a second database can use it directly.
    """
    dbname = f"test_{uuid.uuid4().hex}"
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield server.dsn_for(dbname)
    finally:
        with psycopg.connect(server.dsn, autocommit=True) as admin:
            _drop_slots(admin, dbname)
            # FORCE disconnects sessions the test left open (PostgreSQL 13+).
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def _drop_slots(admin: psycopg.Connection, dbname: str) -> None:
    """Drop every replication slot on ``dbname``; DROP DATABASE refuses while logical slots exist."""
    deadline = time.monotonic() + _SLOT_RELEASE_TIMEOUT
    while True:
        admin.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            (dbname,),
        )
        slots = [
            row[0]
            for row in admin.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (dbname,)
            )
        ]
        if not slots:
            return
        for slot in slots:
            try:
                admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            except psycopg.errors.ObjectInUse:
                # The terminated walsender has not released the slot yet: retry below.
                if time.monotonic() >= deadline:
                    raise
            except psycopg.errors.UndefinedObject:
                pass  # dropped meanwhile (e.g. a temporary slot whose session ended)
        time.sleep(0.05)
