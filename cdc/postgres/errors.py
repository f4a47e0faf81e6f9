"""Errors raised by the PostgreSQL side of capture (:mod:`cdc.postgres`), and the one place
that decides what a PostgreSQL error means: :func:`postgres_error`.

PostgreSQL says what went wrong in its SQLSTATE, so errors are classed by that, not by the
module that happened to meet them: a wrong password is terminal whether the set-up query or
a reconnect hit it, a server shutting down is transient wherever it is noticed.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc.core.errors import CdcError, TerminalError, TransientError


class PostgresError(CdcError):
    """Root of the errors of :mod:`cdc.postgres`."""


class SourceConnectionError(PostgresError, TransientError):
    """The connection to PostgreSQL failed or was lost, or the server is restarting."""


class SourceError(PostgresError, TerminalError):
    """PostgreSQL refused what capture asked, and asking again will not change that (a
    statement the server rejects, an object that does not exist)."""


class SourceAuthenticationError(SourceError):
    """PostgreSQL refused the login: wrong password, unknown role, no ``pg_hba.conf`` entry
    (SQLSTATE class 28), or a database that does not exist."""


class PrerequisiteError(SourceError):
    """The source database is not set up for logical replication (wal_level, privileges...)."""


class SourcePrivilegeError(PrerequisiteError):
    """The connecting role lacks a privilege capture needs (SQLSTATE 42501)."""


class SlotLostError(SourceError):
    """The replication slot this pipeline streamed from is gone or invalidated: the changes
    it held are not recoverable from PostgreSQL."""


class SlotInUseError(SourceError):
    """A slot is active (a consumer streams from it) and was not to be dropped."""


class CopyFormatError(SourceError):
    """A row of the initial snapshot's ``COPY ... CSV`` is not what PostgreSQL writes for
    the table's columns (a field too many or missing, an unclosed quote), or one column's
    text in one chunk passed what an Arrow string array holds (2 GiB)."""


class StreamSpillError(PostgresError, TransientError):
    """A streamed transaction could not be spilled to or read back from local disk."""


#: SQLSTATEs (beyond class 08) after which the same request may succeed: the server is
#: shutting down, crashed or starting, is out of a resource, or chose this transaction as a
#: deadlock victim.
_TRANSIENT_STATES = frozenset(
    {"57P01", "57P02", "57P03", "57P05", "53000", "53100", "53200", "53300", "40001", "40P01"}
)
#: Connection failures libpq reports without a SQLSTATE, recognised by their text. The
#: server's FATAL message at login carries no SQLSTATE through libpq's connection status,
#: so a wrong password would otherwise look like a network failure.
_LOGIN_REFUSED = re.compile(
    r"password authentication failed|authentication failed|no pg_hba\.conf entry"
    r"|fe_sendauth: no password supplied|role \"[^\"]*\" does not exist"
    r"|database \"[^\"]*\" does not exist|is not permitted to log in",
    re.IGNORECASE,
)
_NO_PRIVILEGE = re.compile(
    r"must be superuser or replication role|permission denied|must have replication",
    re.IGNORECASE,
)
_STARTING_OR_STOPPING = re.compile(
    r"the database system is (starting up|shutting down|in recovery mode)", re.IGNORECASE
)


def source_identity(dsn: str) -> str:
    """``role R on host H:P, database D``: who connects where, for messages. Never the
    password."""
    try:
        params: dict[str, Any] = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the source (its DSN does not parse)"
    user = params.get("user") or "(default role)"
    host = params.get("host") or "(local socket)"
    port = params.get("port")
    where = f"{host}:{port}" if port else host
    database = params.get("dbname") or user
    return f"role {user!r} on host {where}, database {database!r}"


def redact(text: str, dsn: str) -> str:
    """``text`` with the DSN's password, if any, masked (a driver message may quote it)."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
        match = re.search(r"://[^:/@]*:([^@]*)@", dsn)
        if match:
            password = match.group(1)
    if password:
        text = text.replace(str(password), "***")
    return text


def classify_sqlstate(sqlstate: str | None, message: str) -> type[PostgresError]:
    """The error class of ours for a PostgreSQL error with ``sqlstate`` and ``message``."""
    if sqlstate:
        if sqlstate.startswith("28") or sqlstate == "3D000":
            return SourceAuthenticationError
        if sqlstate == "42501":
            return SourcePrivilegeError
        if sqlstate.startswith("08") or sqlstate in _TRANSIENT_STATES:
            return SourceConnectionError
        return SourceError
    # No SQLSTATE: libpq failed to connect or lost the connection. Refused, timed out,
    # reset: transient, unless the server's text says it refused the login.
    if _LOGIN_REFUSED.search(message):
        return SourceAuthenticationError
    if _NO_PRIVILEGE.search(message) and not _STARTING_OR_STOPPING.search(message):
        return SourcePrivilegeError
    return SourceConnectionError


def postgres_error(
    e: psycopg.Error | str,
    *,
    doing: str,
    dsn: str,
    sqlstate: str | None = None,
    grant: str | None = None,
) -> PostgresError:
    """The error of ours that says what PostgreSQL answered while ``doing``, of the right
    kind (see the module docstring). Raise it ``from e``.

    ``e`` may be the text of a libpq error (replication commands run below psycopg's
    exceptions), with its ``sqlstate`` if the server sent one. ``grant`` is the fix a
    privilege error calls for, when the caller knows it better than the general hint.

    Example:
        >>> try:
        ...     psycopg.connect(dsn)
        ... except psycopg.Error as e:
        ...     raise postgres_error(e, doing="connecting", dsn=dsn) from e  # doctest: +SKIP
    """
    if isinstance(e, psycopg.Error):
        sqlstate = sqlstate or e.sqlstate
        text = str(e)
    else:
        text = e
    text = redact(" ".join(text.split()), dsn) or "connection lost"
    cls = classify_sqlstate(sqlstate, text)
    who = source_identity(dsn)
    if cls is SourceAuthenticationError:
        hint = "check the role, its password and pg_hba.conf; retrying will not help"
        return cls(f"{doing}: PostgreSQL refused the login of {who}: {text} ({hint})")
    if cls is SourcePrivilegeError:
        hint = grant or (
            "grant it (ALTER ROLE ... WITH REPLICATION for replication, table ownership or "
            "a superuser for publications, GRANT SELECT for snapshots)"
        )
        return cls(f"{doing}: {who} lacks a privilege: {text} ({hint})")
    state = f" [SQLSTATE {sqlstate}]" if sqlstate else ""
    return cls(f"{doing}: {text}{state} ({who})")
