"""Transforms in embedded capture (``cdc run``), against real PostgreSQL and Delta tables:
masks, drops, renames, filters, computed columns, skips and routes, for snapshot and
streamed rows; no raw masked value anywhere in the lake or the logs."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest

from catalog.lake import Lake
from cdc.core.errors import ConfigError
from cdc.core.settings import load_settings
from cdc.pipeline import CapturePipeline, transforms_status
from cdc.postgres.slots import publication_pushdown
from tests.plugins.lake import running_pipeline, wait_caught_up
from transforms import TransformConfigError

# Rules run on the columnar batches of the compiled path and on events of the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]

HASH_KEY = "k3y-for-tests"
#: Every raw value a rule masks or drops contains this, where no mask keeps it.
MARK = "SECRET"

SCHEMA = """
CREATE SCHEMA crm;
CREATE TABLE crm."Customers" (
    region text, "Id" int, email text, card text, ssn text, phone text, bio text,
    notes text, fname text, lname text, country text, PRIMARY KEY (region, "Id")
);
CREATE TABLE crm.events (note text, email text);
ALTER TABLE crm.events REPLICA IDENTITY FULL;
"""

CONFIG = f"""
[transforms]
hash_key = "{HASH_KEY}"

[[transforms.rules]]
tables = ['crm."Customers"']
mask = {{ email = "hash", card = "keep_last:4", ssn = "redact", phone = "null", bio = "truncate:4" }}
drop_columns = ["notes"]
rename_columns = {{ fname = "first_name" }}
filter = "country <> 'XX'"
route = "crm_public.customers"
add_columns = {{ full_name = "first_name || ' ' || lname" }}

[[transforms.rules]]
tables = ["crm.ev*"]
mask = {{ email = "hash" }}
skip_operations = ["t"]
"""


def customer(n: int, country: str = "FR", region: str = "eu") -> tuple:
    return (
        region,
        n,
        f"{MARK}.mail{n}@example.com" if n % 5 else None,
        f"4111-{MARK}-{n:04d}-9876",
        f"ssn-{MARK}-{n}",
        f"phone-{MARK}-{n}",
        f"bio-{MARK} {n} lorem ipsum",
        f"notes-{MARK}-{n}",
        f"Ann{n}",
        "Lee",
        country,
    )


def insert(conn: psycopg.Connection, rows: list[tuple]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            'INSERT INTO crm."Customers" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)', rows
        )


def digest(text: str) -> str:
    return hmac.new(HASH_KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


def every_value_in(lake: str) -> str:
    """Everything the lake directory holds: each Parquet file's rows, every other file."""
    parts = []
    for path in sorted(Path(lake).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            parts.append(repr(pq.read_table(path).to_pylist()))
        else:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    assert parts, "the lake is empty"
    return "\n".join(parts)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("CDC_CONFIG", str(path))
    return path


def test_rules_shape_snapshot_and_stream_and_nothing_raw_lands(
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    lake_dir: str,
    config: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    pg_conn.execute(SCHEMA)
    insert(pg_conn, [customer(n) for n in range(1, 11)] + [customer(11, "XX")])
    pg_conn.execute(f"INSERT INTO crm.events VALUES ('snap', '{MARK}@a'), ('gone', NULL)")

    tables = {"source.tables": ['crm."Customers"', "crm.events"]}
    with running_pipeline(pg_dsn, lake_dir, **tables) as pipeline:
        status = pipeline.transform_status
        insert(pg_conn, [customer(n) for n in range(12, 20)] + [customer(20, "XX")])
        insert(pg_conn, [customer(1, region="us")])  # same "Id", other region: a new key
        # Leaves the filter: the current view must drop it.
        pg_conn.execute('UPDATE crm."Customers" SET country = \'XX\' WHERE "Id" IN (2, 13)')
        # Enters the filter: an upsert of a row never seen before.
        pg_conn.execute('UPDATE crm."Customers" SET country = \'DE\' WHERE "Id" = 11')
        pg_conn.execute(
            'UPDATE crm."Customers" SET ssn = %s, card = NULL WHERE "Id" = 3', [f"new-{MARK}"]
        )
        pg_conn.execute('DELETE FROM crm."Customers" WHERE "Id" = 4')
        pg_conn.execute(f"INSERT INTO crm.events VALUES ('stream', '{MARK}@b')")
        pg_conn.execute("UPDATE crm.events SET note = 'skipped' WHERE note = 'snap'")
        pg_conn.execute("DELETE FROM crm.events WHERE note = 'gone'")
        pg_conn.execute("TRUNCATE crm.events")  # skipped: the rows stay
        wait_caught_up(pipeline, pg_dsn)

    with Lake(lake_dir) as lk:
        columns = [r[0] for r in lk.sql("DESCRIBE crm_public.customers").fetchall()]
        current = {
            (r[0], r[1]): r
            for r in lk.sql(
                'SELECT region, "Id", email, card, ssn, phone, bio, first_name, lname, country, '
                "full_name FROM crm_public.customers"
            ).fetchall()
        }
        events = sorted(lk.sql("SELECT note, email FROM crm.events").fetchall(), key=str)
        event_ops = sorted(
            r[0] for r in lk.sql("SELECT _cdc_op FROM crm.events_changes").fetchall()
        )
        names = {r[0] for r in lk.sql("SHOW ALL TABLES").fetchall()} | set(lk.tables())
    assert "notes" not in columns and "fname" not in columns
    assert not any("Customers" in str(t) for t in names), names
    expected_keys = {("eu", n) for n in range(1, 21)} - {
        ("eu", 2),
        ("eu", 13),
        ("eu", 4),
        ("eu", 20),
    }
    expected_keys |= {("us", 1)}
    assert set(current) == expected_keys
    row = current[("eu", 7)]
    assert row == (
        "eu",
        7,
        digest(f"{MARK}.mail7@example.com"),
        "*" * (len("4111-SECRET-0007-9876") - 4) + "9876",
        "***",
        None,
        "bio-",
        "Ann7",
        "Lee",
        "FR",
        "Ann7 Lee",
    )
    assert current[("eu", 5)][2] is None  # NULL stays NULL under hash
    assert current[("eu", 3)][3:5] == (None, "***")
    assert current[("eu", 11)][9] == "DE"
    assert events == [("skipped", digest(f"{MARK}@a")), ("stream", digest(f"{MARK}@b"))]
    # A keyless table's update is a delete of the old row (its before image masked too)
    # and an insert; the truncate was skipped.
    assert event_ops == ["c", "c", "d", "d", "r", "r"]

    assert MARK not in every_value_in(lake_dir)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert MARK not in logged and HASH_KEY not in logged
    assert "transforms.rules[0]" in logged  # the rules are logged at start, without values
    # What the rules pushed into the pipeline's own publication (PostgreSQL 15).
    assert status["pushdown"]["columns"] == {"crm.Customers": ["notes"]}
    with psycopg.connect(pg_dsn) as conn:
        assert publication_pushdown(conn, "test") == {
            "publish": ["insert", "update", "delete", "truncate"],
            "columns": {"crm.Customers": ["notes"]},
        }
    reported = transforms_status(load_settings(**{"source.dsn": pg_dsn, "name": "test"}, **tables))
    assert reported["pushdown"]["columns"] == {"crm.Customers": ["notes"]}
    assert [r["tables"] for r in reported["rules"]] == [['crm."Customers"'], ["crm.ev*"]]
    assert HASH_KEY not in repr(reported)


def test_a_column_added_while_streaming_is_transformed_with_the_rest(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, config: Path
) -> None:
    """A source schema change mid-stream (a keyless table): the rows before and after it
    keep their rules (the new shape gets a plan of its own), on the columnar path and the
    per-event one. (crm."Customers" has a publication column list, see Pushdown: a column
    added to it arrives only once the pipeline restarts.)"""
    pg_conn.execute(SCHEMA)
    tables = {"source.tables": ['crm."Customers"', "crm.events"]}
    with running_pipeline(pg_dsn, lake_dir, **tables) as pipeline:
        pg_conn.execute(f"INSERT INTO crm.events VALUES ('a', '{MARK}@a'), ('b', NULL)")
        wait_caught_up(pipeline, pg_dsn)
        pg_conn.execute('ALTER TABLE crm.events ADD COLUMN "Tier" int')
        pg_conn.execute(
            f"INSERT INTO crm.events VALUES ('c', '{MARK}@c', 3), ('d', '{MARK}@d', NULL)"
        )
        pg_conn.execute("DELETE FROM crm.events WHERE note = 'a'")
        wait_caught_up(pipeline, pg_dsn)
    with Lake(lake_dir) as lk:
        rows = lk.sql('SELECT note, email, "Tier" FROM crm.events ORDER BY note').fetchall()
        ops = lk.sql("SELECT _cdc_op, email FROM crm.events_changes ORDER BY _cdc_lsn, _cdc_seq")
        changes = ops.fetchall()
    assert rows == [
        ("b", None, None),
        ("c", digest(f"{MARK}@c"), 3),
        ("d", digest(f"{MARK}@d"), None),
    ]
    # The delete's old row is masked too.
    assert changes[-1] == ("d", digest(f"{MARK}@a"))
    assert MARK not in every_value_in(lake_dir)


def test_skip_operations_every_table_shares_go_into_the_publish_list(
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    lake_dir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg_conn.execute("CREATE TABLE audit (id int PRIMARY KEY, what text)")
    path = tmp_path / "cdc.toml"
    path.write_text('[[transforms.rules]]\ntables = ["public.*"]\nskip_operations = ["d", "t"]\n')
    monkeypatch.setenv("CDC_CONFIG", str(path))
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("INSERT INTO audit VALUES (1, 'a'), (2, 'b')")
        pg_conn.execute("DELETE FROM audit WHERE id = 1")
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.transform_status["pushdown"]["publish"] == ["insert", "update"]
    with Lake(lake_dir) as lk:
        assert sorted(lk.sql("SELECT id FROM public.audit").fetchall()) == [(1,), (2,)]
    with psycopg.connect(pg_dsn) as conn:
        assert publication_pushdown(conn, "test") == {
            "publish": ["insert", "update"],
            "columns": {},
        }


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('mask = { email = "scramble" }', "mask.email: unknown mask 'scramble'"),
        ('filter = "country <> "', "filter: not a SQL expression"),
        ('filter = "nosuch = 1"', "has no column 'nosuch'"),
        ('mask = { nosuch = "redact" }', "mask.nosuch: crm.Customers has no column 'nosuch'"),
        ('add_columns = { x = "lower(country) + 1" }', "does not fit crm.Customers"),
        ('filter = "length(country)"', "filter must be a boolean expression"),
        ('drop_columns = ["Id"]', "identifies rows"),
        ('mask = { region = "redact" }', "would merge distinct rows"),
    ],
)
def test_bad_rules_fail_at_start_naming_rule_and_file(
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    lake_dir: str,
    tmp_path: Path,
    rule: str,
    expected: str,
) -> None:
    pg_conn.execute(SCHEMA)
    path = tmp_path / "bad.toml"
    path.write_text(f"[[transforms.rules]]\ntables = ['crm.\"Customers\"']\n{rule}\n")
    with pytest.raises(TransformConfigError) as info:
        settings = load_settings(
            path, **{"source.dsn": pg_dsn, "lake.path": lake_dir, "name": "bad"}
        )
        CapturePipeline(settings).run()
    message = str(info.value)
    assert expected in message
    assert "transforms.rules[0]" in message and str(path) in message


def test_unknown_key_in_rule_fails_before_connecting(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[transforms.rules]]\ntables = ['a.b']\nmask_columns = {}\n")
    with pytest.raises(
        ConfigError, match=r"unknown key transforms\.rules\[0\]\.mask_columns"
    ) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_changing_a_tables_rules_records_a_new_schema_version(
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    lake_dir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from catalog.schema_registry import SchemaRegistry
    from tests.plugins.cli import run_cdc

    pg_conn.execute("CREATE TABLE people (id int PRIMARY KEY, email text, city text)")
    pg_conn.execute(f"INSERT INTO people VALUES (1, '{MARK}@1', 'Oslo')")
    path = tmp_path / "cdc.toml"
    monkeypatch.setenv("CDC_CONFIG", str(path))
    path.write_text(
        f'[transforms]\nhash_key = "{HASH_KEY}"\n[[transforms.rules]]\ntables = ["public.people"]\nmask = {{ email = "hash" }}\n'
    )
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    # Same shape, other rules: the city is now redacted too.
    path.write_text(
        f'[transforms]\nhash_key = "{HASH_KEY}"\n[[transforms.rules]]\ntables = ["public.people"]\n'
        'mask = { email = "hash", city = "redact" }\n'
    )
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute(f"INSERT INTO people VALUES (2, '{MARK}@2', 'Rome')")
        wait_caught_up(pipeline, pg_dsn)
    versions = SchemaRegistry(lake_dir).versions("public.people")
    assert [v.version for v in versions] == [1, 2]
    assert [c.type_oid for c in versions[0].schema.columns] == [
        c.type_oid for c in versions[1].schema.columns
    ]
    assert [r["mask"] for r in versions[0].schema.transform_rules] == [{"email": "hash"}]
    assert [r["mask"] for r in versions[1].schema.transform_rules] == [
        {"email": "hash", "city": "redact"}
    ]
    with Lake(lake_dir) as lk:
        assert sorted(lk.sql("SELECT id, city FROM public.people").fetchall()) == [
            (1, "Oslo"),
            (2, "***"),
        ]
    shown = run_cdc("schemas", "public.people", "--lake", lake_dir)
    assert shown.returncode == 0, shown.stderr
    assert "'city': 'redact'" in shown.stdout
    assert "rules[0]" in shown.stdout and HASH_KEY not in shown.stdout


def test_cdc_run_with_a_bad_rule_exits_1_naming_rule_and_file(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path
) -> None:
    from tests.plugins.cli import run_cdc

    pg_conn.execute(SCHEMA)
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f'[source]\ndsn = "{pg_dsn}"\n\n[[transforms.rules]]\n'
        'tables = [\'crm."Customers"\']\ndrop_columns = ["nosuch"]\n'
    )
    done = run_cdc("run", "--config", str(path), "--lake", lake_dir, "--name", "badcli")
    assert done.returncode == 1, done.stderr
    message = " ".join(done.stderr.split())  # rich wraps long lines
    assert "transforms.rules[0]" in message and "nosuch" in message
    assert str(path) in message.replace(" ", "") or path.name in message
    # An unknown key stops the command before it connects anywhere.
    path.write_text("[batch]\nmax_rowz = 5\n")
    done = run_cdc("run", "--config", str(path), "--lake", lake_dir)
    assert done.returncode == 1
    assert "unknown key batch.max_rowz" in " ".join(done.stderr.split())
