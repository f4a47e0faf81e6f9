"""Whether a lake's store lets several writers commit to one Delta table without losing a
commit, and the check every writer (``cdc run``, ``cdc sink``, ``cdc jobs``) makes first.

A Delta commit is the creation of ``_delta_log/<version>.json``: two writers that both
create version N must see one of them fail, or one commit silently replaces the other.
Local filesystems, GCS and Azure create files atomically. S3 does since 2024 (conditional
writes, ``If-None-Match: *``), and delta-rs relies on it by default; but S3-compatible stores
that ignore the header exist, and delta-rs's ``AWS_S3_ALLOW_UNSAFE_RENAME=true`` (or
``conditional_put=disabled``) gives up the guarantee.

So on an S3-compatible store (a custom endpoint) the check *probes*: it creates one scratch
object twice with ``If-None-Match: *``, as delta-rs creates commit files; a store with safe
commits refuses the second. AWS S3 itself, GCS and Azure are known to be safe. Writers on a
store without safe commits (or where that cannot be told) are refused with a message naming
the settings, never switched to unsafe mode behind the user's back.

Example:
    >>> require_safe_commits("s3://bucket/lake", {"conditional_put": "etag"})  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, urlparse

from catalog import lake_layout
from catalog.errors import TransientCatalogError, UnsafeCommitsError

__all__ = ["CommitSafety", "UnsafeCommitsError", "commit_safety", "require_safe_commits"]

log = logging.getLogger(__name__)

#: The option by which a user accepts unsafe commits (delta-rs's own name for it).
UNSAFE_OPTION = "AWS_S3_ALLOW_UNSAFE_RENAME"


@dataclass(frozen=True, slots=True)
class CommitSafety:
    """``safe``: concurrent commits cannot overwrite each other. ``reason``: why (not)."""

    safe: bool
    reason: str


_cache: dict[tuple[str, tuple[tuple[str, str], ...]], CommitSafety] = {}
_lock = threading.Lock()


def commit_safety(root: str, storage_options: Mapping[str, str] | None = None) -> CommitSafety:
    """Whether commits to the lake at ``root`` are safe with several writers (cached per
    root and options for the life of the process).

    Raises:
        TransientCatalogError: the store could not be reached to probe it.
    """
    options = {k.lower(): v for k, v in (storage_options or {}).items()}
    if "://" not in root or root.startswith("file://"):
        return CommitSafety(True, "local filesystem: atomic create of each commit file")
    scheme = urlparse(root).scheme.lower()
    if scheme not in ("s3", "s3a"):
        return CommitSafety(True, f"{scheme}://: the store creates commit files atomically")
    if options.get(UNSAFE_OPTION.lower(), "").lower() == "true":
        return CommitSafety(False, f"{UNSAFE_OPTION}=true gives up atomic commit creation")
    if options.get("conditional_put", "").lower() == "disabled":
        return CommitSafety(False, "conditional_put=disabled: no conditional create")
    key = (root, tuple(sorted(options.items())))
    with _lock:
        cached = _cache.get(key)
        if cached is None:
            cached = _probe(root, dict(storage_options or {}))
            _cache[key] = cached
    return cached


def require_safe_commits(
    root: str, storage_options: Mapping[str, str] | None = None, *, writer: str = "writer"
) -> None:
    """Refuse to start ``writer`` on a lake whose store cannot commit safely.

    A user who knows this is the lake's only writer (one ``cdc run`` or one ``cdc sink``,
    and no ``cdc jobs`` beside it) may accept the risk by setting
    ``AWS_S3_ALLOW_UNSAFE_RENAME=true`` in the lake's storage options: then the writer starts
    with a warning.

    Raises:
        UnsafeCommitsError: the store offers no safe commit and the risk is not accepted.
        TransientCatalogError: the store could not be reached to probe it.
    """
    safety = commit_safety(root, storage_options)
    if safety.safe:
        return
    options = {k.lower(): v for k, v in (storage_options or {}).items()}
    if options.get(UNSAFE_OPTION.lower(), "").lower() == "true":
        log.warning(
            "%s on %s: %s. Only ONE writer may use this lake (no other cdc run/sink, no cdc "
            "jobs beside it), or commits will be lost",
            writer,
            root,
            safety.reason,
        )
        return
    raise UnsafeCommitsError(
        f"refusing to start {writer}: the store of {root} offers no safe commit ({safety.reason}); "
        "several writers (sink workers, cdc jobs) would silently lose commits. Use a store "
        "that honours conditional writes and set conditional_put=etag in "
        "CDC_LAKE__STORAGE_OPTIONS; or, if this is the lake's only writer, accept the risk "
        f"with {UNSAFE_OPTION}=true there"
    )


def _probe(root: str, storage_options: dict[str, str]) -> CommitSafety:
    """Create one probe object twice with ``If-None-Match: *``: a store with safe commits
    refuses the second (412/409), one that ignores the condition overwrites it.

    delta-rs itself creates commit files this way; it cannot be asked to race itself from
    Python (it refreshes its snapshot before each commit), so the probe speaks S3 directly,
    signed with the static credentials of the options or the environment.
    """
    options = {k.lower(): v for k, v in storage_options.items()}
    endpoint = _first(options, "aws_endpoint_url", "aws_endpoint", "endpoint_url", "endpoint")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint is None:
        # AWS S3 itself has honoured conditional writes since 2024, and delta-rs uses them.
        return CommitSafety(True, "AWS S3: conditional writes (If-None-Match)")
    key_id = _first(options, "aws_access_key_id", "access_key_id") or os.environ.get(
        "AWS_ACCESS_KEY_ID"
    )
    secret = _first(options, "aws_secret_access_key", "secret_access_key") or os.environ.get(
        "AWS_SECRET_ACCESS_KEY"
    )
    token = _first(options, "aws_session_token", "session_token", "token") or os.environ.get(
        "AWS_SESSION_TOKEN"
    )
    region = (
        _first(options, "aws_region", "region")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    if not (key_id and secret):
        if options.get("conditional_put", "").lower() == "etag":
            return CommitSafety(True, "conditional_put=etag (not probed: no static credentials)")
        return CommitSafety(
            False,
            f"cannot tell whether {endpoint} honours conditional writes (no static "
            "credentials to probe it with)",
        )
    parsed = urlparse(root)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    name = "/".join(
        p for p in (prefix, lake_layout.INTERNAL_DIR, "commit_probe", uuid.uuid4().hex) if p
    )
    virtual = (_first(options, "aws_virtual_hosted_style_request") or "").lower() == "true"
    ep = urlparse(endpoint)
    host = f"{bucket}.{ep.netloc}" if virtual else ep.netloc
    path = f"/{name}" if virtual else f"/{bucket}/{name}"
    signer = _Signer(key_id, secret, token, region)
    try:
        first = signer.send(ep.scheme, host, "PUT", path, b"1", {"If-None-Match": "*"})
        second = signer.send(ep.scheme, host, "PUT", path, b"2", {"If-None-Match": "*"})
        signer.send(ep.scheme, host, "DELETE", path, b"", {})
    except OSError as exc:
        raise TransientCatalogError(
            f"cannot probe commit safety of {root} at {endpoint}: {exc}; is the store reachable?"
        ) from exc
    if first not in (200, 201):
        raise TransientCatalogError(
            f"cannot probe commit safety of {root}: creating {path} answered HTTP {first}"
        )
    if second in (409, 412):
        return CommitSafety(True, "the store refuses to create an object that exists")
    return CommitSafety(
        False, f"{endpoint} ignores conditional writes (If-None-Match: * answered {second})"
    )


def _first(options: Mapping[str, str], *keys: str) -> str | None:
    for key in keys:
        if options.get(key):
            return options[key]
    return None


class _Signer:
    """AWS Signature Version 4 for one S3 request at a time (the probe's two PUTs)."""

    def __init__(self, key_id: str, secret: str, token: str | None, region: str) -> None:
        self.key_id, self.secret, self.token, self.region = key_id, secret, token, region

    def send(
        self, scheme: str, host: str, method: str, path: str, body: bytes, extra: dict[str, str]
    ) -> int:
        now = datetime.now(UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest()
        headers = {
            "host": host,
            "x-amz-date": stamp,
            "x-amz-content-sha256": payload,
            **{k.lower(): v for k, v in extra.items()},
        }
        if self.token:
            headers["x-amz-security-token"] = self.token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join(
            [
                method,
                quote(path, safe="/-_.~"),
                "",
                "".join(f"{n}:{headers[n].strip()}\n" for n in names),
                signed,
                payload,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, SignedHeaders={signed}, "
            f"Signature={signature}"
        )
        import http.client  # here: only object stores are probed, and it takes 5-40 ms to load

        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, timeout=30)
        try:
            conn.request(method, quote(path, safe="/-_.~"), body=body or None, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()
