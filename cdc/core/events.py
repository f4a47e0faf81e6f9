"""The change-event model and its Debezium envelope.

A :class:`ChangeEvent` is what capture hands to a sink: one row change, with its values
already converted to Python values (see :mod:`cdc.core.pgtypes`) and ordered like the table's
columns. It is a plain slotted dataclass, not a validating model, because one is built per
changed row on the hot path; validation happens where events come from outside (Kafka).

:func:`debezium_envelope` turns an event into the Debezium change-event value, so any tool
that reads Debezium topics reads ours::

    {"before", "after", "source": {...}, "op", "ts_ms", "transaction"}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from cdc.core import pgtypes
from cdc.core.errors import ValueConversionError
from cdc.core.lsn import format_lsn
from cdc.core.table_schema import TableSchema

#: c insert, u update, d delete, r snapshot read, t truncate.
Op = Literal["c", "u", "d", "r", "t"]

CONNECTOR_VERSION = "0.1.0"


@dataclass(slots=True)
class ChangeEvent:
    """One row change of one table.

    Attributes:
        op: What happened to the row.
        table: The table's shape when the change was written; ``before`` and ``after`` hold
            one value per ``table.columns``.
        before: Old values for ``u`` (only when PostgreSQL sent them: the key columns, or
            every column under REPLICA IDENTITY FULL; others are ``None``) and ``d``.
        after: New values for ``c``, ``u`` and ``r``.
        commit_lsn: LSN of the commit record of the source transaction. Together with
            ``seq`` it orders every change of a table and identifies it for deduplication.
        seq: Position of the change within its transaction (0-based).
        txid: Source transaction id (``None`` for snapshot reads).
        commit_ts: Commit time of the source transaction (UTC).
        lsn: WAL position of this change itself (Debezium's ``source.lsn``).
        unchanged_toast: Names of columns whose TOASTed value PostgreSQL did not resend
            because it did not change. Their slot in ``after`` is ``None``: it means
            "unchanged", not NULL.
        fallback: Exact text of values their typed form cannot hold (``numeric`` NaN,
            ``infinity`` dates, multi-dimensional arrays...), by column name. Their slot in
            ``before``/``after`` is ``None``; the text is the value.
        size_bytes: Approximate wire size, used by sinks to bound buffer memory.
    """

    op: Op
    table: TableSchema
    before: tuple[Any, ...] | None
    after: tuple[Any, ...] | None
    commit_lsn: int
    seq: int
    txid: int | None
    commit_ts: datetime
    lsn: int
    unchanged_toast: tuple[str, ...] = ()
    fallback: dict[str, str] | None = None
    size_bytes: int = 0
    ts_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)


def _row_dict(
    table: TableSchema,
    values: tuple[Any, ...] | None,
    fallback: dict[str, str] | None,
    texts: dict[str, str],
) -> dict[str, Any] | None:
    """Encode one row image; values Debezium's encoding cannot hold (numeric NaN in a
    Connect Decimal) become null, and their text joins ``texts``.

    The general path: :class:`cdc.kafka.event_encoder.EventEncoder` compiles one per table for
    the common case and falls back to this one; the two must give the same JSON."""
    if values is None:
        return None
    row: dict[str, Any] = {}
    for col, value in zip(table.columns, values, strict=True):
        if fallback and col.name in fallback:
            texts[col.name] = fallback[col.name]
            row[col.name] = None
            continue
        if value is None:
            row[col.name] = None
            continue
        try:
            row[col.name] = pgtypes.debezium_encoder(col.type_oid, col.type_modifier)(value)
        except ValueConversionError:
            texts[col.name] = str(value)
            row[col.name] = None
    return row


def transaction_id(event: ChangeEvent) -> str:
    """Debezium's ``transaction.id`` of ``event``: ``<txid>:<commit LSN>``."""
    return f"{event.txid}:{format_lsn(event.commit_lsn)}"


def commit_millis(commit_ts: datetime) -> int:
    """``source.ts_ms`` of a change committed at ``commit_ts``. One expression for every
    encoding path (per event, per batch): float rounding makes the result of another
    formula differ by one in rare cases, and the paths must give the same bytes."""
    return int(commit_ts.timestamp() * 1000)


def envelope_payload(
    event: ChangeEvent,
    *,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    server_name: str,
    database: str,
    commit_ts_ms: int,
    transaction_id: str | None,
    commit_ts_us: int | None = None,
) -> dict[str, Any]:
    """The envelope's layout around row images already encoded (key order included, which
    the JSON bytes depend on). :func:`debezium_envelope` encodes the rows and calls it; the
    Kafka encoder's fast path calls it with its own compiled rows and cached values.

    ``commit_ts_us``: also the commit time in microseconds, as ``source.ts_us`` and
    ``source.ts_ns`` (Debezium 2.6+), after ``source.xmin``."""
    source = {
        "version": CONNECTOR_VERSION,
        "connector": "postgresql",
        "name": server_name,
        "ts_ms": commit_ts_ms,
        "snapshot": "true" if event.op == "r" else "false",
        "db": database,
        "sequence": f'[null,"{event.lsn}"]',
        "schema": event.table.schema,
        "table": event.table.table,
        "txId": event.txid,
        "lsn": event.lsn,
        "xmin": None,
    }
    if commit_ts_us is not None:
        source["ts_us"] = commit_ts_us
        source["ts_ns"] = commit_ts_us * 1000
    return {
        "before": before,
        "after": after,
        "source": source,
        "op": event.op,
        "ts_ms": event.ts_ms,
        "transaction": None
        if transaction_id is None
        else {
            "id": transaction_id,
            "total_order": event.seq + 1,
            "data_collection_order": None,
        },
    }


def debezium_envelope(event: ChangeEvent, *, server_name: str, database: str) -> dict[str, Any]:
    """The Debezium change-event value of ``event`` (the ``payload`` part).

    Values use Debezium's default encodings (see docs/type-mapping.md). Columns listed in
    ``unchanged_toast`` are left out of ``after`` instead of being sent as a placeholder.
    Values without a typed form are null in ``before``/``after`` and keep their exact text
    in an extra top-level ``cdc_fallback`` object (``{column: text}``), which Debezium
    consumers ignore rather than misread as a wrongly encoded number.

    Example:
        >>> env = debezium_envelope(event, server_name="shop", database="shop")  # doctest: +SKIP
        >>> env["op"], env["source"]["table"]  # doctest: +SKIP
        ('c', 'orders')
    """
    texts: dict[str, str] = {}
    # event.fallback belongs to the stored image: after, or before for a delete.
    after = _row_dict(event.table, event.after, event.fallback, texts)
    if after is not None and event.unchanged_toast:
        for name in event.unchanged_toast:
            after.pop(name, None)
    envelope = envelope_payload(
        event,
        before=_row_dict(
            event.table, event.before, event.fallback if event.op == "d" else None, texts
        ),
        after=after,
        server_name=server_name,
        database=database,
        commit_ts_ms=commit_millis(event.commit_ts),
        transaction_id=None if event.txid is None else transaction_id(event),
    )
    if texts:
        envelope["cdc_fallback"] = texts
    return envelope
