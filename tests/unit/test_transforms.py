"""The rules engine (transforms/), without servers: each rule, their order, the filter's
row-filter semantics on update sequences, masks against hashlib/hmac, the snapshot path."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.core.events import ChangeEvent
from cdc.core.settings import TransformRuleSettings, TransformSettings
from cdc.core.table_schema import ColumnSchema, TableSchema
from transforms import TransformConfigError, Transforms, mask_text, parse_mask

KEY = "unit-test-key"
NOW = datetime(2026, 1, 1, tzinfo=UTC)

PEOPLE = TableSchema(
    "crm",
    "People",
    (
        ColumnSchema("region", 25, is_key=True, attnum=1),
        ColumnSchema("Id", 20, is_key=True, attnum=2),
        ColumnSchema("email", 25, attnum=3),
        ColumnSchema("score", 23, attnum=4),
        ColumnSchema("price", 1700, (10 << 16 | 2) + 4, attnum=5),
        ColumnSchema("note", 25, attnum=6),
    ),
)


def engine(*rules: dict[str, Any], key: str | None = KEY) -> Transforms:
    return Transforms(
        TransformSettings(
            hash_key=key, rules=[TransformRuleSettings.model_validate(r) for r in rules]
        ),
        source="unit.toml",
    )


def event(
    op: str,
    after: tuple | None,
    before: tuple | None = None,
    seq: int = 0,
    table: TableSchema = PEOPLE,
    **extra: Any,
) -> ChangeEvent:
    return ChangeEvent(op, table, before, after, 100, seq, 7, NOW, 100 + seq, **extra)  # type: ignore[arg-type]


def row(n: int, email: str | None = "a@x", score: int | None = 1, note: str = "n") -> tuple:
    return ("eu", n, email, score, Decimal("1.50"), note)


def snapshot_batch(rows: list[tuple]) -> pa.Table:
    """``rows`` of PEOPLE as the snapshot reader hands them over: typed Arrow columns."""
    schema = pa.schema(
        [
            ("region", pa.string()),
            ("Id", pa.int64()),
            ("email", pa.string()),
            ("score", pa.int32()),
            ("price", pa.decimal128(10, 2)),
            ("note", pa.string()),
        ]
    )
    return pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema)


def digest(text: str) -> str:
    return hmac.new(KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


# -- masks -----------------------------------------------------------------------------------

TEXTS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.one_of(st.none(), TEXTS), min_size=1, max_size=20))
def test_hash_is_hmac_sha256_of_the_utf8_text(values: list[str | None]) -> None:
    t = engine({"tables": ["crm.*"], "mask": {"email": "hash"}})
    events = [event("c", row(i, email=v), seq=i) for i, v in enumerate(values)]
    out = t.apply(events)
    got = [e.after[2] for e in out]  # type: ignore[index]
    assert got == [None if v is None else digest(v) for v in values]
    # Deterministic: the same value hashes the same in another engine with the same key.
    again = engine({"tables": ["crm.*"], "mask": {"email": "hash"}}).apply(
        [event("c", row(0, email=v)) for v in values]
    )
    assert [e.after[2] for e in again] == got  # type: ignore[index]
    assert all(
        mask_text(parse_mask("hash"), v, KEY.encode()) == g
        for v, g in zip(values, got, strict=True)
    )


def test_hash_with_a_long_key_follows_rfc2104() -> None:
    long_key = "k" * 100  # longer than SHA-256's block: hashed first
    t = engine({"tables": ["crm.*"], "mask": {"email": "hash"}}, key=long_key)
    out = t.apply([event("c", row(1, email="é@x"))])
    expected = hmac.new(long_key.encode(), "é@x".encode(), hashlib.sha256).hexdigest()
    assert out[0].after[2] == expected  # type: ignore[index]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.one_of(st.none(), TEXTS), min_size=1, max_size=20), n=st.integers(0, 8))
def test_length_masks_match_their_definition(values: list[str | None], n: int) -> None:
    t = engine({"tables": ["crm.*"], "mask": {"email": f"keep_last:{n}", "note": f"truncate:{n}"}})
    events = [event("c", row(i, email=v, note=v or ""), seq=i) for i, v in enumerate(values)]
    for v, e in zip(values, t.apply(events), strict=True):
        kept, cut = e.after[2], e.after[5]  # type: ignore[index]
        if v is None:
            assert kept is None
            continue
        assert len(kept) == len(v)  # length kept
        assert kept == "*" * max(len(v) - n, 0) + (v[-n:] if n else "")
        assert cut == v[:n]
        assert kept == mask_text(parse_mask(f"keep_last:{n}"), v, b"")


def test_redact_and_null_keep_null_as_null() -> None:
    t = engine({"tables": ["crm.*"], "mask": {"email": "redact", "score": "null"}})
    out = t.apply([event("c", row(1)), event("c", row(2, email=None), seq=1)])
    assert [(e.after[2], e.after[3]) for e in out] == [("***", None), (None, None)]  # type: ignore[index]
    assert out[0].table.columns[3].type_oid == 23  # null keeps the column's type
    assert out[0].table.columns[2].type_oid == 25


def test_masks_on_non_text_columns_use_the_value_text() -> None:
    t = engine({"tables": ["crm.*"], "mask": {"price": "hash", "score": "keep_last:1"}})
    (out,) = t.apply([event("c", row(1, score=1234))])
    assert out.after[4] == digest("1.50") and out.after[3] == "***4"  # type: ignore[index]
    assert [c.type_oid for c in out.table.columns[3:5]] == [25, 25]


@pytest.mark.parametrize("spec", ["hash:3", "keep_last", "keep_last:-1", "shuffle", "truncate:x"])
def test_unknown_masks_are_refused(spec: str) -> None:
    with pytest.raises(TransformConfigError, match=r"transforms.rules\[0\].*unit.toml.*mask.email"):
        engine({"tables": ["crm.*"], "mask": {"email": spec}})


def test_hash_needs_a_key() -> None:
    with pytest.raises(TransformConfigError, match="hash_key"):
        engine({"tables": ["crm.*"], "mask": {"email": "hash"}}, key=None)


def test_key_columns_take_only_the_hash_mask() -> None:
    with pytest.raises(TransformConfigError, match="would merge distinct rows"):
        engine({"tables": ["crm.*"], "mask": {"region": "redact"}}).plan(PEOPLE)
    t = engine({"tables": ["crm.*"], "mask": {"region": "hash"}})
    (out,) = t.apply([event("c", row(1))])
    assert out.after[0] == digest("eu") and out.table.key_columns == ("region", "Id")  # type: ignore[index]


# -- reshaping --------------------------------------------------------------------------------


def test_steps_run_in_documented_order_and_route() -> None:
    t = engine(
        {
            "tables": ['crm."People"'],
            "mask": {"email": "hash"},
            "rename_columns": {"note": "remark"},
            "add_columns": {"tag": "remark || ':' || email", "double": "score * 2"},
            "drop_columns": ["score"],
            "route": "public.people",
        }
    )
    (out,) = t.apply([event("c", row(1, score=21))])
    assert out.table.qualified_name == "public.people"
    assert out.table.column_names == ("region", "Id", "email", "price", "remark", "tag", "double")
    assert out.after == ("eu", 1, digest("a@x"), Decimal("1.50"), "n", f"n:{digest('a@x')}", 42)
    assert [c.type_oid for c in out.table.columns[5:]] == [25, 23]
    assert t.output_name("crm", "People") == ("public", "people")


def test_chained_rules_see_the_previous_rules_output() -> None:
    t = engine(
        {"tables": ["crm.*"], "rename_columns": {"email": "mail"}, "mask": {"note": "redact"}},
        {"tables": ['crm."People"'], "filter": "mail LIKE '%@x'", "add_columns": {"n2": "note"}},
        {"tables": ["other.*"], "drop_columns": ["email"]},
    )
    out = t.apply([event("c", row(1)), event("c", row(2, email="b@y"), seq=1)])
    assert len(out) == 1
    assert out[0].after[-1] == "***"  # type: ignore[index]


def test_tables_patterns_fold_unquoted_names_and_glob() -> None:
    t = engine({"tables": ["CRM.*"], "drop_columns": ["note"]})
    assert t.rules_for("crm", "People") and not t.rules_for("CRM", "x")
    assert engine({"tables": ['"CRM".p?']}).rules_for("CRM", "px")
    assert engine({"tables": ["people"]}).rules_for("public", "people")


def test_unknown_columns_and_bad_sql_name_the_rule_and_file() -> None:
    cases = [
        ({"filter": "nope > 1"}, "filter: crm.People has no column 'nope'"),
        ({"drop_columns": ["nope"]}, "drop_columns: crm.People has no column 'nope'"),
        ({"rename_columns": {"nope": "x"}}, "rename_columns.nope"),
        ({"rename_columns": {"note": "email"}}, "already has 'email'"),
        ({"add_columns": {"x": "email +"}}, "add_columns.x: not a SQL expression"),
        ({"add_columns": {"x": "(SELECT 1)"}}, "subqueries are not allowed"),
        ({"filter": "score > 1; DROP TABLE x"}, "filter"),
        ({"filter": "email"}, "boolean"),
        ({"add_columns": {"x": "[score]"}}, "CAST it"),
        ({"filter": "score > 1 FROM t"}, "one scalar expression"),
        ({"add_columns": {"x": "count(*)"}}, "does not fit"),
    ]
    for extra, expected in cases:
        with pytest.raises(TransformConfigError) as info:
            t = engine({"tables": ["crm.*"], **extra})
            t.validate([PEOPLE])
        assert expected in str(info.value), (extra, str(info.value))
        assert "transforms.rules[0]" in str(info.value) and "unit.toml" in str(info.value)


def test_two_tables_routed_to_one_target_are_refused() -> None:
    other = TableSchema("crm", "other", PEOPLE.columns)
    with pytest.raises(TransformConfigError, match=r"both be written to x\.y"):
        engine({"tables": ["crm.*"], "route": "x.y"}).validate([PEOPLE, other])


def test_unchanged_toast_and_fallback_follow_renames_drops_and_masks() -> None:
    t = engine(
        {
            "tables": ["crm.*"],
            "rename_columns": {"note": "remark"},
            "drop_columns": ["score"],
            "mask": {"price": "redact", "email": "hash"},
        }
    )
    e = event(
        "u",
        ("eu", 1, None, None, None, None),
        unchanged_toast=("note", "score"),
        fallback={"price": "NaN", "email": "raw@x"},
    )
    (out,) = t.apply([e])
    assert out.unchanged_toast == ("remark",)
    assert out.fallback == {"price": "***", "email": digest("raw@x")}


# -- filter semantics -------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from("cud"), st.integers(0, 5), st.one_of(st.none(), st.integers(-3, 3))),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, split=st.integers(1, 10))
def test_filter_keeps_current_state_equal_to_filtered_source(
    ops: list[tuple[str, int, int | None]], split: int
) -> None:
    """PostgreSQL 15's row-filter semantics: whatever the update sequence, folding the
    transformed events gives the source's current state filtered (and masked)."""
    t = engine({"tables": ["crm.*"], "filter": "score > 0", "mask": {"email": "hash"}})
    source: dict[int, tuple] = {}
    events = []
    for seq, (op, key, score) in enumerate(ops):
        if (op == "c" and key in source) or (op in "ud" and key not in source):
            op = "u" if key in source else "c"
        if op == "d":
            events.append(event("d", None, before=("eu", key, None, None, None, None), seq=seq))
            del source[key]
        else:
            image = row(key, email=f"{key}@x", score=score)
            events.append(event(op, image, seq=seq))
            source[key] = image
    out: list[ChangeEvent] = []
    for start in range(0, len(events), split):  # batch boundaries must not matter
        out += t.apply(events[start : start + split])
    lake: dict[int, tuple] = {}
    for e in out:
        if e.op == "d":
            assert e.before is not None and e.after is None
            lake.pop(e.before[1], None)
        else:
            assert e.after is not None
            lake[e.after[1]] = e.after
    expected = {k: (*v[:2], digest(v[2]), *v[3:]) for k, v in source.items() if (v[3] or 0) > 0}
    assert lake == expected
    # Order and positions are kept: (commit_lsn, seq) ascending, none invented.
    assert [e.seq for e in out] == sorted(e.seq for e in out)


def test_update_leaving_filter_is_a_delete_of_its_key() -> None:
    t = engine({"tables": ["crm.*"], "filter": "score > 0"})
    (out,) = t.apply([event("u", row(3, score=0), unchanged_toast=("note",))])
    assert (out.op, out.after, out.before) == ("d", None, ("eu", 3, None, None, None, None))
    assert out.unchanged_toast == ()
    # A key change with its old key: the delete is of the old key.
    (moved,) = t.apply([event("u", row(4, score=0), before=row(3))])
    assert moved.op == "d" and moved.before == row(3)


def test_skip_operations_and_filter_order() -> None:
    t = engine({"tables": ["crm.*"], "skip_operations": ["d", "t"], "filter": "score > 0"})
    events = [
        event("c", row(1)),
        event("u", row(1, score=0), seq=1),  # leaves the filter: a delete, not skipped
        event("d", None, before=row(2), seq=2),
        event("t", None, seq=3),
    ]
    assert [e.op for e in t.apply(events)] == ["c", "d"]
    assert t.skipped_operations("crm", "People") == {"d", "t"}
    t2 = engine({"tables": ["crm.*"], "skip_operations": ["u"]})
    assert [e.op for e in t2.apply([event("c", row(1)), event("u", row(1), seq=1)])] == ["c"]


# -- snapshot path ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scores=st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=1, max_size=30),
    emails=st.lists(st.one_of(st.none(), TEXTS), min_size=30, max_size=30),
)
def test_snapshot_batches_and_events_agree(
    scores: list[int | None], emails: list[str | None]
) -> None:
    rules = {
        "tables": ["crm.*"],
        "filter": "score > 0",
        "mask": {"email": "hash", "note": "keep_last:2"},
        "rename_columns": {"price": "amount"},
        "add_columns": {"big": "score >= 3"},
        "route": "lake.people",
    }
    rows = [row(i, email=emails[i], score=s, note=f"note{i}") for i, s in enumerate(scores)]
    via_events = [
        e.after for e in engine(rules).apply([event("r", r, seq=i) for i, r in enumerate(rows)])
    ]
    batch = snapshot_batch(rows)
    output, table = engine(rules).apply_snapshot(PEOPLE, batch, fallback_column="_cdc_fallback")
    assert output.qualified_name == "lake.people"
    assert table.column_names == list(output.column_names)
    assert [tuple(r.values()) for r in table.to_pylist()] == via_events


# -- the docs ---------------------------------------------------------------------------------


def test_the_docs_recipe_loads_and_fits_its_tables(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from cdc.core.settings import load_settings

    text = (Path(__file__).parents[2] / "docs" / "transforms.md").read_text()
    recipe = text.split("## Recipe", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)
    monkeypatch.setenv("CDC_TRANSFORMS__HASH_KEY", KEY)
    settings = load_settings(path)
    t = Transforms(settings.transforms, source=str(path))

    def cols(*names: str, types: dict[str, int] | None = None) -> tuple[ColumnSchema, ...]:
        return tuple(
            ColumnSchema(n, (types or {}).get(n, 25), is_key=(n == "id"), attnum=i + 1)
            for i, n in enumerate(names)
        )

    customers = TableSchema(
        "crm",
        "customers",
        cols(
            "id",
            "email",
            "phone",
            "card_number",
            "national_id",
            "birth_date",
            "password_hash",
            "notes",
            "test_account",
            types={"id": 20, "birth_date": 1082, "test_account": 16},
        ),
    )
    tickets = TableSchema("crm", "tickets", cols("id", "email", "body"))
    audit = TableSchema("crm", "audit_log", cols("id", "what"))
    shapes = t.validate([customers, tickets, audit])
    out = shapes["crm.customers"]
    assert out.qualified_name == "crm_public.customers"
    assert "password_hash" not in out.column_names and "birth_year" in out.column_names
    (e,) = t.apply(
        [
            event(
                "c",
                (
                    1,
                    "a@x",
                    "5551234",
                    "4111111111111111",
                    "X1",
                    datetime(1990, 5, 1).date(),
                    "h",
                    "n",
                    False,
                ),
                table=customers,
            )
        ]
    )
    assert e.after == (1, digest("a@x"), "*****34", "************1111", "***", None, False, 1990)
    assert t.skipped_operations("crm", "audit_log") == {"u", "d", "t"}


def test_rules_never_apply_twice() -> None:
    t = engine({"tables": ["crm.*"], "mask": {"email": "hash"}, "rename_columns": {"note": "n2"}})
    (once,) = t.apply([event("c", row(1))])
    assert once.table.transforms is not None and once.table.transform_rules[0]["index"] == 0
    # An event already in its transformed shape (a topic capture wrote, a truncate typed by
    # the lake's shape) passes as it is.
    (again,) = t.apply([event("c", once.after, table=once.table)])
    assert again.after == once.after and again.table == once.table


def test_a_hash_read_by_later_rules_is_the_hash() -> None:
    t = engine(
        {"tables": ["crm.*"], "filter": "score > 0"},
        {"tables": ["crm.*"], "mask": {"email": "hash"}, "rename_columns": {"email": "h"}},
        {"tables": ["crm.*"], "filter": f"h = '{digest('a@x')}'", "add_columns": {"h2": "h"}},
    )
    events = [
        event("c", row(1)),
        event("c", row(2, email="b@x"), seq=1),
        event("c", row(3, score=0), seq=2),
    ]
    out = t.apply(events)
    assert [(e.after[1], e.after[2], e.after[-1]) for e in out] == [
        (1, digest("a@x"), digest("a@x"))
    ]  # type: ignore[index]
    rows = [row(1), row(2, email="b@x"), row(3, score=0)]
    batch = snapshot_batch(rows)
    _, table = t.apply_snapshot(PEOPLE, batch, fallback_column="_cdc_fallback")
    assert table.column("h2").to_pylist() == [digest("a@x")]
