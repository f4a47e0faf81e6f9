"""Where things live in the lake, and the names of the changelog metadata columns.

Layout (``root`` is a local path or an object-store URI)::

    <root>/<schema>.<table>/changes   changelog Delta table, partitioned by _cdc_date
    <root>/<schema>.<table>/current   current-state Delta table (written by `cdc jobs merge`)
    <root>/<schema>.<table>/base      state at the retention horizon (`cdc jobs retention`)
    <root>/_cdc/schemas/...           embedded-mode schema registry
    <root>/_cdc/pipelines/<name>.json pipeline state (snapshot progress)
    <root>/_dlq                       dead letters
"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from catalog.errors import TerminalCatalogError, TransientCatalogError

#: Metadata columns of every changelog table, in the order they are written.
OP = "_cdc_op"  # c, u, d, r (snapshot read), t (truncate)
LSN = "_cdc_lsn"  # commit LSN of the source transaction, int64
SEQ = "_cdc_seq"  # order of the change within its transaction
TXID = "_cdc_txid"
COMMIT_TS = "_cdc_commit_ts"  # UTC
INGESTED_AT = "_cdc_ingested_at"  # UTC, when the sink wrote the row
UNCHANGED_TOAST = "_cdc_unchanged_toast"  # names of TOASTed columns PostgreSQL did not resend
FALLBACK = "_cdc_fallback"  # column -> exact text of a value its Delta type cannot hold
DATE = "_cdc_date"  # partition column: UTC date of the commit

METADATA_COLUMNS: tuple[str, ...] = (
    OP,
    LSN,
    SEQ,
    TXID,
    COMMIT_TS,
    INGESTED_AT,
    UNCHANGED_TOAST,
    FALLBACK,
    DATE,
)
PARTITION_COLUMNS: tuple[str, ...] = (DATE,)

INTERNAL_DIR = "_cdc"
DLQ_DIR = "_dlq"


def join(root: str, *parts: str) -> str:
    """Join lake path parts with ``/``, for local paths and URIs alike."""
    return "/".join([root.rstrip("/"), *parts])


def table_dir(root: str, qualified_name: str) -> str:
    return join(root, qualified_name)


def changes_uri(root: str, qualified_name: str) -> str:
    """The changelog table of ``schema.table``."""
    return join(root, qualified_name, "changes")


def current_uri(root: str, qualified_name: str) -> str:
    """The merged current-state table of ``schema.table``."""
    return join(root, qualified_name, "current")


BASE_DIR = "base"


def base_uri(root: str, qualified_name: str) -> str:
    """The retention base of ``schema.table``: its state as of the newest dropped change."""
    return join(root, qualified_name, BASE_DIR)


def normalize_root(root: str) -> str:
    """Absolute local paths for plain paths (deltalake and DuckDB resolve relative paths
    against different working directories); URIs with a scheme are kept as they are."""
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


# deltalake-style storage_options keys (case-insensitive) -> pyarrow S3FileSystem arguments.
_S3_OPTION_KEYS: dict[str, str] = {
    "aws_access_key_id": "access_key",
    "access_key_id": "access_key",
    "aws_secret_access_key": "secret_key",
    "secret_access_key": "secret_key",
    "aws_session_token": "session_token",
    "session_token": "session_token",
    "aws_region": "region",
    "region": "region",
    "aws_endpoint_url": "endpoint_override",
    "aws_endpoint": "endpoint_override",
    "endpoint_url": "endpoint_override",
    "endpoint": "endpoint_override",
}


def filesystem(
    root: str, storage_options: dict[str, str] | None = None
) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the in-filesystem path of a lake root.

    Plain paths use :class:`pyarrow.fs.LocalFileSystem` (``~`` expanded and made absolute,
    so a later ``chdir`` cannot move the lake). URIs go through :meth:`pyarrow.fs.FileSystem.from_uri`.
    For ``s3://`` the usual deltalake ``storage_options`` keys (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
    ``AWS_ALLOW_HTTP``) are translated; other keys, and options for other schemes, have no
    pyarrow equivalent and are ignored, so those stores take credentials from the
    environment (e.g. ``GOOGLE_APPLICATION_CREDENTIALS``).
    """
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
    parsed = urlparse(root)
    if parsed.scheme == "s3" and storage_options:
        kwargs: dict[str, Any] = {}
        for key, value in storage_options.items():
            name = _S3_OPTION_KEYS.get(key.lower())
            if name is not None:
                kwargs[name] = value
            elif key.lower() in ("aws_allow_http", "allow_http") and value.lower() == "true":
                kwargs["scheme"] = "http"
        endpoint = kwargs.get("endpoint_override")
        if isinstance(endpoint, str) and "://" in endpoint:
            # pyarrow wants host[:port] plus a separate scheme.
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc
            kwargs.setdefault("scheme", ep.scheme)
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (OSError, ValueError) as exc:
        raise TerminalCatalogError(f"cannot open lake root {root!r}: {exc}") from exc
    return fs, path.rstrip("/")


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old content or the new, never a partial file.

    Local files are written beside the target and renamed over it; on object stores a
    single PUT is already atomic.

    Raises:
        TransientCatalogError: the write failed (the old content, if any, is intact).
    """
    parent = path.rsplit("/", 1)[0]
    try:
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)
    except OSError as exc:
        # A full disk, a permission changed under us, an object store that did not
        # answer: the old content is intact and writing again may succeed.
        raise TransientCatalogError(f"cannot write {path}: {exc}") from exc
