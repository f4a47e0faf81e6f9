"""DuckDB extensions from wheels, and DuckDB secrets made from the lake's storage options.

DuckDB cannot download extensions on air-gapped machines, so each one it needs ships as a
``duckdb-extension-<name>`` wheel built for one exact DuckDB version and is ``LOAD``-ed by
file path (autoload/autoinstall stay off). A local lake needs only ``delta``; an
object-store lake also needs ``httpfs`` (``s3://``, ``gs://``) or ``azure`` (``az://``,
``abfss://``) plus a DuckDB secret holding the same credentials and endpoint deltalake gets
from ``storage_options`` (deltalake-style keys, case-insensitive; ``AWS_*`` environment
variables fill in what the options leave out, as they do for deltalake).

Example:
    >>> con = duckdb.connect()  # doctest: +SKIP
    >>> configure_object_store(con, "s3://bucket/lake", {"AWS_REGION": "eu-west-1"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlparse

import duckdb

from catalog.errors import DuckDBExtensionNotFoundError, ObjectStoreConfigError

__all__ = [
    "configure_object_store",
    "extension_path",
    "load_extension",
    "object_store_secret_sql",
]

log = logging.getLogger(__name__)

#: URI scheme -> the DuckDB extension that reads it.
_SCHEME_EXTENSIONS: Final[dict[str, str]] = {
    "s3": "httpfs",
    "s3a": "httpfs",
    "gs": "httpfs",
    "gcs": "httpfs",
    "az": "azure",
    "azure": "azure",
    "abfs": "azure",
    "abfss": "azure",
}


def extension_path(
    name: str, *, error: type[DuckDBExtensionNotFoundError] = DuckDBExtensionNotFoundError
) -> Path:
    """The file of DuckDB extension ``name`` shipped by the ``duckdb-extension-<name>`` wheel,
    stored at ``duckdb_extension_<name>/extensions/v<duckdb version>/<name>.duckdb_extension``.

    Raises:
        DuckDBExtensionNotFoundError (or ``error``): the wheel is missing, or built for
            another DuckDB version; the message has the pip command.

    Example:
        >>> extension_path("httpfs").name  # doctest: +SKIP
        'httpfs.duckdb_extension'
    """
    version = duckdb.__version__
    wheel = f"duckdb-extension-{name}"
    pin = f"pip install 'duckdb=={version}' '{wheel}=={version}'"
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"the {wheel} wheel is not installed; DuckDB {version} cannot download the "
            f"{name} extension here. Install the wheel matching DuckDB: {pin}"
        )
    available: list[str] = []
    for location in spec.submodule_search_locations:
        extensions = Path(location) / "extensions"
        candidate = extensions / f"v{version}" / f"{name}.duckdb_extension"
        if candidate.is_file():
            return candidate
        if extensions.is_dir():
            available.extend(p.name for p in extensions.iterdir())
    built_for = ", ".join(sorted(available)) or "no DuckDB version"
    raise error(
        f"the installed {wheel} wheel ships the {name} extension for {built_for}, but DuckDB "
        f"is {version}. Pin both to the same version: {pin}"
    )


def load_extension(
    con: duckdb.DuckDBPyConnection,
    name: str,
    *,
    error: type[DuckDBExtensionNotFoundError] = DuckDBExtensionNotFoundError,
) -> None:
    """``LOAD`` extension ``name`` into ``con`` from its wheel (see :func:`extension_path`)."""
    path = extension_path(name, error=error)
    try:
        con.execute(f"LOAD {_literal(str(path))}")
    except duckdb.Error as exc:
        raise error(
            f"DuckDB {duckdb.__version__} could not load {path}: {exc}. Reinstall "
            f"'duckdb-extension-{name}=={duckdb.__version__}' for this platform"
        ) from exc


def configure_object_store(
    con: duckdb.DuckDBPyConnection, lake: str, storage_options: Mapping[str, str] | None
) -> None:
    """Make ``con`` able to read ``lake``: load the extension for its scheme and create a
    DuckDB secret (scoped to the bucket or container) from ``storage_options``.

    A local lake needs nothing: the call returns at once.

    Raises:
        DuckDBExtensionNotFoundError: the extension's wheel is missing.
        ObjectStoreConfigError: the options cannot be expressed as a DuckDB secret.
    """
    scheme = urlparse(lake).scheme.lower() if "://" in lake else ""
    extension = _SCHEME_EXTENSIONS.get(scheme)
    if extension is None:
        if scheme and scheme != "file":
            raise ObjectStoreConfigError(
                f"DuckDB cannot read lakes on {scheme}:// (supported: local paths, "
                f"{', '.join(sorted(f'{s}://' for s in _SCHEME_EXTENSIONS))})"
            )
        return
    load_extension(con, extension)
    for statement in object_store_secret_sql(lake, storage_options):
        try:
            con.execute(statement)
        except duckdb.Error as exc:
            raise ObjectStoreConfigError(
                f"DuckDB rejected the secret for {lake} made from its storage options: {exc}"
            ) from exc


def object_store_secret_sql(lake: str, storage_options: Mapping[str, str] | None) -> list[str]:
    """The ``CREATE SECRET`` statements giving DuckDB access to ``lake`` (pure: no IO).

    Keys are deltalake's (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
    ``AZURE_STORAGE_ACCOUNT_NAME``...), case-insensitive. ``gs://`` lakes need HMAC keys
    (``GCS_HMAC_KEY_ID`` and ``GCS_HMAC_SECRET``): DuckDB's GCS access does not take the
    service-account JSON deltalake uses.

    >>> object_store_secret_sql("s3://b/lake", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    ...     "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "r"})[0]
    "CREATE OR REPLACE SECRET cdc_lake_s3_b (TYPE s3, SCOPE 's3://b', KEY_ID 'k', SECRET 's', REGION 'r', ENDPOINT '127.0.0.1:9000', USE_SSL false, URL_STYLE 'path')"
    """
    parsed = urlparse(lake)
    scheme, bucket = parsed.scheme.lower(), parsed.netloc
    options = {k.lower(): v for k, v in (storage_options or {}).items()}
    name = "cdc_lake_" + "".join(c if c.isalnum() else "_" for c in f"{scheme}_{bucket}")
    scope = f"{scheme}://{bucket}"
    if scheme in ("s3", "s3a"):
        params = _s3_params(options)
        return [_secret(name, "s3", scope, params)]
    if scheme in ("gs", "gcs"):
        key_id, secret = options.get("gcs_hmac_key_id"), options.get("gcs_hmac_secret")
        if not (key_id and secret):
            # Public buckets still work without a secret; say why private ones fail.
            log.warning(
                "%s: DuckDB reads gs:// through HMAC keys; set GCS_HMAC_KEY_ID and "
                "GCS_HMAC_SECRET in the lake's storage options to query private buckets",
                lake,
            )
            return []
        return [_secret(name, "gcs", scope, {"KEY_ID": key_id, "SECRET": secret})]
    if scheme in ("az", "azure", "abfs", "abfss"):
        connection = options.get("azure_storage_connection_string")
        account = _first(options, "azure_storage_account_name", "account_name")
        key = _first(
            options, "azure_storage_account_key", "azure_storage_access_key", "account_key"
        )
        if connection is None and account and key:
            connection = (
                f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey={key};"
                "EndpointSuffix=core.windows.net"
            )
        if connection is not None:
            return [_secret(name, "azure", scope, {"CONNECTION_STRING": connection})]
        if account:
            return [
                _secret(
                    name,
                    "azure",
                    scope,
                    {"PROVIDER": "credential_chain", "ACCOUNT_NAME": account},
                )
            ]
        raise ObjectStoreConfigError(
            f"{lake}: set AZURE_STORAGE_ACCOUNT_NAME (and AZURE_STORAGE_ACCOUNT_KEY, or "
            "AZURE_STORAGE_CONNECTION_STRING) in the lake's storage options"
        )
    return []


def _s3_params(options: dict[str, str]) -> dict[str, str | bool]:
    env = os.environ
    params: dict[str, str | bool] = {}
    key_id = _first(options, "aws_access_key_id", "access_key_id") or env.get("AWS_ACCESS_KEY_ID")
    secret = _first(options, "aws_secret_access_key", "secret_access_key") or env.get(
        "AWS_SECRET_ACCESS_KEY"
    )
    token = _first(options, "aws_session_token", "session_token", "aws_token", "token")
    region = (
        _first(options, "aws_region", "region", "aws_default_region")
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
    )
    endpoint = _first(
        options, "aws_endpoint_url", "aws_endpoint", "endpoint_url", "endpoint"
    ) or env.get("AWS_ENDPOINT_URL")
    if key_id and secret:
        params["KEY_ID"], params["SECRET"] = key_id, secret
        token = token or env.get("AWS_SESSION_TOKEN")
        if token:
            params["SESSION_TOKEN"] = token
    if region:
        params["REGION"] = region
    if endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        params["ENDPOINT"] = ep.netloc + ep.path.rstrip("/")
        params["USE_SSL"] = ep.scheme != "http"
        virtual = _first(
            options, "aws_virtual_hosted_style_request", "virtual_hosted_style_request"
        )
        # deltalake (object_store) addresses a custom endpoint path-style unless told
        # otherwise; DuckDB defaults to virtual-host style.
        params["URL_STYLE"] = "vhost" if (virtual or "").lower() == "true" else "path"
    elif (_first(options, "aws_allow_http", "allow_http") or "").lower() == "true":
        params["USE_SSL"] = False
    return params


def _first(options: Mapping[str, str], *keys: str) -> str | None:
    for key in keys:
        value = options.get(key)
        if value:
            return value
    return None


def _secret(name: str, kind: str, scope: str, params: Mapping[str, str | bool]) -> str:
    parts = [f"TYPE {kind}", f"SCOPE {_literal(scope)}"]
    for key, value in params.items():
        rendered = ("true" if value else "false") if isinstance(value, bool) else _literal(value)
        parts.append(f"{key} {rendered}")
    return f"CREATE OR REPLACE SECRET {name} ({', '.join(parts)})"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
