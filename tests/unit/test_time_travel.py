"""Time travel and row history over hand-built changelogs (no PostgreSQL): for random
histories, ``Lake.current(as_of=t)`` equals the model's state at ``t`` and the history view's
versions valid at ``t`` are that state, before and after merges, compactions and retention;
moments before the retention horizon are refused with the horizon named."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.errors import TerminalCatalogError
from catalog.lake import Lake
from cdc.core.table_schema import ColumnSchema
from jobs.compact import compact
from jobs.merge import merge
from jobs.retention import retention
from tests.plugins.lake import CHANGELOG_EPOCH, change, register_table, write_changes

NAME = "My Schema.Odd"
SOURCE = pa.schema(
    [("K a", pa.int64()), ("k2", pa.string()), ("qty", pa.int32()), ("note", pa.string())]
)
COLUMNS = (
    ColumnSchema("K a", 20, is_key=True),
    ColumnSchema("k2", 25, is_key=True),
    ColumnSchema("qty", 23),
    ColumnSchema("note", 25),
)
KEYS = [(1, "x"), (1, None), (2, "x"), (None, None)]
HOURS_PER_LSN = 7  # several _cdc_date partitions, so retention has whole days to drop


def at(lsn: float) -> datetime:
    return CHANGELOG_EPOCH + timedelta(hours=lsn * HOURS_PER_LSN)


def rows_of(table: pa.Table) -> list[tuple]:
    return sorted(
        (tuple(r[c] for c in ("K a", "k2", "qty", "note")) for r in table.to_pylist()), key=repr
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[list[dict]], list[dict]]:
    """Commits (one LSN each) and the model state after each LSN (index = LSN)."""
    model: dict[int, tuple[int, str | None]] = {}
    states: list[dict] = [{}]
    commits: list[list[dict]] = []
    for lsn in range(1, draw(st.integers(2, 14)) + 1):
        rows = []
        for seq in range(draw(st.integers(1, 3))):
            present = sorted(model)
            absent = [i for i in range(len(KEYS)) if i not in model]
            kinds = ["truncate"] + ["insert"] * 4 * bool(absent)
            kinds += (["update", "toast", "delete"] * 2) if present else []
            kind = draw(st.sampled_from(kinds))
            qty = draw(st.integers(0, 9))
            if kind == "insert":
                k, note = draw(st.sampled_from(absent)), draw(st.sampled_from([None, "a", "b"]))
                model[k] = (qty, note)
                rows.append(change("c", lsn, seq, qty=qty, note=note, **key(k)))
            elif kind == "update":
                k, note = draw(st.sampled_from(present)), draw(st.sampled_from([None, "c"]))
                model[k] = (qty, note)
                rows.append(change("u", lsn, seq, qty=qty, note=note, **key(k)))
            elif kind == "toast":
                k = draw(st.sampled_from(present))
                model[k] = (qty, model[k][1])
                rows.append(change("u", lsn, seq, ["note"], qty=qty, **key(k)))
            elif kind == "delete":
                k = draw(st.sampled_from(present))
                del model[k]
                rows.append(change("d", lsn, seq, **key(k)))
            else:
                model.clear()
                rows.append(change("t", lsn, seq))
        commits.append(rows)
        states.append(dict(model))
    return commits, states


def key(i: int) -> dict:
    return {"K a": KEYS[i][0], "k2": KEYS[i][1]}


def expected(state: dict) -> list[tuple]:
    return sorted(((*KEYS[k], q, n) for k, (q, n) in state.items()), key=repr)


def check(lake: Lake, states: list[dict], first: int) -> None:
    history = lake.history(NAME).to_pylist()
    for lsn in range(first, len(states)):
        want = expected(states[lsn])
        # Half-way to the next commit: every change at or before lsn, none after.
        assert rows_of(lake.current(NAME, as_of=at(lsn + 0.5))) == want, f"as of {lsn}"
        assert rows_of(lake.current(NAME, as_of=lsn)) == want, f"as of LSN {lsn}"
        moment = at(lsn + 0.5)
        valid = [
            r
            for r in history
            if r["_valid_from"] <= moment and (r["_valid_to"] is None or r["_valid_to"] > moment)
        ]
        assert rows_of(pa.Table.from_pylist(valid)) == want if valid else not want
    live = [r for r in history if r["_valid_to"] is None]
    assert len(live) == len(states[-1])


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories(), st.integers(0, 13), st.booleans())
def test_as_of_and_history_follow_the_model(
    history: tuple[list[list[dict]], list[dict]], cut: int, compact_too: bool
) -> None:
    commits, states = history
    root = tempfile.mkdtemp(prefix="cdc-time-travel-")
    try:
        register_table(root, NAME, COLUMNS)
        for rows in commits:
            write_changes(root, NAME, rows, SOURCE, hours_per_lsn=HOURS_PER_LSN)
        with Lake(root) as lake:
            check(lake, states, 0)
        merge(root)
        if compact_too:
            compact(root)
        # Drop the whole days before the cut's: the horizon is the newest dropped commit.
        cut = min(cut, len(commits))
        now = midnight(at(cut).date() + timedelta(days=1))
        result = retention(root, keep=timedelta(days=1), now=now)["tables"][NAME]
        with Lake(root) as lake:
            if result.get("horizon") is None:
                check(lake, states, 0)
                return
            horizon = datetime.fromisoformat(result["horizon"])
            horizon_lsn = round((horizon - CHANGELOG_EPOCH) / timedelta(hours=HOURS_PER_LSN))
            assert at(horizon_lsn) == horizon
            check(lake, states, horizon_lsn)
            with pytest.raises(TerminalCatalogError, match="retention horizon"):
                lake.current(NAME, as_of=at(horizon_lsn - 0.5))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def test_before_the_horizon_is_an_error_naming_it(tmp_path: Path) -> None:
    root = str(tmp_path / "lake")
    register_table(root, NAME, COLUMNS)
    write_changes(
        root, NAME, [change("c", 1, qty=1, note="a", **key(0))], SOURCE, hours_per_lsn=HOURS_PER_LSN
    )
    write_changes(
        root,
        NAME,
        [change("u", 5, qty=2, unchanged=["note"], **key(0))],
        SOURCE,
        hours_per_lsn=HOURS_PER_LSN,
    )
    merge(root)
    # Drops the day of LSN 1 (2024-01-01 07:00); LSN 5 is on the next day.
    now = midnight(at(5).date())
    result = retention(root, keep=timedelta(0), now=now)["tables"][NAME]
    assert result["horizon"] == at(1).isoformat() == "2024-01-01T07:00:00+00:00"
    with Lake(root) as lake:
        with pytest.raises(TerminalCatalogError, match=r"horizon 2024-01-01T07:00:00\+00:00"):
            lake.current(NAME, as_of=at(0.5))
        with pytest.raises(TerminalCatalogError, match="horizon"):
            lake.current(NAME, as_of=0)
        assert rows_of(lake.current(NAME, as_of=at(1))) == [(1, "x", 1, "a")]
        # The unchanged TOASTed note comes from the base once its change is dropped.
        assert rows_of(lake.current(NAME, as_of=at(5))) == [(1, "x", 2, "a")]
        assert rows_of(lake.current(NAME, as_of="0/5")) == [(1, "x", 2, "a")]
        with pytest.raises(TerminalCatalogError, match="retention horizon"):
            lake.query('SELECT * FROM "My Schema"."Odd_as_of"(TIMESTAMPTZ \'2024-01-01\')')
        with pytest.raises(TerminalCatalogError, match="neither"):
            lake.current(NAME, as_of="yesterday")
        history = lake.history(NAME).to_pylist()
        assert [(r["qty"], r["note"], r["_cdc_op"], r["_cdc_lsn"]) for r in history] == [
            (1, "a", "c", 1),
            (2, "a", "u", 5),
        ]
        assert history[0]["_valid_to"] == history[1]["_valid_from"] == at(5)
        assert history[1]["_valid_to"] is None
