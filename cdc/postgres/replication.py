"""The replication connection: the only module that does socket IO with the walsender.

It speaks the streaming-replication commands through psycopg's libpq layer
(``replication=database`` connection, simple-query ``exec_``, COPY BOTH via
``get_copy_data``/``put_copy_data``). Frame parsing lives in :mod:`cdc.postgres.protocol.walproto` and message
decoding in :mod:`cdc.postgres.protocol.pgoutput`, both free of IO.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.core.errors import ConfigError
from cdc.core.lsn import format_lsn, parse_lsn
from cdc.postgres.errors import SourceConnectionError
from cdc.postgres.protocol.walproto import standby_status_update

#: Session settings that fix the text form of values, which cdc.core.pgtypes parses. Applied to
#: every connection that reads row data (replication and snapshot alike).
VALUE_FORMAT_OPTIONS = (
    "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 "
    "-c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C"
)


#: ``server_version_num`` from which pgoutput streams in-progress transactions (protocol 2).
STREAMING_MIN_SERVER_VERSION = 140000
#: ``server_version_num`` from which pgoutput passes on ``pg_logical_emit_message`` messages.
MESSAGES_MIN_SERVER_VERSION = 140000


def session_conninfo(dsn: str, **extra: str) -> str:
    """``dsn`` with the value-format session settings (and ``extra`` params) added."""
    options = conninfo_to_dict(dsn).get("options")
    merged = f"{options} {VALUE_FORMAT_OPTIONS}" if options else VALUE_FORMAT_OPTIONS
    return make_conninfo(dsn, options=merged, application_name="cdc-lakehouse", **extra)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class CreatedSlot:
    name: str
    consistent_point: int
    snapshot_name: str | None


@contextmanager
def _lost_connection_is_transient(what: str) -> Iterator[None]:
    """libpq failures on an open connection mean the server or the network went away."""
    try:
        yield
    except psycopg.OperationalError as e:
        raise SourceConnectionError(f"{what}: {e}") from e


class ReplicationConnection:
    """One walsender session.

    Hazard: an exported snapshot (from :meth:`create_slot`) lives only until the next
    command on this connection, so keep the connection idle until the snapshot copy has
    started its transaction with ``SET TRANSACTION SNAPSHOT``.
    """

    def __init__(self, dsn: str) -> None:
        try:
            self._pgconn = pq.PGconn.connect(session_conninfo(dsn, replication="database").encode())
        except Exception as e:  # invalid conninfo syntax
            raise ConfigError(f"invalid source DSN: {e}") from e
        if self._pgconn.status != pq.ConnStatus.OK:
            message = self._error_text()
            self._pgconn.finish()
            raise SourceConnectionError(f"cannot open a replication connection: {message}")
        self.streaming = False
        #: Whether START_REPLICATION asked for in-progress transactions (protocol 2).
        self.stream_in_progress = False

    def _error_text(self) -> str:
        return self._pgconn.get_error_message().strip() or "connection lost"

    def _exec(self, command: str) -> pq.abc.PGresult:
        with _lost_connection_is_transient(f"{command.split()[0]} failed"):
            result = self._pgconn.exec_(command.encode())
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            message = (result.error_message or self._pgconn.error_message).decode(errors="replace")
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
            if self._pgconn.status != pq.ConnStatus.OK:
                raise SourceConnectionError(f"{command.split()[0]} failed: {message.strip()}")
            raise _ReplicationCommandError(message.strip(), sqlstate.decode() if sqlstate else None)
        return result

    def create_slot(
        self, name: str, *, export_snapshot: bool, temporary: bool = False
    ) -> CreatedSlot | None:
        """Create logical slot ``name`` for pgoutput; ``None`` if it already exists.

        A ``temporary`` slot disappears with this connection: it is only used for the
        consistent snapshot it exports.
        """
        export = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
        kind = "TEMPORARY LOGICAL" if temporary else "LOGICAL"
        try:
            result = self._exec(
                f"CREATE_REPLICATION_SLOT {_quote_ident(name)} {kind} pgoutput {export}"
            )
        except _ReplicationCommandError as e:
            if e.sqlstate == "42710":  # duplicate_object
                return None
            raise SourceConnectionError(f"cannot create slot {name!r}: {e}") from e
        snapshot = result.get_value(0, 2)
        return CreatedSlot(
            name=name,
            consistent_point=parse_lsn(bytes(result.get_value(0, 1) or b"").decode()),
            snapshot_name=bytes(snapshot).decode() if snapshot else None,
        )

    @property
    def server_version(self) -> int:
        """The server's version as ``server_version_num`` spells it (150018 for 15.18)."""
        return int(self._pgconn.server_version)

    def start_replication(
        self,
        slot: str,
        publication: str,
        *,
        start_lsn: int = 0,
        stream_in_progress: bool | None = None,
    ) -> None:
        """Enter COPY BOTH mode. ``start_lsn=0`` resumes at the slot's confirmed position.

        ``stream_in_progress`` asks for pgoutput protocol version 2 with ``streaming 'on'``:
        transactions that outgrow the server's ``logical_decoding_work_mem`` arrive in
        blocks before they commit, and may be aborted (see :mod:`cdc.postgres.stream_spill`). The
        default (``None``) streams whenever the server supports it (PostgreSQL 14+);
        :attr:`stream_in_progress` says what was chosen.
        """
        if stream_in_progress is None:
            stream_in_progress = self.server_version >= STREAMING_MIN_SERVER_VERSION
        elif stream_in_progress and self.server_version < STREAMING_MIN_SERVER_VERSION:
            raise ConfigError(
                f"streaming of in-progress transactions needs PostgreSQL 14 or later; the "
                f"server is version {self.server_version}"
            )
        protocol = (
            "proto_version '2', streaming 'on'" if stream_in_progress else "proto_version '1'"
        )
        options = f"{protocol}, publication_names {_quote_literal(_quote_ident(publication))}"
        if self.server_version >= MESSAGES_MIN_SERVER_VERSION:
            # Logical messages carry heartbeats and signals (see cdc.postgres.streaming).
            options += ", messages 'true'"
        command = (
            f"START_REPLICATION SLOT {_quote_ident(slot)} LOGICAL {format_lsn(start_lsn)} "
            f"({options})"
        )
        with _lost_connection_is_transient("START_REPLICATION failed"):
            self._pgconn.send_query(command.encode())
            result = self._pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = result.error_message.decode(errors="replace") if result else ""
            raise SourceConnectionError(
                f"START_REPLICATION failed: {message.strip() or self._error_text()}"
            )
        self.streaming = True
        self.stream_in_progress = stream_in_progress

    def read_frame(self, timeout: float) -> memoryview | None:
        """The next COPY frame, or ``None`` when nothing arrived within ``timeout`` seconds."""
        # Called once per change: a plain try costs far less than a context manager here.
        try:
            nbytes, data = self._pgconn.get_copy_data(1)
            if nbytes == 0:
                readable, _, _ = select.select([self._pgconn.socket], [], [], timeout)
                if not readable:
                    return None
                self._pgconn.consume_input()
                nbytes, data = self._pgconn.get_copy_data(1)
                if nbytes == 0:
                    return None
        except psycopg.OperationalError as e:
            raise SourceConnectionError(f"replication stream lost: {e}") from e
        if nbytes < 0:
            # The server ended the COPY (e.g. it is shutting down).
            self.streaming = False
            result = self._pgconn.get_result()
            detail = result.error_message.decode(errors="replace").strip() if result else ""
            raise SourceConnectionError(f"replication stream ended: {detail or self._error_text()}")
        return data

    def send_status(self, *, write_lsn: int, flush_lsn: int, reply_requested: bool = False) -> None:
        """Tell the server what is received (write) and durable downstream (flush)."""
        frame = standby_status_update(
            write_lsn=write_lsn,
            flush_lsn=flush_lsn,
            apply_lsn=flush_lsn,
            reply_requested=reply_requested,
        )
        with _lost_connection_is_transient("cannot send standby status"):
            self._pgconn.put_copy_data(frame)
            self._pgconn.flush()

    def close(self) -> None:
        self._pgconn.finish()

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReplicationCommandError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
