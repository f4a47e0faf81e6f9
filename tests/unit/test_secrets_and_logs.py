"""Secret masking, the JSON log format and the per-table event counters (no servers)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.cli.logs import JsonFormatter
from cdc.core.secrets import (
    SecretFilter,
    dsn_password,
    forget_secrets,
    mask_dsn,
    mask_text,
    register_secrets,
)
from cdc.core.settings import load_settings
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.metrics import EventCounts, Metrics

passwords = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs")), min_size=3, max_size=30
)


@given(passwords)
def test_uri_password_is_masked_and_recovered(password: str) -> None:
    dsn = f"postgresql://app:{quote(password, safe='')}@db.example:5432/shop?sslmode=require"
    # (Equality, not "the password is not in it": a password such as "pos" is part of
    # "postgresql".)
    assert mask_dsn(dsn) == "postgresql://app:***@db.example:5432/shop?sslmode=require"
    assert dsn_password(dsn) == password


@given(passwords.filter(lambda p: "'" not in p and "\\" not in p))
def test_keyword_password_is_masked(password: str) -> None:
    dsn = f"host=db user=app password='{password}' dbname=shop"
    assert mask_dsn(dsn) == "host=db user=app password=*** dbname=shop"
    assert dsn_password(dsn) == password


def test_query_parameter_password_is_masked() -> None:
    assert mask_dsn("postgresql:///shop?host=/tmp&password=hunter22") == (
        "postgresql:///shop?host=/tmp&password=***"
    )


def test_settings_register_dsn_and_kafka_secrets() -> None:
    load_settings(
        **{
            "source.dsn": "postgresql://u:Dsn-Secret-1@h/db",
            "kafka.client": {"sasl.password": "Sasl-Secret-2", "sasl.mechanism": "PLAIN"},
        }
    )
    text = mask_text("Dsn-Secret-1 Sasl-Secret-2 PLAIN")
    assert text == "*** *** PLAIN"


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("cdc.test", logging.WARNING, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


@pytest.fixture(autouse=True, scope="module")
def no_registered_secrets() -> None:
    # The registry is process-wide: secrets of settings other test modules loaded (a password
    # "postgres", say) would mask parts of the expected texts here.
    forget_secrets()


def test_filter_masks_arguments_and_exceptions() -> None:
    register_secrets("Registered-Secret-3")
    flt = SecretFilter(["own-secret"])
    r = record("cannot connect to %s: %s", "postgresql://u:pw123@h/db", "own-secret")
    assert flt.filter(r)
    assert r.getMessage() == "cannot connect to postgresql://u:***@h/db: ***"
    try:
        raise RuntimeError("failed with Registered-Secret-3")
    except RuntimeError:
        import sys

        r = record("boom")
        r.exc_info = sys.exc_info()
    flt.filter(r)
    out = logging.Formatter().format(r)
    assert "Registered-Secret-3" not in out and "RuntimeError" in out


def test_json_formatter_keeps_extra_fields() -> None:
    r = record("flushed %d rows", 5, table="public.Order Lines", lsn="0/16B3748", rows=5)
    data = json.loads(JsonFormatter().format(r))
    assert data["message"] == "flushed 5 rows"
    assert data["level"] == "warning" and data["logger"] == "cdc.test"
    assert (data["table"], data["lsn"], data["rows"]) == ("public.Order Lines", "0/16B3748", 5)
    assert datetime.fromisoformat(data["ts"]).tzinfo is not None


def test_event_counts_per_table_op_and_schema_version() -> None:
    v1 = TableSchema("public", "Mixed Case", (ColumnSchema("id", 20, is_key=True),))
    v2 = TableSchema("public", "Mixed Case", (*v1.columns, ColumnSchema("note", 25)))
    other = TableSchema("s", "t", ())
    counts = EventCounts()
    for table, op in [(v1, "c"), (v1, "c"), (other, "d"), (v2, "u"), (v1, "c")]:
        counts.switch(table)[op] += 1
    assert counts.snapshot() == {
        ("public.Mixed Case", "c"): 3,
        ("public.Mixed Case", "u"): 1,
        ("s.t", "d"): 1,
    }
    assert counts.by_table() == {"public.Mixed Case": 4, "s.t": 1}
    m = Metrics()
    m.event_counts.append(counts)
    assert (
        m.registry.get_sample_value("cdc_events_total", {"table": "public.Mixed Case", "op": "c"})
        == 3
    )
    m.landed("s.t", datetime.now(UTC).timestamp() - 5)
    age = m.registry.get_sample_value("cdc_last_commit_age_seconds", {"table": "s.t"})
    assert age is not None and 5 <= age < 60
