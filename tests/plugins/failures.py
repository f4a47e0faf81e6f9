"""Pytest plugin for failure tests: roles that cannot log in or replicate, the ``cdc`` CLI
as a subprocess, waiting for a slot, finding the pipeline's backends.

Fixtures:

* ``password_role`` (function): a LOGIN REPLICATION role that must give its password
  (scram-sha-256 over loopback, for this role only: two lines prepended to the server's
  ``pg_hba.conf`` and removed afterwards). Skips when the server's ``pg_hba.conf`` is not
  ours to edit (an existing server given to the test run).
* ``no_replication_role`` (function): a LOGIN role without REPLICATION (trust auth).
* ``down_object_store`` (function): a :class:`RecordingEndpoint`, an S3 endpoint that
  answers 503 and counts who connected.

Helpers: :func:`cdc_command`, :func:`start_cdc`, :func:`dsn_as`, :func:`wait_slot_active`,
:func:`backend_pids`, :class:`SnapshotHook`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


@dataclass(frozen=True)
class Role:
    name: str
    password: str | None
    #: DSN of the test database as this role (with the right password, if any).
    dsn: str


def dsn_as(dsn: str, user: str, password: str | None = None) -> str:
    """``dsn`` with another user (and password), as a URI so the password sits in it the
    way users write it."""
    params = conninfo_to_dict(dsn)
    host, port, dbname = params.get("host"), params.get("port"), params.get("dbname")
    auth = f"{user}:{password}" if password is not None else user
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


@pytest.fixture
def password_role(pg_conn: psycopg.Connection) -> Iterator[Role]:
    hba_file = Path(str(pg_conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
    if not os.access(hba_file, os.W_OK):
        pytest.skip(f"{hba_file} is not writable here: cannot require a password")
    name = f"cdc_pw_{uuid.uuid4().hex[:10]}"
    password = f"right-{uuid.uuid4().hex}"
    pg_conn.execute(
        sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password)
        )
    )
    original = hba_file.read_text(encoding="utf-8")
    lines = (
        f"host all         {name} 127.0.0.1/32 scram-sha-256\n"
        f"host replication {name} 127.0.0.1/32 scram-sha-256\n"
    )
    hba_file.write_text(lines + original, encoding="utf-8")  # first match wins
    pg_conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)  # the postmaster rereads pg_hba.conf on SIGHUP, asynchronously
    try:
        yield Role(name, password, dsn_as(pg_conn.info.dsn, name, password))
    finally:
        hba_file.write_text(hba_file.read_text(encoding="utf-8").replace(lines, ""), "utf-8")
        pg_conn.execute("SELECT pg_reload_conf()")
        pg_conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        pg_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def no_replication_role(pg_conn: psycopg.Connection) -> Iterator[Role]:
    name = f"cdc_norepl_{uuid.uuid4().hex[:10]}"
    pg_conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield Role(name, None, make_conninfo(pg_conn.info.dsn, user=name))
    finally:
        pg_conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        pg_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _cdc_env(env: dict[str, str] | None) -> dict[str, str]:
    # Wide lines: rich wraps messages at the terminal width, which would split the texts
    # the tests look for.
    return {**os.environ, "COLUMNS": "400", **(env or {})}


def cdc_command(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cdc ARGS`` to its end; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        capture_output=True,
        text=True,
        env=_cdc_env(env),
        timeout=timeout,
    )


def start_cdc(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m cdc ARGS`` in the background (stop it with ``communicate``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cdc", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cdc_env(env),
    )


def wait_slot_active(
    conn: psycopg.Connection,
    slot: str,
    *,
    proc: subprocess.Popen[str] | None = None,
    timeout: float = 60,
) -> int:
    """Wait until a walsender streams from ``slot``; its pid."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s AND active",
            [slot],
        ).fetchone()
        if row is not None and row[0] is not None:
            return int(row[0])
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"cdc exited with {proc.returncode}: {err}\n{out}")
        assert time.monotonic() < deadline, f"nothing streams from slot {slot}"
        time.sleep(0.1)


def backend_pids(conn: psycopg.Connection, *, backend_type: str = "client backend") -> list[int]:
    """Pids of the capture's own backends (application_name ``cdc-lakehouse``) on
    ``conn``'s database, of one ``backend_type`` (``walsender`` for replication)."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'cdc-lakehouse' "
        "AND datname = current_database() AND backend_type = %s AND pid <> pg_backend_pid()",
        [backend_type],
    ).fetchall()
    return [int(r[0]) for r in rows]


def drop_slot_now(conn: psycopg.Connection, slot: str, *, timeout: float = 30) -> None:
    """Drop ``slot`` as an operator would, ending the walsender that holds it first; retried
    while a reconnecting pipeline grabs it again."""
    deadline = time.monotonic() + timeout
    while True:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            [slot],
        )
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            return
        except psycopg.errors.ObjectInUse:
            assert time.monotonic() < deadline, f"could not drop slot {slot}"
            time.sleep(0.01)


class RecordingEndpoint:
    """A loopback HTTP endpoint that answers every request with 503 and counts the
    connections it got: an object store that is down, and proof of who tried to reach it."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture
def down_object_store() -> Iterator[RecordingEndpoint]:
    endpoint = RecordingEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.close()


class SnapshotHook:
    """A snapshot progress receiver (:class:`sinks.base.SnapshotProgress`) that lets every
    call pass: a test subclasses it and overrides the call it acts on (a crash in a given
    table, a signal at the first batch, a stop after the first table)."""

    def table_started(self, name: str, estimated_rows: int | None) -> None:
        """Ignored."""

    def rows_copied(self, name: str, rows: int) -> None:
        """Ignored."""

    def table_done(self, name: str, rows: int) -> None:
        """Ignored."""

    def snapshot_finished(self) -> None:
        """Ignored."""
