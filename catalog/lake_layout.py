"""Where things live in the lake, and the names of the changelog metadata columns.

Layout (``root`` is a local path or an object-store URI)::

    <root>/<schema>.<table>/changes   changelog Delta table, partitioned by _cdc_date
    <root>/<schema>.<table>/current   current-state Delta table (written by `cdc jobs merge`)
    <root>/_cdc/schemas/...           embedded-mode schema registry
    <root>/_cdc/pipelines/<name>.json pipeline state (snapshot progress)
    <root>/_dlq                       dead letters
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs

#: Metadata columns of every changelog table, in the order they are written.
OP = "_cdc_op"  # c, u, d, r (snapshot read), t (truncate)
LSN = "_cdc_lsn"  # commit LSN of the source transaction, int64
SEQ = "_cdc_seq"  # order of the change within its transaction
TXID = "_cdc_txid"
COMMIT_TS = "_cdc_commit_ts"  # UTC
INGESTED_AT = "_cdc_ingested_at"  # UTC, when the sink wrote the row
UNCHANGED_TOAST = "_cdc_unchanged_toast"  # names of TOASTed columns PostgreSQL did not resend
DATE = "_cdc_date"  # partition column: UTC date of the commit

METADATA_COLUMNS: tuple[str, ...] = (
    OP,
    LSN,
    SEQ,
    TXID,
    COMMIT_TS,
    INGESTED_AT,
    UNCHANGED_TOAST,
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


def normalize_root(root: str) -> str:
    """Absolute local paths for plain paths (deltalake and DuckDB resolve relative paths
    against different working directories); URIs with a scheme are kept as they are."""
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


def filesystem(
    uri: str, storage_options: dict[str, str] | None = None
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for small metadata files in the lake.

    Object stores take their credentials from the environment, as pyarrow does; the
    ``storage_options`` given to deltalake are not translated (only the region is).
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    if storage_options and isinstance(fs, pafs.S3FileSystem):
        region = storage_options.get("AWS_REGION") or storage_options.get("region")
        if region:
            fs = pafs.S3FileSystem(region=region)
    return fs, path


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old content or the new, never a partial file.

    Local files are written beside the target and renamed over it; on object stores a
    single PUT is already atomic.
    """
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)
