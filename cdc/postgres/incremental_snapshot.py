"""Incremental snapshots: copying one table's rows again while streaming goes on.

Some rows reach a table without any row-level WAL, so the stream never carries them:

* a table added to the publication while streaming (``ALTER PUBLICATION ... ADD TABLE``, or
  ``cdc run --tables`` growing): its existing rows predate the publication;
* ``ALTER TABLE ... ADD COLUMN ... DEFAULT``: existing rows gain the default silently;
* ``ALTER TABLE ... ALTER COLUMN ... TYPE``: the table is rewritten (``USING`` may change
  values), again without row events.

For each, the table is copied inside the exported snapshot of a *temporary* replication slot.
That snapshot holds exactly the transactions committed before the slot's consistent point
``cp``; its rows are written at position ``(cp - 1, seq)``. Before writing them, the main
stream is caught up to ``cp`` (every change committed before ``cp`` is handed to the sink)
and changes committed from ``cp`` on are held back until the copy is in. The changelog
therefore stays in position order, and the copy replaces exactly what it reflects.

Hazards: the temporary slot needs a free replication slot (``max_replication_slots``) while
the copy runs, and creating it waits for transactions already running on the server to
finish. A table is noticed when its next change arrives, or within ``PUBLICATION_POLL``
seconds for a table added to the publication.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from cdc.core.position import CapturePosition
from cdc.core.table_schema import TableSchema
from cdc.postgres.columnar import ChangeBatch
from cdc.postgres.errors import SourceConnectionError
from cdc.postgres.introspect import describe_tables
from cdc.postgres.replication import ReplicationConnection
from cdc.postgres.slots import published_tables
from cdc.postgres.snapshot import SnapshotReader
from cdc.postgres.source_queries import SourceQueries
from cdc.postgres.streaming import StreamingSource, StreamItem

log = logging.getLogger(__name__)

#: How often the publication is re-read for tables added to it.
PUBLICATION_POLL = 10.0
#: How often the main connection reports progress while a copy runs.
KEEPALIVE_EVERY = 5.0


class IncrementalSnapshots:
    """Decides which tables need a new copy, and makes it (see the module docstring).

    The pipeline calls :meth:`observe` for every change before it is written, and
    :meth:`run` between batches; ``run`` returns the stream items it held back.
    """

    def __init__(
        self,
        *,
        dsn: str,
        slot: str,
        publication: str,
        position: CapturePosition,
        save: Callable[[CapturePosition], None],
        sink: Any,
        flush: Callable[[], None],
        add_snapshot: Callable[..., None],
        queries: SourceQueries,
        baseline: Callable[[str], TableSchema | None],
        all_tables: bool,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.position = position
        self._save = save
        self._sink = sink
        self._flush = flush
        self._add_snapshot = add_snapshot
        self._queries = queries
        self._baseline = baseline
        # FOR ALL TABLES: a table that appears after the slot was created has had all its
        # rows streamed, so only schema changes call for a copy.
        self._all_tables = all_tables
        self._seen: dict[str, TableSchema] = {}
        self._last_seen: TableSchema | None = None
        self.queued: dict[str, tuple[str, str]] = {}
        self._next_poll = 0.0
        self.copied_rows = 0
        # Copies interrupted by a crash are redone.
        for name in position.pending_snapshots:
            self.queued[name] = self._split(name)

    def _split(self, name: str) -> tuple[str, str]:
        with self._queries.lookup(f"reading publication {self.publication}") as conn:
            published = published_tables(conn, self.publication)
        for key in published:
            if f"{key[0]}.{key[1]}" == name:
                return key
        schema, _, table = name.partition(".")
        return schema, table

    # -- deciding --------------------------------------------------------------------------

    def _tracks_tables(self) -> bool:
        return self.position.snapshotted is not None and not self._all_tables

    def poll_publication(self) -> None:
        """Queue tables of the publication that were never copied (rate-limited)."""
        now = time.monotonic()
        if now < self._next_poll or not self._tracks_tables():
            return
        self._next_poll = now + PUBLICATION_POLL
        done = self.position.snapshotted or set()
        with self._queries.lookup(f"reading publication {self.publication}") as conn:
            published = published_tables(conn, self.publication)
        for key in published:
            name = f"{key[0]}.{key[1]}"
            if name not in done:
                self.queued.setdefault(name, key)

    def observe(self, table: TableSchema) -> None:
        """Note the table shape of a change (or batch of changes); queue a copy when the
        shape change needs one."""
        if table is self._last_seen:  # the common case, checked without building the name
            return
        self._last_seen = table
        name = table.qualified_name
        previous = self._seen.get(name)
        if previous is table:
            return
        self._seen[name] = table
        if previous is None:
            previous = self._baseline(name)
        if previous is None:
            if self._tracks_tables() and name not in (self.position.snapshotted or set()):
                self.queued.setdefault(name, (table.schema, table.table))
            return
        if previous != table and self._rows_changed_silently(previous, table):
            log.info("%s changed shape in a way that rewrote its rows; copying it again", name)
            self.queued.setdefault(name, (table.schema, table.table))

    def _rows_changed_silently(self, old: TableSchema, new: TableSchema) -> bool:
        def ident(c: Any) -> Any:
            return c.attnum if c.attnum is not None else c.name

        before = {ident(c): c for c in old.columns}
        added = []
        for c in new.columns:
            prior = before.get(ident(c))
            if prior is None:
                added.append(c)
            elif (prior.type_oid, prior.type_modifier) != (c.type_oid, c.type_modifier):
                return True  # ALTER COLUMN TYPE rewrote every row
        if not added:
            return False
        # An added column with a default gives every existing row that value, silently.
        with self._queries.lookup(f"reading the column defaults of {new.qualified_name}") as conn:
            row = conn.execute(
                "SELECT bool_or(atthasdef OR atthasmissing) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attname = ANY (%s)",
                [sql.Identifier(new.schema, new.table).as_string(conn), [c.name for c in added]],
            ).fetchone()
        return bool(row and row[0])

    # -- copying -----------------------------------------------------------------------------

    def run(
        self, source: StreamingSource, handle: Callable[[StreamItem], None]
    ) -> list[StreamItem]:
        """Copy every queued table; returns the stream items held back while copying.

        The source hands on single events meanwhile (not columnar batches): the catch-up
        splits what it reads at the copy's consistent point, change by change."""
        held: list[StreamItem] = []
        columnar = source.columnar
        source.set_columnar(False)
        try:
            while self.queued and not held:
                name, key = next(iter(self.queued.items()))
                held = self._copy(name, key, source, handle)
                del self.queued[name]
        finally:
            source.set_columnar(columnar)
        return held

    def _copy(
        self,
        name: str,
        key: tuple[str, str],
        source: StreamingSource,
        handle: Callable[[StreamItem], None],
    ) -> list[StreamItem]:
        position = self.position
        stale = position.pending_snapshots.get(name)
        if stale is not None:
            self._sink.discard_snapshot([key], stale - 1)
        position.pending_snapshots[name] = None
        self._save(position)
        temp = ReplicationConnection(self.dsn)
        try:
            created = temp.create_slot(
                f"{self.slot[:40]}_copy_{os.getpid()}", export_snapshot=True, temporary=True
            )
            if created is None:
                raise SourceConnectionError(f"temporary slot for copying {name} already exists")
            cp = created.consistent_point
            position.pending_snapshots[name] = cp
            self._save(position)
            held = self._catch_up(source, cp, handle)
            with self._queries.lookup(f"describing {name}") as conn:
                schema = describe_tables(conn, [key]).get(key)
            rows = 0
            if schema is not None:
                self._sink.ensure_table(schema)
                read_at = datetime.now(UTC)
                last_status = time.monotonic()
                with SnapshotReader(self.dsn, created.snapshot_name) as reader:
                    for batch in reader.read_table(schema):
                        self._add_snapshot(
                            schema, batch, lsn=cp - 1, first_seq=rows, read_at=read_at
                        )
                        rows += batch.num_rows
                        if time.monotonic() - last_status > KEEPALIVE_EVERY:
                            source.send_status()  # the main connection must not time out
                            last_status = time.monotonic()
            self._flush()
        finally:
            temp.close()
        self.copied_rows += rows
        position.pending_snapshots.pop(name, None)
        if position.snapshotted is not None:
            position.snapshotted.add(name)
        self._save(position)
        log.info("copied %d rows of %s at %x", rows, name, cp)
        return held

    def _catch_up(
        self, source: StreamingSource, cp: int, handle: Callable[[StreamItem], None]
    ) -> list[StreamItem]:
        """Hand every change committed before ``cp`` to ``handle``; return the items read
        beyond it, which must wait until the copy is written."""
        while True:
            state = source.position
            if state.committed_lsn >= cp or (
                state.server_wal_end >= cp and not source.in_transaction
            ):
                return []
            # Ask for a keepalive: its WAL end tells when everything before cp was sent.
            source.send_status(reply_requested=True)
            items = source.read(timeout=0.5)
            for i, item in enumerate(items):
                assert not isinstance(item, ChangeBatch)  # run() reads event by event
                commit = item.commit_lsn
                if commit >= cp:
                    return items[i:]
                handle(item)
