"""Blind appends to a Delta table on a local filesystem, at a cost that does not grow with
the table.

Why: a delta-rs commit (``write_deltalake``) brings the table's whole state up to date,
file list included, so a commit of a few rows costs 10-15 ms of CPU on a new table and 30-60
ms once it holds a few hundred files. A changelog only ever appends, and an append reads
nothing of the table: :class:`LocalAppender` writes the Parquet files and the commit's log
entry itself, for 1-3 ms. That is what lets ``cdc run`` keep hundreds of busy tables
fresh on two cores (``benchmarks/many_tables.py``).

A commit is ``_delta_log/<version>.json``, created only if absent: a complete temporary
file hard-linked to its name, atomic on a POSIX filesystem (delta-rs commits the same way on
a local disk). When the version is taken, another writer committed first (``cdc jobs
compact``, retention, or this sink through delta-rs); the appender reads the commits it
missed and tries the next version. An append conflicts with none of them, except:

* a commit that changed the table's schema or protocol: the append is not made
  (:meth:`LocalAppender.append` returns ``None``) and the caller commits through delta-rs,
  which checks the rows against the new schema; its Parquet files stay unreferenced until
  ``cdc jobs vacuum`` removes them;
* a commit that set one of this append's app transactions: another writer is using the
  same app id, which the exactly-once watermarks forbid, so the append fails.

Only what this writer can do right is accepted (:func:`open_appender`,
:meth:`LocalAppender.accepts`): a table with no invariants, constraints, generated or
identity columns, column mapping or writer features beyond those listed in
``_WRITER_FEATURES``; partition columns of date or integer types; rows whose every column
is one of the table's, of the same Delta type. Anything else goes to delta-rs.

Hazards:
    * Local filesystems only. On an object store, "create if absent" needs a conditional
      PUT that pyarrow does not offer; there delta-rs commits. So it does on a local
      filesystem without hard links (some network mounts).
    * A log without checkpoints makes every reader replay every JSON entry. delta-rs writes
      a checkpoint as part of every ``delta.checkpointInterval``-th commit (default 100);
      so does this appender, in the committing thread, and it cleans up expired log
      entries then, as delta-rs does.
    * Neither this appender nor delta-rs's local store calls ``fsync``: a process killed at
      any point leaves a consistent table, a machine that loses power may not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.exceptions import DeltaError

from sinks.errors import TransientSinkError

log = logging.getLogger(__name__)

__all__ = ["LocalAppender", "file_stats", "local_path", "log_state", "open_appender"]

#: Writer features whose rules an append keeps by itself: none asks anything of an added
#: file that this writer does not do (invariants and check constraints are refused below
#: when the table has any).
_WRITER_FEATURES = frozenset(
    {"appendOnly", "invariants", "checkConstraints", "changeDataFeed", "timestampNtz"}
)
_MAX_WRITER_VERSION = 7
#: Field metadata that asks a writer to compute or check values.
_FIELD_RULES = ("delta.invariants", "delta.generationExpression", "delta.identity")
_DEFAULT_CHECKPOINT_INTERVAL = 100
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
#: Strings up to this length get exact min/max statistics; longer ones none (truncating a
#: maximum would make it smaller than the value, and readers would skip the file wrongly).
_MAX_STAT_STRING = 64
_CLIENT = "cdc-lakehouse"
_COMMIT_NAME = re.compile(r"\d{20}\.json")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def local_path(uri: str) -> str | None:
    """The filesystem path of a table URI, or ``None`` when it is not on a local disk.

    Example:
        >>> local_path("file:///lake/shop.orders/changes"), local_path("s3://b/t")
        ('/lake/shop.orders/changes', None)
    """
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return None if "://" in uri else uri


def _types(schema: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """``{name: (Delta type as JSON, nullable)}`` of a Delta schema's top-level fields."""
    return {
        f["name"]: (json.dumps(f["type"], sort_keys=True), bool(f.get("nullable", True)))
        for f in schema["fields"]
    }


def open_appender(uri: str) -> LocalAppender | None:
    """An appender for the Delta table at ``uri``, or ``None`` when appends must go through
    delta-rs: the table is not on a local disk, does not exist yet, or has a feature this
    writer does not keep (see the module's docstring).

    Reads only what an append needs from the log (:func:`log_state`), not the file list.

    Example:
        >>> appender = open_appender("./lake/shop.orders/changes")  # doctest: +SKIP
        >>> appender.append(rows, transactions=[("shop:lsn", 42)])  # doctest: +SKIP
        17
    """
    path = local_path(uri)
    if path is None or not _links_work(path):
        return None
    state = log_state(path)
    if state is None:
        return None
    version, protocol, metadata = state
    config = metadata.get("configuration") or {}
    schema = json.loads(metadata["schemaString"])
    if (
        protocol.get("minWriterVersion", 0) > _MAX_WRITER_VERSION
        or not set(protocol.get("writerFeatures") or ()) <= _WRITER_FEATURES
        or config.get("delta.columnMapping.mode", "none") != "none"
        or any(key.startswith("delta.constraints.") for key in config)
        or any(
            key.startswith(_FIELD_RULES) for f in schema["fields"] for key in f.get("metadata", {})
        )
    ):
        return None
    fields = _types(schema)
    partitions = list(metadata.get("partitionColumns") or ())
    for name in partitions:
        if json.loads(fields[name][0]) not in ("date", "byte", "short", "integer", "long"):
            return None
    return LocalAppender(
        path,
        version=version,
        fields=fields,
        partition_columns=partitions,
        checkpoint_interval=int(
            config.get("delta.checkpointInterval", _DEFAULT_CHECKPOINT_INTERVAL)
        ),
    )


def log_state(path: str) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """``(newest version, protocol, metaData)`` of the Delta table at the local ``path``,
    read from its newest checkpoint (only those two columns) and the commits after it;
    ``None`` when there is no table, or a log this reader does not follow (a checkpoint
    in several parts or in the V2 form: delta-rs is asked instead).

    Opening the table with delta-rs costs 10-30 ms per table (it lists every file); this
    costs well under one, which matters when a pipeline starts with hundreds of tables.

    Example:
        >>> log_state("./lake/shop.orders/changes")[0]  # doctest: +SKIP
        12
    """
    try:
        return _read_log_state(os.path.join(path, "_delta_log"))
    except (OSError, ValueError, KeyError, pa.ArrowException):
        # No table, or a log changing under the reader (a checkpoint being written, old
        # commits being cleaned up): delta-rs commits this time, and knows what to do.
        return None


def _read_log_state(log_dir: str) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    names = os.listdir(log_dir)
    versions = sorted(int(n[:20]) for n in names if _COMMIT_NAME.fullmatch(n))
    protocol: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    checkpoint = -1
    last = None
    if "_last_checkpoint" in names:
        with open(os.path.join(log_dir, "_last_checkpoint")) as f:
            last = json.load(f)
    if last is not None:
        if "parts" in last or "v2Checkpoint" in last:
            return None
        checkpoint = int(last["version"])
        state = pq.read_table(
            os.path.join(log_dir, f"{checkpoint:020d}.checkpoint.parquet"),
            columns=["protocol", "metaData"],
        )
        state = state.filter(pc.or_(pc.is_valid(state["protocol"]), pc.is_valid(state["metaData"])))
        for row in state.to_pylist():
            protocol = row["protocol"] or protocol
            metadata = row["metaData"] or metadata
        if metadata is not None and isinstance(metadata.get("configuration"), list):
            metadata["configuration"] = dict(metadata["configuration"])  # an Arrow map
    newer = [v for v in versions if v > checkpoint]
    if newer != list(range(checkpoint + 1, checkpoint + 1 + len(newer))):
        return None  # a gap: not a log this reader follows
    for version in newer:
        with open(os.path.join(log_dir, f"{version:020d}.json")) as f:
            for line in f:
                if '"protocol"' in line or '"metaData"' in line:
                    action = json.loads(line)
                    protocol = action.get("protocol", protocol)
                    metadata = action.get("metaData", metadata)
    if protocol is None or metadata is None:
        return None
    return (newer[-1] if newer else checkpoint), protocol, metadata


def _links_work(path: str) -> bool:
    """Whether the filesystem under ``path`` makes hard links (some network mounts do
    not; there delta-rs commits, with its own fallback)."""
    probe = os.path.join(path, "_delta_log", f".link-probe-{uuid.uuid4()}")
    if not os.path.isdir(os.path.dirname(probe)):
        return False  # no table yet
    try:
        with open(probe, "wb"):
            pass
        try:
            os.link(probe, probe + ".link")
            os.unlink(probe + ".link")
        finally:
            os.unlink(probe)
    except OSError:
        return False
    return True


@dataclass(slots=True)
class LocalAppender:
    """Appends rows to one Delta table on a local disk (see the module's docstring).

    Not thread-safe: one commit at a time, from any thread. Open it with
    :func:`open_appender`.
    """

    path: str
    version: int  # the newest version this appender knows of
    fields: dict[str, tuple[str, bool]]
    partition_columns: list[str]
    checkpoint_interval: int
    _accepted: list[pa.Schema] = field(default_factory=list)
    # File names: this appender's id and a counter (a uuid per file costs more than the
    # rest of naming it, on a busy machine).
    _id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _files: int = 0

    def accepts(self, data: pa.Table) -> bool:
        """Whether ``data`` can be appended as it is: every column is one of the table's,
        of the same Delta type, the partition columns are there, and no column the table
        declares NOT NULL holds a null. A ``False`` asks for a delta-rs commit, which
        evolves the schema or says why the rows do not fit."""
        if not any(data.schema.equals(s) for s in self._accepted):
            try:
                incoming = _types(json.loads(Schema.from_arrow(data.schema).to_json()))
            except (ValueError, TypeError, pa.ArrowException):
                return False  # a type Delta has no name for: let delta-rs say so
            if any(self.fields.get(n, (None,))[0] != t for n, (t, _) in incoming.items()):
                return False
            if not set(self.partition_columns) <= incoming.keys():
                return False
            self._accepted.append(data.schema)
        names = data.schema.names
        return all(
            n in names and data[n].null_count == 0
            for n, (_, nullable) in self.fields.items()
            if not nullable
        )

    def append(self, data: pa.Table, *, transactions: Iterable[tuple[str, int]] = ()) -> int | None:
        """Commit ``data`` (which :meth:`accepts`) with the app ``transactions`` (``(app id,
        version)``), one Parquet file per partition; returns the version committed, or
        ``None`` when a commit made since this appender looked changed the table's schema
        or protocol (nothing is committed: commit through delta-rs).

        Raises:
            TransientSinkError: another writer committed one of the same app ids since
                this appender looked.
            OSError: the filesystem refused a write.
        """
        now = int(time.time() * 1000)
        txns = dict(transactions)
        adds = [self._write_file(part, values) for values, part in self._partitions(data)]
        entry = [
            {
                "commitInfo": {
                    "timestamp": now,
                    "operation": "WRITE",
                    "operationParameters": {"mode": "Append"},
                    "clientVersion": _CLIENT,
                    "operationMetrics": {
                        "num_added_files": len(adds),
                        "num_added_rows": data.num_rows,
                    },
                }
            },
            *({"txn": {"appId": a, "version": v, "lastUpdated": now}} for a, v in txns.items()),
            *({"add": add} for add in adds),
        ]
        body = "\n".join(json.dumps(action, separators=(",", ":")) for action in entry)
        while True:
            version = self.version + 1
            if self._create(version, body.encode()):
                break
            if not self._catch_up(txns):
                return None
        self.version = version
        if (version + 1) % self.checkpoint_interval == 0:
            self._checkpoint(version)
        return version

    def _partitions(self, data: pa.Table) -> Iterable[tuple[dict[str, str | None], pa.Table]]:
        """``data`` split by its partition values, as Delta writes them (text, or ``None``
        for a null)."""
        if not data.num_rows:
            return  # a commit of app transactions only
        if not self.partition_columns:
            yield {}, data
            return
        keys = data.select(self.partition_columns)
        rest = data.drop_columns(self.partition_columns)
        if all(_single_value(column) for column in keys.columns):  # the usual case, cheaply
            row = {name: keys[name][0].as_py() for name in self.partition_columns}
            yield {k: _partition_text(v) for k, v in row.items()}, rest
            return
        for row in keys.group_by(self.partition_columns).aggregate([]).to_pylist():
            values = {k: _partition_text(v) for k, v in row.items()}
            mask = None
            for name, value in row.items():
                column = keys[name]
                match = pc.is_null(column) if value is None else pc.equal(column, value)
                mask = match if mask is None else pc.and_(mask, match)
            yield values, rest.filter(mask)

    def _write_file(self, data: pa.Table, values: dict[str, str | None]) -> dict[str, Any]:
        directory = "/".join(f"{k}={_HIVE_NULL if v is None else v}" for k, v in values.items())
        self._files += 1
        name = f"part-{self._files:05d}-{self._id}-c000.snappy.parquet"
        relative = f"{directory}/{name}" if directory else name
        target = os.path.join(self.path, relative)
        # Encoded in memory, then written with one call: pyarrow's own file output costs
        # more than the encoding for files this small. No dictionaries: a few rows gain
        # nothing from them (``cdc jobs compact`` rewrites the files larger).
        encoded = pa.BufferOutputStream()
        pq.write_table(data, encoded, compression="snappy", use_dictionary=False)
        body = encoded.getvalue()
        try:
            f = open(target, "wb")  # noqa: SIM115 - closed below
        except FileNotFoundError:  # a new partition (or one a vacuum emptied and removed)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            f = open(target, "wb")  # noqa: SIM115
        with f:
            f.write(body)
        return {
            "path": relative,
            "partitionValues": values,
            "size": body.size,
            "modificationTime": int(time.time() * 1000),
            "dataChange": True,
            "stats": json.dumps(file_stats(data), separators=(",", ":")),
        }

    def _create(self, version: int, body: bytes) -> bool:
        """Create ``<version>.json`` with ``body`` unless it exists (then ``False``)."""
        log_dir = os.path.join(self.path, "_delta_log")
        temporary = os.path.join(log_dir, f".{version:020d}.json.{self._id}.tmp")
        with open(temporary, "wb") as f:
            f.write(body)
        try:
            os.link(temporary, os.path.join(log_dir, f"{version:020d}.json"))
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
        return True

    def _catch_up(self, txns: dict[str, int]) -> bool:
        """Read the commits made after :attr:`version` by others; ``False`` when one of
        them changed the schema or protocol."""
        version = self.version + 1
        while True:
            try:
                with open(os.path.join(self.path, "_delta_log", f"{version:020d}.json")) as f:
                    actions = [json.loads(line) for line in f if line.strip()]
            except FileNotFoundError:
                return True
            for action in actions:
                if "metaData" in action or "protocol" in action:
                    return False
                txn = action.get("txn")
                if txn is not None and txn.get("appId") in txns:
                    raise TransientSinkError(
                        f"{self.path}: version {version} was committed by another writer "
                        f"with the app id {txn['appId']!r}: two pipelines are writing this "
                        "table under one name"
                    )
            self.version = version
            version += 1

    def _checkpoint(self, version: int) -> None:
        """Checkpoint the log at ``version`` and drop expired entries, as delta-rs does
        after its commits; the commit has landed, so a failure here is only logged."""
        try:
            table = DeltaTable(self.path, version=version)
            table.create_checkpoint()
            table.cleanup_metadata()
        except (DeltaError, OSError) as e:  # the commit stands; the next checkpoint retries
            log.warning("checkpoint of %s at version %d failed: %s", self.path, version, e)


def _single_value(column: pa.ChunkedArray) -> bool:
    """Whether every row of ``column`` (not empty) holds one value, or all are null."""
    if column.null_count:
        return column.null_count == len(column)
    bounds = pc.min_max(column)
    return bool(bounds["min"] == bounds["max"])


def _partition_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def file_stats(data: pa.Table) -> dict[str, Any]:
    """Delta's per-file statistics of ``data``: ``numRecords``, ``nullCount`` of each
    top-level column, and ``minValues`` / ``maxValues`` where they are exact and cheap:
    integers, dates, UTC timestamps (the minimum rounded down and the maximum up to the
    millisecond Delta keeps) and strings of up to 64 characters. Readers treat a missing
    statistic as unknown, never as a bound.

    Example:
        >>> file_stats(pa.table({"id": [3, 1, None]}))
        {'numRecords': 3, 'nullCount': {'id': 1}, 'minValues': {'id': 1}, 'maxValues': {'id': 3}}
    """
    nulls: dict[str, int] = {}
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    for name, column in zip(data.column_names, data.columns, strict=True):
        kind = column.type
        if pa.types.is_nested(kind):
            continue
        nulls[name] = column.null_count
        if column.null_count == len(column) or not _has_exact_bounds(kind):
            continue
        bounds = pc.min_max(column)
        low, high = bounds["min"], bounds["max"]
        if pa.types.is_timestamp(kind):
            per_ms = 1000 if kind.unit == "us" else 1
            low_ms = low.cast(pa.int64()).as_py() // per_ms
            high_ms = -(-high.cast(pa.int64()).as_py() // per_ms)
            try:
                lows[name], highs[name] = _millis(low_ms), _millis(high_ms)
            except OverflowError:
                continue  # beyond what datetime holds: no bound
        elif pa.types.is_date(kind):
            lows[name], highs[name] = low.as_py().isoformat(), high.as_py().isoformat()
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if pc.max(pc.utf8_length(column)).as_py() > _MAX_STAT_STRING:
                continue
            lows[name], highs[name] = low.as_py(), high.as_py()
        else:
            lows[name], highs[name] = low.as_py(), high.as_py()
    return {"numRecords": data.num_rows, "nullCount": nulls, "minValues": lows, "maxValues": highs}


def _has_exact_bounds(kind: pa.DataType) -> bool:
    if pa.types.is_timestamp(kind):
        return kind.tz is not None and kind.unit in ("ms", "us")
    return (
        pa.types.is_integer(kind)
        or pa.types.is_date32(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


def _millis(ms: int) -> str:
    """A UTC timestamp as Delta's statistics write it (``2024-01-31T12:00:00.250Z``)."""
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")[:-6] + "Z"
