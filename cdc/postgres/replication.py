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
from typing import Any, NoReturn

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.core.errors import ConfigError
from cdc.core.lsn import format_lsn, parse_lsn
from cdc.postgres.errors import SlotLostError, SourceConnectionError, postgres_error, redact
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
def _classified(what: str, dsn: str) -> Iterator[None]:
    """libpq failures on an open connection, classed by :func:`postgres_error`."""
    try:
        yield
    except psycopg.Error as e:
        raise postgres_error(e, doing=what, dsn=dsn) from e


def _slot_is_gone(sqlstate: str | None, message: str) -> bool:
    """START_REPLICATION failed because the slot is not there (42704, undefined object) or
    can no longer be read (55000, invalidated by max_slot_wal_keep_size). 55000 also means
    other unmet prerequisites (wal_level), so the text decides."""
    if sqlstate == "42704":
        return "slot" in message
    if sqlstate == "55000":
        return "invalidated" in message or "can no longer get changes" in message
    return False


#: The slot is held by another walsender (55006): often our own previous connection, not
#: yet gone after a reconnect.
_SLOT_BUSY_STATE = "55006"


class ReplicationConnection:
    """One walsender session.

    Hazard: an exported snapshot (from :meth:`create_slot`) lives only until the next
    command on this connection, so keep the connection idle until the snapshot copy has
    started its transaction with ``SET TRANSACTION SNAPSHOT``.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        try:
            conninfo = session_conninfo(dsn, replication="database")
        except psycopg.ProgrammingError as e:  # invalid conninfo syntax (conninfo_to_dict)
            raise ConfigError(f"invalid source DSN: {redact(str(e), dsn)}") from e
        self._pgconn = pq.PGconn.connect(conninfo.encode())
        if self._pgconn.status != pq.ConnStatus.OK:
            message = self._error_text()
            self._pgconn.finish()
            raise postgres_error(message, doing="cannot open a replication connection", dsn=dsn)
        self.streaming = False
        #: Whether START_REPLICATION asked for in-progress transactions (protocol 2).
        self.stream_in_progress = False

    def _error_text(self) -> str:
        return self._pgconn.get_error_message().strip() or "connection lost"

    def _exec(self, command: str) -> pq.abc.PGresult:
        with _classified(f"{command.split()[0]} failed", self._dsn):
            result = self._pgconn.exec_(command.encode())
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            message = (result.error_message or self._pgconn.error_message).decode(errors="replace")
            raw_state = result.error_field(pq.DiagnosticField.SQLSTATE)
            sqlstate = raw_state.decode() if raw_state else None
            if self._pgconn.status != pq.ConnStatus.OK:
                raise postgres_error(
                    message, doing=f"{command.split()[0]} failed", dsn=self._dsn, sqlstate=sqlstate
                )
            raise _ReplicationCommandError(message.strip(), sqlstate)
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
            raise postgres_error(
                str(e), doing=f"cannot create slot {name!r}", dsn=self._dsn, sqlstate=e.sqlstate
            ) from e
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
        with _classified("START_REPLICATION failed", self._dsn):
            self._pgconn.send_query(command.encode())
            result = self._pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = (result.error_message.decode(errors="replace") if result else "").strip()
            raw_state = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            sqlstate = raw_state.decode() if raw_state else None
            if _slot_is_gone(sqlstate, message) and self._pgconn.status == pq.ConnStatus.OK:
                raise SlotLostError(
                    f"replication slot {slot!r} cannot be streamed from: {message} "
                    f"[SQLSTATE {sqlstate}]"
                )
            if sqlstate == _SLOT_BUSY_STATE:
                raise SourceConnectionError(f"START_REPLICATION failed: {message}")
            raise postgres_error(
                message or self._error_text(),
                doing="START_REPLICATION failed",
                dsn=self._dsn,
                sqlstate=sqlstate,
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
        except psycopg.Error as e:
            raise postgres_error(e, doing="replication stream lost", dsn=self._dsn) from e
        if nbytes < 0:
            self._copy_ended()
        return data

    def read_buffered_rows(self, builder: Any, limit: int) -> memoryview | None:
        """Hand the frames libpq has already received to ``builder`` (a compiled
        :class:`~cdc.postgres.protocol.compiled.ColumnBuilder`), which appends the row
        changes among them to its columns, until it holds ``limit`` rows.

        Returns the first frame it did not take (``builder.code`` says why; handle it as
        one from :meth:`read_frame`), or ``None`` when nothing more is buffered. Never
        waits for the network: use :meth:`read_frame` for that.
        """
        try:
            nbytes, data = builder.drain(self._pgconn.get_copy_data, limit)
        except psycopg.Error as e:
            raise postgres_error(e, doing="replication stream lost", dsn=self._dsn) from e
        if nbytes < 0:
            self._copy_ended()
        return data if nbytes > 0 else None

    def spill_buffered_changes(
        self, builder: Any, out: bytearray, max_bytes: int
    ) -> tuple[memoryview | None, int]:
        """Inside a protocol-2 stream block: the in-stream changes libpq has already
        received, appended to ``out`` as spill records by ``builder`` (a compiled
        ColumnBuilder, see ``drain_spill``) until ``out`` holds ``max_bytes``.

        Returns the first frame that is not such a change (handle it as one from
        :meth:`read_frame`), or ``None``; and how many records were appended. Never waits.
        """
        try:
            nbytes, data, records = builder.drain_spill(self._pgconn.get_copy_data, out, max_bytes)
        except psycopg.Error as e:
            raise postgres_error(e, doing="replication stream lost", dsn=self._dsn) from e
        if nbytes < 0:
            self._copy_ended()
        return (data if nbytes > 0 else None), records

    def _copy_ended(self) -> NoReturn:
        # The server ended the COPY (e.g. it is shutting down).
        self.streaming = False
        result = self._pgconn.get_result()
        detail = result.error_message.decode(errors="replace").strip() if result else ""
        raw_state = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
        raise postgres_error(
            detail or self._error_text(),
            doing="replication stream ended",
            dsn=self._dsn,
            sqlstate=raw_state.decode() if raw_state else None,
        )

    def send_status(self, *, write_lsn: int, flush_lsn: int, reply_requested: bool = False) -> None:
        """Tell the server what is received (write) and durable downstream (flush)."""
        frame = standby_status_update(
            write_lsn=write_lsn,
            flush_lsn=flush_lsn,
            apply_lsn=flush_lsn,
            reply_requested=reply_requested,
        )
        with _classified("cannot send standby status", self._dsn):
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
