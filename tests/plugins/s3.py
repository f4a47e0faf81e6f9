"""Pytest plugin: a local S3 API server (moto's ``moto_server``) for the session, and a fresh
bucket per test.

Fixtures:

* ``s3_server`` (session): a started :class:`MotoServer` on a free loopback port.
* ``s3_lake`` (function): a :class:`S3Lake` in a new bucket: ``uri`` (``s3://<bucket>/lake``)
  and the ``storage_options`` deltalake, DuckDB and the CLI (``CDC_LAKE__STORAGE_OPTIONS``)
  need for it.

Tests that use them should be marked ``@pytest.mark.s3``.

moto behaviour worth knowing:

* It keeps everything in memory; a bucket is gone when the server stops. Pausing the
  process (:meth:`MotoServer.pause`, SIGSTOP) makes every request hang until
  :meth:`MotoServer.resume`: the way the fault tests make the store refuse writes.
* It honours ``If-None-Match: *`` and ``If-Match`` on PUT, which is what deltalake's
  ``conditional_put=etag`` needs for safe concurrent commits.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.plugins.processes import ServerProcess, free_port, port_open

#: Fixed test credentials: moto accepts any.
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


class MotoStartError(RuntimeError):
    """moto_server could not be started or did not answer."""


class MotoServer:
    """A ``moto_server`` process on 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self._server = ServerProcess("moto")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict[str, str]:
        """deltalake-style storage options for this server, with safe concurrent commits."""
        return {
            **_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "conditional_put": "etag",
        }

    def start(self, timeout: float = 30.0) -> None:
        binary = Path(sys.executable).with_name("moto_server")
        try:
            self._server.spawn([str(binary), "-H", "127.0.0.1", "-p", str(self.port)])
        except OSError as e:
            raise MotoStartError(
                f"cannot run {binary}: {e}; pip install -e '.[test]' brings moto[server]"
            ) from e
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if not self._server.running or time.monotonic() > deadline:
                output = self._server.output_tail()
                self.stop()
                raise MotoStartError(f"moto_server did not listen on {self.endpoint}\n{output}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.stop()

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, nothing answers."""
        self._server.pause()

    def resume(self) -> None:
        self._server.resume()

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=_CREDENTIALS["AWS_REGION"],
        )
        client.create_bucket(Bucket=name)


@dataclass(frozen=True)
class S3Lake:
    """A lake root in its own bucket on the test S3 server."""

    server: MotoServer
    uri: str
    storage_options: dict[str, str]

    def env(self) -> dict[str, str]:
        """Environment for ``cdc`` processes: the lake and its storage options."""
        return {
            "CDC_LAKE__PATH": self.uri,
            "CDC_LAKE__STORAGE_OPTIONS": json.dumps(self.storage_options),
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A moto S3 server shared by the session."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_lake(s3_server: MotoServer) -> S3Lake:
    """A lake root ``s3://<new bucket>/lake`` and its storage options."""
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return S3Lake(s3_server, f"s3://{bucket}/lake", s3_server.storage_options())


class ConditionIgnoringProxy:
    """An HTTP proxy in front of an S3 server that drops ``If-None-Match``/``If-Match``
    headers: an S3-compatible store that ignores conditional writes, on which concurrent
    Delta commits can overwrite each other.

    Example:
        >>> with ConditionIgnoringProxy(server) as proxy:  # doctest: +SKIP
        ...     options = {**server.storage_options(), "AWS_ENDPOINT_URL": proxy.endpoint}
    """

    _DROPPED = frozenset({"if-none-match", "if-match"})

    def __init__(self, server: MotoServer) -> None:
        import http.client
        import http.server
        import threading

        target = ("127.0.0.1", server.port)
        dropped = self._DROPPED

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                upstream = http.client.HTTPConnection(*target, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> ConditionIgnoringProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
