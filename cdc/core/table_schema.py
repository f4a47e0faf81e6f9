"""The shape of a captured source table, shared by capture, sinks and the catalog.

A :class:`TableSchema` is built from a pgoutput Relation message (streaming) or from the
system catalogs (snapshot). Its :meth:`~TableSchema.fingerprint` identifies one version of
the table's shape; the schema registry keys versions by it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from cdc.core.errors import ConfigError

ReplicaIdentity = Literal["default", "nothing", "full", "index"]

#: pgoutput's one-letter replica identity codes.
REPLICA_IDENTITY_CODES: dict[str, ReplicaIdentity] = {
    "d": "default",
    "n": "nothing",
    "f": "full",
    "i": "index",
}


@dataclass(frozen=True, slots=True)
class ColumnSchema:
    """One column of a source table.

    ``type_modifier`` is PostgreSQL's ``atttypmod`` (-1 when the type has none); it carries
    e.g. the precision and scale of ``numeric(p, s)``. ``is_key`` marks the columns that
    identify a row: the primary key, or the replica-identity columns when there is no key.
    ``attnum`` is the column's number in the table, which survives a rename (so a renamed
    column can be followed across schema versions); ``None`` when unknown.
    """

    name: str
    type_oid: int
    type_modifier: int = -1
    is_key: bool = False
    attnum: int | None = None


@dataclass(frozen=True, slots=True)
class TableSchema:
    """A version of a source table's shape.

    Example:
        >>> s = TableSchema("public", "orders", (ColumnSchema("id", 20, is_key=True),))
        >>> s.qualified_name, s.key_columns
        ('public.orders', ('id',))
    """

    schema: str
    table: str
    columns: tuple[ColumnSchema, ...]
    replica_identity: ReplicaIdentity = "default"
    #: The pipeline rules that produced this shape from the source table's, as canonical
    #: JSON (see :mod:`transforms`); None for a source shape. Part of the fingerprint, so
    #: changing a table's rules records a new schema version.
    transforms: str | None = None

    @property
    def transform_rules(self) -> list[dict[str, Any]]:
        """The rules of :attr:`transforms`, decoded (empty for a source shape)."""
        return orjson.loads(self.transforms) if self.transforms else []

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)

    def to_dict(self) -> dict[str, Any]:
        data = self._to_dict()
        if self.transforms is not None:
            # Only when set, so that source shapes keep their fingerprints and ids.
            data["transforms"] = orjson.loads(self.transforms)
        return data

    def _to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "table": self.table,
            "replica_identity": self.replica_identity,
            "columns": [
                {
                    "name": c.name,
                    "type_oid": c.type_oid,
                    "type_modifier": c.type_modifier,
                    "is_key": c.is_key,
                    "attnum": c.attnum,
                }
                for c in self.columns
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableSchema:
        rules = data.get("transforms")
        return cls(
            schema=data["schema"],
            table=data["table"],
            replica_identity=data.get("replica_identity", "default"),
            transforms=None
            if rules is None
            else orjson.dumps(rules, option=orjson.OPT_SORT_KEYS).decode(),
            columns=tuple(
                ColumnSchema(
                    name=c["name"],
                    type_oid=int(c["type_oid"]),
                    type_modifier=int(c.get("type_modifier", -1)),
                    is_key=bool(c.get("is_key", False)),
                    attnum=c.get("attnum"),
                )
                for c in data["columns"]
            ),
        )

    def fingerprint(self) -> str:
        """A stable hex digest of the shape: equal shapes, equal fingerprints."""
        canonical = orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()

    def schema_id(self) -> int:
        """A positive 63-bit id derived from the fingerprint.

        Derived rather than allocated, so that any process computes the same id for the same
        shape without coordinating through a counter.
        """
        return int(self.fingerprint()[:15], 16)


def split_table_name(name: str) -> tuple[str, str]:
    """``"schema.table"`` or ``"table"`` (schema ``public``) into its two parts.

    Unquoted names fold to lower case, as PostgreSQL folds them; double quotes keep dots
    and case: ``'"My.Schema"."T"'`` is (``My.Schema``, ``T``). Glob characters (``*``,
    ``?``) are kept as they are, for patterns.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == '"':
            if quoted and i + 1 < len(name) and name[i + 1] == '"':
                current.append('"')
                i += 1
            else:
                quoted = not quoted
        elif ch == "." and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch if quoted else ch.lower())
        i += 1
    parts.append("".join(current))
    if quoted or not all(parts) or len(parts) > 2:
        raise ConfigError(f"invalid table name {name!r}: expected table or schema.table")
    return ("public", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
