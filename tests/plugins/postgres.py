"""Pytest plugin: a PostgreSQL server for the session and a fresh database per test.

Fixtures:

* ``pg_server`` (session): a :class:`PostgresServer`. By default a started
  :class:`cdc.cli.local_postgres.LocalPostgres` with ``wal_level=logical``, stopped (and its
  directory removed) at session end. With ``--pg-dsn DSN`` it is that existing server
  instead (a superuser DSN; the server must run with ``wal_level=logical``), left running.
* ``pg_dsn`` (function): DSN of a new, empty database ``test_<hex>`` on that server. After the
  test, replication slots on it are dropped (their walsenders terminated first, since an
  active slot cannot be dropped) and then the database itself (``WITH (FORCE)``).
* ``pg_conn`` (function): an autocommit psycopg connection to ``pg_dsn``.

Tests that use them should be marked ``@pytest.mark.postgres``. When PostgreSQL is not
installed (and no ``--pg-dsn`` is given), ``pg_server`` errors with the install hint from
:class:`LocalPostgres`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc.cli.local_postgres import LocalPostgres

#: How long teardown waits for a terminated walsender to release its slot.
_SLOT_RELEASE_TIMEOUT = 10.0


class PostgresServer(Protocol):
    """What the fixtures need of a server: a superuser DSN, and one for another database."""

    @property
    def dsn(self) -> str: ...

    @property
    def running(self) -> bool: ...

    def dsn_for(self, database: str) -> str: ...


class ExistingPostgres:
    """A server the tests did not start (``--pg-dsn``): never stopped by them.

    Args:
        dsn: a superuser connection string (creating databases and replication slots).
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def running(self) -> bool:
        try:
            with psycopg.connect(self._dsn, connect_timeout=5):
                return True
        except psycopg.OperationalError:
            return False

    def dsn_for(self, database: str) -> str:
        """``dsn`` with its database replaced (user, password, host and options kept)."""
        return make_conninfo(self._dsn, dbname=database)

    def check(self) -> None:
        """Fail with a clear message unless the server is reachable and has
        ``wal_level=logical`` (capture needs it; the tests would fail in odd places)."""
        try:
            with psycopg.connect(self._dsn, connect_timeout=10) as conn:
                row = conn.execute("SHOW wal_level").fetchone()
                superuser = conn.execute(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                ).fetchone()
        except psycopg.Error as e:
            raise pytest.UsageError(f"--pg-dsn: cannot connect: {e}") from e
        if row is None or row[0] != "logical":
            raise pytest.UsageError(
                f"--pg-dsn: the server has wal_level={row[0] if row else '?'}, the tests "
                "need wal_level=logical"
            )
        if superuser is None or not superuser[0]:
            raise pytest.UsageError(
                "--pg-dsn: the role is not a superuser; the tests create and drop databases, "
                "publications and replication slots"
            )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-dsn",
        metavar="DSN",
        default=None,
        help="use this existing PostgreSQL server (superuser DSN, wal_level=logical) instead "
        "of starting one; each test gets a temporary database on it, dropped afterwards",
    )


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    """The session's PostgreSQL server: the one of ``--pg-dsn``, else a throwaway one of our
    own (fsync off: data is disposable)."""
    existing: str | None = pytestconfig.getoption("pg_dsn")
    if existing:
        server = ExistingPostgres(existing)
        server.check()
        yield server
        return
    # base_dir=None: pytest's tmp_path_factory lives under a 0700 directory of the current
    # user, which the postgres OS user (used when we are root) cannot enter.
    local = LocalPostgres()
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> Iterator[str]:
    """DSN of a fresh database on ``pg_server``; slots and the database are dropped afterwards."""
    with temporary_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, closed after the test."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@contextmanager
def temporary_database(server: PostgresServer) -> Iterator[str]:
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
