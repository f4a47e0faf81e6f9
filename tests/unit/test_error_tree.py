"""The error tree: every error we raise is transient or terminal, never both, never neither;
PostgreSQL errors are classed by SQLSTATE; messages never carry the password."""

from __future__ import annotations

import importlib
import pkgutil

import psycopg
import pytest

from cdc.core.errors import CdcError, TerminalError, TransientError
from cdc.postgres.errors import (
    PostgresError,
    SourceAuthenticationError,
    SourceConnectionError,
    SourceError,
    SourcePrivilegeError,
    classify_sqlstate,
    postgres_error,
    redact,
    source_identity,
)

PACKAGES = ("cdc", "sinks", "catalog", "jobs", "transforms")


def _import_everything() -> None:
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if not info.name.endswith("__main__"):  # runs the CLI when imported
                importlib.import_module(info.name)


def _all_errors() -> list[type[CdcError]]:
    _import_everything()
    found: list[type[CdcError]] = []
    todo: list[type[CdcError]] = [CdcError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found and sub.__module__.split(".")[0] in PACKAGES:
                found.append(sub)
                todo.append(sub)
    return found


def test_every_concrete_error_is_exactly_one_kind() -> None:
    errors = _all_errors()
    package_roots = [c for c in errors if c.__bases__ == (CdcError,)]
    # One root per package that has errors (cdc.core's own are the kinds themselves).
    assert {c.__name__ for c in package_roots} >= {
        "PostgresError",
        "KafkaCaptureError",
        "SinkError",
        "CatalogError",
        "JobError",
    }
    kinds = {TransientError, TerminalError}
    concrete = [c for c in errors if c not in package_roots and c not in kinds]
    assert len(concrete) > 20
    wrong = [
        c.__qualname__
        for c in concrete
        if issubclass(c, TransientError) == issubclass(c, TerminalError)
    ]
    assert wrong == []


def test_errors_live_in_errors_modules_and_are_named_so() -> None:
    misplaced = [
        f"{c.__module__}.{c.__qualname__}"
        for c in _all_errors()
        if not (c.__module__.endswith(".errors") and c.__name__.endswith("Error"))
    ]
    assert misplaced == []


@pytest.mark.parametrize(
    ("sqlstate", "message", "expected"),
    [
        ("28P01", 'password authentication failed for user "u"', SourceAuthenticationError),
        ("28000", 'no pg_hba.conf entry for host "1.2.3.4"', SourceAuthenticationError),
        ("3D000", 'database "nope" does not exist', SourceAuthenticationError),
        ("42501", "permission denied for table t", SourcePrivilegeError),
        ("08006", "connection failure", SourceConnectionError),
        ("57P01", "terminating connection due to administrator command", SourceConnectionError),
        (
            "57P02",
            "terminating connection due to crash of another server process",
            SourceConnectionError,
        ),
        ("57P03", "the database system is starting up", SourceConnectionError),
        ("42P01", 'relation "t" does not exist', SourceError),
        # Connection failures carry no SQLSTATE: classed by libpq's text.
        (None, "connection refused", SourceConnectionError),
        (None, "timeout expired", SourceConnectionError),
        (None, 'FATAL:  password authentication failed for user "u"', SourceAuthenticationError),
        (None, "fe_sendauth: no password supplied", SourceAuthenticationError),
        (None, 'FATAL:  role "ghost" does not exist', SourceAuthenticationError),
        (
            None,
            "FATAL:  must be superuser or replication role to start walsender",
            SourcePrivilegeError,
        ),
        (None, "FATAL:  the database system is shutting down", SourceConnectionError),
        (None, "server closed the connection unexpectedly", SourceConnectionError),
    ],
)
def test_sqlstate_classes(sqlstate: str | None, message: str, expected: type) -> None:
    cls = classify_sqlstate(sqlstate, message)
    assert cls is expected
    assert issubclass(cls, PostgresError)


def test_message_names_role_host_database_never_the_password() -> None:
    dsn = "postgresql://alice:s3cr%21t@db.example:6543/shop"
    error = postgres_error(
        'password authentication failed for user "alice" (password s3cr!t)',
        doing="connecting",
        dsn=dsn,
        sqlstate="28P01",
    )
    assert isinstance(error, TerminalError)
    text = str(error)
    assert "'alice'" in text and "db.example:6543" in text and "'shop'" in text
    assert "s3cr!t" not in text and "s3cr%21t" not in text
    assert "s3cr" not in source_identity(dsn)
    assert redact("x user:pw@h y pw", "postgresql://user:pw@h/d") == "x user:***@h y ***"


def test_a_real_connection_refusal_is_transient() -> None:
    dsn = "postgresql://bob:hunter2@127.0.0.1:1/db?connect_timeout=2"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn)
    error = postgres_error(info.value, doing="connecting", dsn=dsn)
    assert isinstance(error, SourceConnectionError) and isinstance(error, TransientError)
    assert "hunter2" not in str(error) and "'bob'" in str(error)
