"""Every example of docs/querying.md runs against the demo's lake, written by the pipeline
from a real PostgreSQL: each SQL statement returns rows, each Python block runs, each
``cdc`` command exits 0 and prints a table."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog import Lake
from cdc.cli.app import app

PAGE = Path(__file__).resolve().parents[2] / "docs" / "querying.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)

pytestmark = pytest.mark.postgres


def blocks(language: str) -> list[str]:
    return [
        body for lang, body in _BLOCK.findall(PAGE.read_text(encoding="utf-8")) if lang == language
    ]


def sql_statements() -> list[str]:
    """The statements of the page's ```sql blocks (each ends with ``;`` at a line end)."""
    statements = []
    for body in blocks("sql"):
        statements += [s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip()]
    return statements


def commands() -> list[str]:
    return [
        line.removeprefix("$ ").strip()
        for body in blocks("console")
        for line in body.splitlines()
        if line.startswith("$ cdc ")
    ]


@pytest.fixture
def in_lake_parent(demo_lake: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The examples say ``./lake``: run them where the demo's lake is ``./lake``."""
    assert demo_lake.name == "lake"
    monkeypatch.chdir(demo_lake.parent)
    monkeypatch.delenv("CDC_LAKE__PATH", raising=False)
    return demo_lake


def test_the_page_has_examples_of_each_kind() -> None:
    """The tests below would pass vacuously if the page's blocks were not found."""
    statements = sql_statements()
    for name in ("_changes", "_as_of(", "_as_of_lsn(", "_history"):
        assert any(name in s for s in statements), f"no SQL example uses {name}"
    python = "\n".join(blocks("python"))
    for call in ("lake.current(", "as_of=", "lake.changes(", "lake.history(", "lake.sql("):
        assert call in python, f"no Python example calls {call}"
    assert any(c.startswith("cdc query ") for c in commands())


@pytest.mark.parametrize("statement", sql_statements(), ids=lambda s: s.splitlines()[-1][:60])
def test_sql_example_runs(statement: str, in_lake_parent: Path) -> None:
    with Lake("./lake") as lake:
        result = lake.query(statement)
    assert result.num_rows > 0, f"no rows from:\n{statement}"
    if "live_versions" in statement:  # the page claims one open version per live row
        row = result.to_pylist()[0]
        assert row["live_versions"] == row["live_rows"] > 0


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: f"python-{len(c)}")
def test_python_example_runs(
    code: str, in_lake_parent: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, object] = {}
    exec(compile(code, str(PAGE), "exec"), namespace)
    out = capsys.readouterr().out
    assert "retail.inventory" in out and "product versions" in out, out


@pytest.mark.parametrize("command", commands(), ids=lambda c: c[:60])
def test_cli_example_runs(command: str, in_lake_parent: Path) -> None:
    args = shlex.split(command)
    assert args[0] == "cdc"
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    assert "┃" in result.output or "│" in result.output, result.output
