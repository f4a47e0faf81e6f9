"""Which changelog columns make up a table's columns today.

A changelog table keeps every column it ever had: a dropped column stays, and a renamed
column gets a new Delta column while its older rows keep the old one. The schema registry
knows each column's number (``attnum``), which a rename keeps, so a column of the current
shape is the coalesce of every name it has had; a dropped column is simply not one of them.
Per row exactly one of those names was written (the one the column had then), so the
coalesce picks the row's value, a real NULL included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cdc.core.table_schema import TableSchema


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Lineage:
    """A column of the table's latest shape and the changelog columns that hold its values,
    newest name first."""

    name: str
    sources: tuple[str, ...]

    def sql(self) -> str:
        if len(self.sources) == 1:
            return (
                _quote(self.sources[0])
                if self.sources[0] == self.name
                else (f"{_quote(self.sources[0])} AS {_quote(self.name)}")
            )
        return f"COALESCE({', '.join(_quote(s) for s in self.sources)}) AS {_quote(self.name)}"


def current_columns(
    versions: Sequence[TableSchema], changelog_columns: Sequence[str]
) -> list[Lineage]:
    """The latest shape's columns, each with the changelog columns that hold its values.

    ``versions`` are the table's schema versions, oldest first; ``changelog_columns`` the
    Delta table's columns. Without versions every non-metadata changelog column is its own
    lineage. A column of the latest shape not in the changelog yet (added, but no row written
    since) is left out until a row carries it.

    Example:
        >>> from cdc.core.table_schema import ColumnSchema as C
        >>> v1 = TableSchema("s", "t", (C("id", 23, attnum=1), C("name", 25, attnum=2)))
        >>> v2 = TableSchema("s", "t", (C("id", 23, attnum=1), C("title", 25, attnum=2)))
        >>> [l.sql() for l in current_columns([v1, v2], ["id", "name", "title"])]
        ['"id"', 'COALESCE("title", "name") AS "title"']
    """
    present = set(changelog_columns)
    if not versions:
        return [Lineage(c, (c,)) for c in changelog_columns]
    latest = versions[-1]
    live_names = {c.name for c in latest.columns}
    lineages = []
    for column in latest.columns:
        names = [column.name]
        if column.attnum is not None:
            for version in reversed(versions[:-1]):
                for old in version.columns:
                    # A name the latest shape uses for another column belongs to that one.
                    if (
                        old.attnum == column.attnum
                        and old.name not in names
                        and old.name not in live_names
                    ):
                        names.append(old.name)
        sources = tuple(n for n in names if n in present)
        if sources:
            lineages.append(Lineage(column.name, sources))
    return lineages


def renamed(lineages: Sequence[Lineage]) -> dict[str, str]:
    """``{old name: current name}`` for every renamed column."""
    return {old: lin.name for lin in lineages for old in lin.sources if old != lin.name}
