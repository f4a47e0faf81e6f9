"""DuckDB secrets made from deltalake-style storage options, and extensions from wheels."""

from __future__ import annotations

import duckdb
import pytest

from catalog.duckdb_storage import (
    configure_object_store,
    extension_path,
    object_store_secret_sql,
)
from catalog.errors import DuckDBExtensionNotFoundError, ObjectStoreConfigError


def test_s3_secret_carries_credentials_endpoint_and_path_style(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    [sql] = object_store_secret_sql(
        "s3://my-bucket/lake/root",
        {
            "aws_access_key_id": "AK",
            "AWS_SECRET_ACCESS_KEY": "it's secret",
            "AWS_SESSION_TOKEN": "tok",
            "AWS_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "conditional_put": "etag",
        },
    )
    assert sql.startswith("CREATE OR REPLACE SECRET cdc_lake_s3_my_bucket (TYPE s3, ")
    for part in (
        "SCOPE 's3://my-bucket'",
        "KEY_ID 'AK'",
        "SECRET 'it''s secret'",
        "SESSION_TOKEN 'tok'",
        "REGION 'eu-west-1'",
        "ENDPOINT '127.0.0.1:9000'",
        "USE_SSL false",
        "URL_STYLE 'path'",
    ):
        assert part in sql
    # DuckDB accepts it.
    con = duckdb.connect()
    configure_object_store(con, "s3://my-bucket/lake", {"AWS_REGION": "eu-west-1"})
    assert con.execute("SELECT count(*) FROM duckdb_secrets() WHERE type = 's3'").fetchone() == (1,)


def test_s3_credentials_come_from_the_environment_when_the_options_have_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    monkeypatch.setenv("AWS_REGION", "us-east-2")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    [sql] = object_store_secret_sql("s3://b/lake", None)
    assert "KEY_ID 'ENVKEY'" in sql and "REGION 'us-east-2'" in sql
    assert "ENDPOINT" not in sql and "URL_STYLE" not in sql  # AWS itself: DuckDB's defaults


def test_azure_and_gcs_secrets_and_what_they_need() -> None:
    [az] = object_store_secret_sql(
        "az://container/lake",
        {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "k=="},
    )
    assert "TYPE azure" in az and "AccountName=acct;AccountKey=k==" in az
    with pytest.raises(ObjectStoreConfigError, match="AZURE_STORAGE_ACCOUNT_NAME"):
        object_store_secret_sql("az://container/lake", {})
    [gs] = object_store_secret_sql(
        "gs://bucket/lake", {"GCS_HMAC_KEY_ID": "id", "GCS_HMAC_SECRET": "s"}
    )
    assert "TYPE gcs" in gs and "KEY_ID 'id'" in gs
    assert object_store_secret_sql("gs://bucket/lake", {}) == []  # public buckets only


def test_local_lakes_need_nothing_and_unknown_schemes_say_so() -> None:
    con = duckdb.connect()
    configure_object_store(con, "/data/lake", None)
    configure_object_store(con, "file:///data/lake", None)
    with pytest.raises(ObjectStoreConfigError, match="hdfs://"):
        configure_object_store(con, "hdfs://nn/lake", None)


def test_extensions_come_from_their_wheels_pinned_to_duckdb() -> None:
    assert extension_path("httpfs").parent.name == f"v{duckdb.__version__}"
    with pytest.raises(DuckDBExtensionNotFoundError, match="duckdb-extension-nope=="):
        extension_path("nope")
