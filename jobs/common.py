"""What every job shares: which tables to work on, opening Delta tables, retrying commits that
conflict with live writers, and parsing durations and sizes from options and config files.

Pure helpers (parsing, the retry policy) are kept apart from the IO ones so they can be
tested without a lake.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from catalog import lake_layout
from catalog.duckdb_views import discover_tables
from catalog.errors import CatalogError
from catalog.schema_registry import SchemaRegistry
from jobs.errors import CommitConflictError, TerminalJobError, TransientJobError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts of one commit that conflicts with concurrent writers, and the first back-off.
#: deltalake already retries a commit internally when the conflict checker allows it (an
#: append racing a compaction); what reaches us is a real conflict that needs a re-read.
DEFAULT_ATTEMPTS = 6
_FIRST_DELAY = 0.2
_MAX_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class LakeTable:
    """One captured table of a lake, as the jobs see it."""

    qualified_name: str
    changes_uri: str
    current_uri: str
    key_columns: tuple[str, ...]
    #: REPLICA IDENTITY FULL without a primary key: identical rows are distinct rows.
    every_column_key: bool = False


def lake_tables(
    lake: str,
    *,
    tables: Sequence[str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> list[LakeTable]:
    """The changelog tables of ``lake`` (all of them, or ``tables``), with their keys.

    Raises:
        TerminalJobError: a requested table has no changelog table in the lake.
        TransientJobError: the lake cannot be listed.

    Example:
        >>> [t.qualified_name for t in lake_tables("./lake")]  # doctest: +SKIP
        ['public.orders']
    """
    root = lake_layout.normalize_root(lake)
    try:
        found = discover_tables(root, storage_options=storage_options)
        registry = SchemaRegistry(root, storage_options=storage_options)
        if tables is not None:
            missing = sorted(set(tables) - set(found))
            if missing:
                raise TerminalJobError(
                    f"no changelog table for {', '.join(missing)} under {root} "
                    f"(found: {', '.join(found) or 'none'})"
                )
            found = [name for name in found if name in set(tables)]
        result = []
        for name in found:
            schema = registry.latest(name)
            result.append(
                LakeTable(
                    qualified_name=name,
                    changes_uri=lake_layout.changes_uri(root, name),
                    current_uri=lake_layout.current_uri(root, name),
                    key_columns=schema.key_columns if schema is not None else (),
                    every_column_key=schema is not None
                    and bool(schema.key_columns)
                    and set(schema.key_columns) == set(schema.column_names),
                )
            )
        return result
    except CatalogError as e:
        raise TransientJobError(f"cannot list the tables of {root}: {e}") from e


def open_table(uri: str, *, storage_options: dict[str, str] | None = None) -> DeltaTable | None:
    """The Delta table at ``uri``, or ``None`` if there is none.

    Raises:
        TransientJobError: the table exists but its log cannot be read right now.
    """
    try:
        if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
            return None
        return DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as e:
        raise TransientJobError(f"cannot read the Delta log of {uri}: {e}") from e


def with_conflict_retries(
    what: str,
    attempt: Callable[[], T],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[T, int]:
    """Run ``attempt`` until its Delta commit does not conflict; returns (result, conflicts).

    ``attempt`` must re-read the table state each time it is called: a conflict means a
    concurrent writer committed first, and the job's plan (which files to rewrite, which
    changes to fold) may be stale. Back-off is exponential with jitter, so two jobs that
    collided do not collide again in lock-step.

    Raises:
        CommitConflictError: every attempt conflicted. Nothing of the last attempt was
            committed (Delta commits are atomic), so running the job later is safe.
        TransientJobError, TerminalJobError: other deltalake errors, classified.
    """
    delay = _FIRST_DELAY
    for n in range(1, attempts + 1):
        try:
            return attempt(), n - 1
        except CommitFailedError as e:
            if n == attempts:
                raise CommitConflictError(
                    f"{what}: the commit conflicted with concurrent writers {attempts} times; "
                    f"nothing was committed by the last attempt, run the job again: {e}"
                ) from e
            log.info("%s: commit conflict (attempt %d of %d), retrying: %s", what, n, attempts, e)
            sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _MAX_DELAY)
        except (DeltaError, OSError) as e:
            if isinstance(e, TableNotFoundError):
                raise TerminalJobError(f"{what}: not a Delta table: {e}") from e
            raise TransientJobError(f"{what} failed: {e}") from e
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | float | int | timedelta) -> timedelta:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` (or seconds as a number) as a timedelta.

    Example:
        >>> parse_duration("36h")
        datetime.timedelta(days=1, seconds=43200)
    """
    if isinstance(text, timedelta):
        return text
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a duration cannot be negative: {text}")
        return timedelta(seconds=text)
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit s, m, h, d or w, e.g. '7d'"
        )
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()])


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str | int) -> int:
    """``"128MiB"``, ``"64MB"``, ``"1GiB"`` or a number of bytes, as bytes.

    Example:
        >>> parse_size("128MiB")
        134217728
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"a size must be positive: {text}")
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"invalid size {text!r}: use e.g. '128MiB', '64MB' or a byte count")
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return size


def elapsed(started: float) -> float:
    """Seconds since ``started`` (a ``time.monotonic()`` value), rounded for metrics."""
    return round(time.monotonic() - started, 4)
