"""What a running pipeline does beside moving changes: heartbeats, signals and the slot guard.

* **Heartbeats** (``ops.heartbeat_seconds``): a non-transactional
  ``pg_logical_emit_message(false, 'cdc-heartbeat', ...)`` through the slot's database. It
  gives the slot WAL of its own database to decode when the published tables are quiet, and
  its trip back through the slot measures the end-to-end latency
  (``cdc_heartbeat_latency_seconds``).
* **Signals**: ``cdc snapshot --tables a,b`` emits a ``cdc-signal`` message; the pipeline that
  it names queues those tables for an incremental snapshot
  (:mod:`cdc.postgres.incremental_snapshot`), copied while streaming goes on.
* **The slot guard** (every ``ops.slot_check_seconds``): reads the slot's lag and
  ``wal_status``, warns above ``ops.lag_warn_bytes``, and raises :class:`SlotLostError`
  once PostgreSQL has invalidated the slot, which the pipeline turns into a stop or a
  re-snapshot (``ops.on_slot_lost``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from cdc.core.errors import ConfigError
from cdc.core.lsn import format_lsn
from cdc.core.settings import Settings
from cdc.metrics import Metrics
from cdc.postgres.errors import SlotLostError
from cdc.postgres.slots import (
    SlotStatus,
    emit_message,
    published_tables,
    slot_status,
    split_table_name,
)
from cdc.postgres.streaming import StreamingSource

__all__ = [
    "HEARTBEAT_PREFIX",
    "SIGNAL_PREFIX",
    "Operations",
    "lost_slot_message",
    "signal_snapshot",
]

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "cdc-heartbeat"
SIGNAL_PREFIX = "cdc-signal"


def lost_slot_message(slot: str) -> str:
    return (
        f"replication slot {slot!r} is lost (wal_status 'lost'): PostgreSQL removed WAL it "
        "still needed (max_slot_wal_keep_size), so the changes made meanwhile cannot be "
        "streamed. Restart with --on-slot-lost resnapshot to drop the slot, create a new one "
        "and copy every table again (the changelog records a truncate before the copy)"
    )


def signal_snapshot(conn: psycopg.Connection, *, pipeline: str, tables: list[str]) -> int:
    """Ask the running pipeline ``pipeline`` to copy ``tables`` again; the signal's LSN.

    The signal is a logical message through the source database, so it reaches the
    pipeline in WAL order, whichever host it runs on. Tables are validated when it arrives;
    names the publication does not cover are logged and skipped.

    Example:
        >>> signal_snapshot(conn, pipeline="shop", tables=["public.orders"])  # doctest: +SKIP
    """
    for name in tables:
        split_table_name(name)  # a malformed name is a ConfigError here, not in the pipeline
    content = orjson.dumps({"pipeline": pipeline, "action": "snapshot", "tables": tables})
    return emit_message(conn, SIGNAL_PREFIX, content.decode())


class Operations:
    """Called by the pipeline once per loop turn (:meth:`tick`); costs a clock read unless
    something is due."""

    def __init__(
        self,
        settings: Settings,
        *,
        connection: Callable[[], psycopg.Connection],
        metrics: Metrics | None,
        queue_snapshot: Callable[[str, tuple[str, str]], object],
    ) -> None:
        self.settings = settings
        self.ops = settings.ops
        self._connection = connection
        self.metrics = metrics
        self._queue_snapshot = queue_snapshot
        now = time.monotonic()
        self._next_heartbeat = now if self.ops.heartbeat_seconds else float("inf")
        self._next_check = now
        self._warned = False
        self.slot: SlotStatus | None = None
        self.heartbeat_latency: float | None = None

    def tick(self, source: StreamingSource) -> None:
        if source.messages:
            messages, source.messages = source.messages, []
            for message in messages:
                self._on_message(message.prefix, bytes(message.content), message.lsn)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + (self.ops.heartbeat_seconds or 0.0)
            self.heartbeat()
        if now >= self._next_check:
            self._next_check = now + self.ops.slot_check_seconds
            self.check_slot()

    # -- heartbeats and signals -------------------------------------------------------------

    def heartbeat(self) -> None:
        """Emit one heartbeat. A failure is logged, not raised: the stream itself notices a
        lost server."""
        content = orjson.dumps({"pipeline": self.settings.name, "ts": time.time()}).decode()
        try:
            lsn = emit_message(self._connection(), HEARTBEAT_PREFIX, content)
        except psycopg.Error as e:
            log.warning("cannot emit a heartbeat: %s", e)
            return
        if self.metrics is not None:
            self.metrics.heartbeats.inc()
        log.debug("heartbeat at %s", format_lsn(lsn), extra={"lsn": format_lsn(lsn)})

    def _on_message(self, prefix: str, content: bytes, lsn: int) -> None:
        try:
            data: Any = orjson.loads(content)
        except orjson.JSONDecodeError:
            log.warning("ignoring a %s message at %s that is not JSON", prefix, format_lsn(lsn))
            return
        if not isinstance(data, dict) or data.get("pipeline") != self.settings.name:
            return  # another pipeline's, on the same database
        if prefix == HEARTBEAT_PREFIX and isinstance(data.get("ts"), int | float):
            self.heartbeat_latency = max(0.0, time.time() - float(data["ts"]))
            if self.metrics is not None:
                self.metrics.heartbeat_latency.set(self.heartbeat_latency)
        elif prefix == SIGNAL_PREFIX and data.get("action") == "snapshot":
            published = set(published_tables(self._connection(), self.settings.publication_name))
            for name in data.get("tables") or []:
                try:
                    key = split_table_name(str(name))
                except ConfigError as e:
                    log.warning("snapshot signal: %s", e)
                    continue
                if key not in published:
                    log.warning(
                        "snapshot signal: %s.%s is not in publication %s; not copied",
                        *key,
                        self.settings.publication_name,
                    )
                    continue
                log.info(
                    "snapshot signal at %s: copying %s.%s again",
                    format_lsn(lsn),
                    *key,
                    extra={"table": f"{key[0]}.{key[1]}", "lsn": format_lsn(lsn)},
                )
                self._queue_snapshot(f"{key[0]}.{key[1]}", key)

    # -- the slot guard ----------------------------------------------------------------------

    def check_slot(self) -> SlotStatus | None:
        """Read the slot; update the lag metrics, warn, and raise :class:`SlotLostError`
        when PostgreSQL invalidated it. A failed query is logged (the stream reports a lost
        server itself)."""
        name = self.settings.slot_name
        try:
            slot = slot_status(self._connection(), name)
        except psycopg.Error as e:
            log.warning("cannot read the state of slot %s: %s", name, e)
            return None
        self.slot = slot
        if slot is None:
            return None
        m = self.metrics
        if slot.lost:
            if m is not None:
                m.slot_lost.inc()
            raise SlotLostError(lost_slot_message(name))
        lag = slot.lag_bytes or 0
        if m is not None:
            m.lag_bytes.set(lag)
            m.retained_bytes.set(slot.retained_bytes or 0)
        over = lag > self.ops.lag_warn_bytes
        if over and not self._warned:
            log.warning(
                "slot %s lags %d bytes (above %d); wal_status %s, safe_wal_size %s",
                name,
                lag,
                self.ops.lag_warn_bytes,
                slot.wal_status,
                slot.safe_wal_size,
                extra={"slot": name, "lag_bytes": lag, "wal_status": slot.wal_status},
            )
        elif not over and self._warned:
            log.info("slot %s lag is back under %d bytes", name, self.ops.lag_warn_bytes)
        self._warned = over
        if m is not None:
            m.lag_warning.set(1 if over else 0)
        return slot
