"""The embedded-mode schema registry, stored as JSON files in the lake directory.

Layout (one immutable file per version of a table's shape)::

    <root>/_cdc/schemas/<schema>.<table>/v000001.json
    <root>/_cdc/schemas/<schema>.<table>/v000002.json
    ...

Each file holds ``{"schema_id", "version", "registered_at", "fingerprint", "schema"}`` where
``schema`` is :meth:`cdc.core.table_schema.TableSchema.to_dict`. Schema ids are derived from the
shape (:meth:`~cdc.core.table_schema.TableSchema.schema_id`), so every process computes the same id
for the same shape; the registry only adds the version history and the lookup by id.

In Kafka mode the registry lives in a compacted topic instead; this module is only the
embedded (lake-directory) flavour.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import pyarrow.fs as pafs

from catalog import lake_layout
from catalog.errors import TerminalCatalogError, TransientCatalogError, UnknownSchemaError
from cdc.core.table_schema import TableSchema

__all__ = [
    "SchemaRegistry",
    "SchemaVersion",
    "UnknownSchemaError",
]

SCHEMAS_DIR = "schemas"

# v000001.json; more digits are accepted so that version 1_000_000 still sorts and parses.
_VERSION_FILE = re.compile(r"^v(\d{6,})\.json$")


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One registered version of a table's shape.

    Example:
        >>> reg = SchemaRegistry("/tmp/lake")  # doctest: +SKIP
        >>> [v.version for v in reg.versions("public.orders")]  # doctest: +SKIP
        [1, 2]
    """

    schema_id: int
    version: int
    registered_at: datetime
    schema: TableSchema

    def to_json(self, *, indent: bool = False) -> bytes:
        """The stored form, in a registry file (indented) or a registry topic record."""
        return orjson.dumps(
            {
                "schema_id": self.schema_id,
                "version": self.version,
                "registered_at": self.registered_at.isoformat(),
                "fingerprint": self.schema.fingerprint(),
                "schema": self.schema.to_dict(),
            },
            option=(orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) if indent else orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> SchemaVersion:
        """The inverse of :meth:`to_json`; a naive time is read as UTC.

        Raises:
            orjson.JSONDecodeError, KeyError, TypeError, ValueError: ``raw`` is not a schema
                version; callers say where it came from.
        """
        data = orjson.loads(raw)
        return cls(
            schema_id=int(data["schema_id"]),
            version=int(data["version"]),
            registered_at=_parse_utc(data["registered_at"]),
            schema=TableSchema.from_dict(data["schema"]),
        )


def _check_qualified_name(qualified_name: str) -> None:
    # The name becomes one path segment; '/' would silently nest directories and '..'
    # would escape the registry directory.
    if (
        not qualified_name
        or "/" in qualified_name
        or "\x00" in qualified_name
        or qualified_name in (".", "..")
    ):
        raise TerminalCatalogError(
            f"table name {qualified_name!r} cannot be stored in the lake: it must be a "
            "non-empty 'schema.table' without '/' or NUL characters"
        )


class SchemaRegistry:
    """Versions of each captured table's shape, stored in the lake directory.

    Every version is one immutable JSON file under ``<root>/_cdc/schemas/<schema>.<table>/``.
    Files already read are cached in memory forever (they never change); directory
    listings are repeated by :meth:`latest`, :meth:`versions`, :meth:`tables` and on a cache
    miss in :meth:`get`, so versions registered by another process are picked up.

    Hazards:
        * Registering a shape equal to *any* earlier version of the table returns that
          version's id without writing. A table whose shape reverts (e.g. a column added,
          then dropped) therefore keeps reporting the newer shape from :meth:`latest`.
        * On a local filesystem concurrent writers of the same version are serialised by an
          exclusive hard-link, so no version is lost. Object stores have no exclusive
          create through pyarrow: two processes registering *different* new shapes of one
          table at the same moment can overwrite each other's file. Run one writer per
          table in embedded mode (the normal deployment); use Kafka mode otherwise.

    Args:
        root: lake root, a local path or an object-store URI (``s3://``, ``gs://``).
        storage_options: deltalake-style options; see :func:`catalog.lake_layout.filesystem`.

    Example:
        >>> from cdc.core.table_schema import ColumnSchema, TableSchema
        >>> reg = SchemaRegistry("/tmp/lake")  # doctest: +SKIP
        >>> s = TableSchema("public", "orders", (ColumnSchema("id", 20, is_key=True),))
        >>> reg.register(s) == s.schema_id()  # doctest: +SKIP
        True
        >>> reg.latest("public.orders") == s  # doctest: +SKIP
        True
    """

    def __init__(self, root: str, *, storage_options: dict[str, str] | None = None) -> None:
        self._root = root
        self._fs, root_path = lake_layout.filesystem(root, storage_options)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._base = f"{root_path}/{lake_layout.INTERNAL_DIR}/{SCHEMAS_DIR}"
        self._lock = threading.RLock()
        self._by_path: dict[str, SchemaVersion] = {}
        self._by_id: dict[int, SchemaVersion] = {}

    @property
    def root(self) -> str:
        return self._root

    # -- public API -----------------------------------------------------------------------

    def register(self, schema: TableSchema) -> int:
        """Record ``schema`` as a version of its table and return ``schema.schema_id()``.

        Idempotent: a shape equal to an existing version of the table returns that version's
        id without writing; a new shape is written as the next version.

        Example:
            >>> reg.register(s)  # doctest: +SKIP
            81985529216486895
        """
        qualified_name = schema.qualified_name
        _check_qualified_name(qualified_name)
        with self._lock:
            # A concurrent local writer may take the version number we computed; re-list
            # and retry a few times rather than overwrite its file.
            for _attempt in range(10):
                existing = self._load_table(qualified_name)
                for v in existing:
                    if v.schema == schema:
                        return v.schema_id
                version = existing[-1].version + 1 if existing else 1
                entry = SchemaVersion(
                    schema_id=schema.schema_id(),
                    version=version,
                    registered_at=datetime.now(UTC),
                    schema=schema,
                )
                path = self._version_path(qualified_name, version)
                if self._write_new(path, entry.to_json(indent=True)):
                    self._remember(path, entry)
                    return entry.schema_id
            raise TransientCatalogError(
                f"could not register a new schema version of {qualified_name} under "
                f"{self._base}: other writers kept taking the next version number"
            )

    def get(self, schema_id: int) -> TableSchema:
        """The shape registered under ``schema_id``.

        Raises:
            UnknownSchemaError: no table in this lake has that schema id.

        Example:
            >>> reg.get(s.schema_id()).qualified_name  # doctest: +SKIP
            'public.orders'
        """
        with self._lock:
            found = self._by_id.get(schema_id)
            if found is None:
                # Maybe another process registered it since we last looked.
                for name in self._list_table_dirs():
                    self._load_table(name)
                found = self._by_id.get(schema_id)
        if found is None:
            raise UnknownSchemaError(
                f"schema id {schema_id} is not registered in {self._base}; the events were "
                "written with a different lake root, or with the Kafka-mode registry"
            )
        return found.schema

    def latest(self, qualified_name: str) -> TableSchema | None:
        """The newest registered shape of ``schema.table``, or ``None`` if never registered.

        Example:
            >>> reg.latest("public.orders").key_columns  # doctest: +SKIP
            ('id',)
        """
        versions = self.versions(qualified_name)
        return versions[-1].schema if versions else None

    def versions(self, qualified_name: str) -> list[SchemaVersion]:
        """Every registered version of ``schema.table``, oldest first.

        Example:
            >>> [(v.version, v.schema_id) for v in reg.versions("public.orders")]  # doctest: +SKIP
            [(1, 81985529216486895)]
        """
        _check_qualified_name(qualified_name)
        with self._lock:
            return self._load_table(qualified_name)

    def tables(self) -> list[str]:
        """Qualified names (``schema.table``) of every table with at least one version.

        Example:
            >>> reg.tables()  # doctest: +SKIP
            ['public.orders']
        """
        with self._lock:
            return sorted(name for name in self._list_table_dirs() if self._load_table(name))

    # -- storage --------------------------------------------------------------------------

    def _table_dir(self, qualified_name: str) -> str:
        return f"{self._base}/{qualified_name}"

    def _version_path(self, qualified_name: str, version: int) -> str:
        return f"{self._table_dir(qualified_name)}/v{version:06d}.json"

    def _list(self, path: str, *, directories: bool) -> list[pafs.FileInfo]:
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TransientCatalogError(f"cannot list {path}: {exc}") from exc
        wanted = pafs.FileType.Directory if directories else pafs.FileType.File
        return [i for i in infos if i.type == wanted]

    def _list_table_dirs(self) -> list[str]:
        return [i.base_name for i in self._list(self._base, directories=True)]

    def _load_table(self, qualified_name: str) -> list[SchemaVersion]:
        """List the table's version files, read the ones not cached yet; oldest first."""
        found: list[SchemaVersion] = []
        for info in self._list(self._table_dir(qualified_name), directories=False):
            match = _VERSION_FILE.match(info.base_name)
            if match is None:
                continue  # temp files of an in-flight write, or foreign files
            cached = self._by_path.get(info.path)
            if cached is None:
                cached = self._read(info.path, qualified_name, int(match.group(1)))
                self._remember(info.path, cached)
            found.append(cached)
        found.sort(key=lambda v: v.version)
        return found

    def _remember(self, path: str, entry: SchemaVersion) -> None:
        self._by_path[path] = entry
        # If a race ever stored one shape twice, the first version keeps the id lookup.
        previous = self._by_id.get(entry.schema_id)
        if previous is None or previous.version > entry.version:
            self._by_id[entry.schema_id] = entry

    def _read(self, path: str, qualified_name: str, version: int) -> SchemaVersion:
        try:
            with self._fs.open_input_stream(path) as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise TransientCatalogError(f"{path} vanished while reading it") from exc
        except OSError as exc:
            raise TransientCatalogError(f"cannot read {path}: {exc}") from exc
        try:
            entry = SchemaVersion.from_json(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TerminalCatalogError(
                f"schema registry file {path} is not a valid schema version: {exc}"
            ) from exc
        # Files are written atomically, so a mismatch means someone edited or copied files
        # by hand; serving such a file would attach the wrong shape to data.
        if entry.version != version or entry.schema.qualified_name != qualified_name:
            raise TerminalCatalogError(
                f"schema registry file {path} holds version {entry.version} of "
                f"{entry.schema.qualified_name}, but its path says version {version} of "
                f"{qualified_name}"
            )
        return entry

    def _write_new(self, path: str, payload: bytes) -> bool:
        """Create ``path`` with ``payload`` unless it exists; False if it already existed."""
        if self._local:
            return _write_new_local(path, payload)
        try:
            if self._fs.get_file_info(path).type != pafs.FileType.NotFound:
                return False
            # An object-store PUT becomes visible whole or not at all, so there is no torn
            # file to hide; the existence check above is the best pyarrow offers (see the
            # class docstring).
            with self._fs.open_output_stream(path) as f:
                f.write(payload)
        except OSError as exc:
            raise TransientCatalogError(f"cannot write {path}: {exc}") from exc
        return True


def _write_new_local(path: str, payload: bytes) -> bool:
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link() fails if the target exists, unlike rename(): a concurrent writer of the
            # same version cannot be overwritten, and readers never see a partial file.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: fall back to rename, racy but still atomic.
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        _fsync_dir(directory)
        return True
    except OSError as exc:
        raise TransientCatalogError(f"cannot write {path}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    # Makes the new directory entry durable; not supported everywhere, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_utc(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)
