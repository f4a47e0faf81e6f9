"""A server process for the tests (the Tansu broker, moto's S3 server): output to a temp
file, stop, pause and resume, and free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO


class ServerProcess:
    """One child process whose output goes to a temporary log file (not a pipe: nobody
    reads a pipe while tests run, and a full pipe would block the server)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        assert self._process is not None, f"{self._prefix} is not running"
        return self._process.pid

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv``; raises OSError (after cleaning up) if it cannot be run."""
        fd, name = tempfile.mkstemp(prefix=f"{self._prefix}-", suffix=".log")
        self._log_path = Path(name)
        self._log = os.fdopen(fd, "w+b")
        try:
            self._process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
            )
        except OSError:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (after SIGCONT: a paused process cannot handle it), then SIGKILL after
        ``timeout`` seconds; removes the log. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
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

    def pause(self) -> None:
        """SIGSTOP: a network cut as clients see it (connections stay open, nothing answers),
        without losing what the server holds in memory, as a restart would."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def output_tail(self, lines: int = 30) -> str:
        if self._log is None:
            return f"(no {self._prefix} output)"
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        tail = "\n".join(text.splitlines()[-lines:])
        return f"{self._prefix} output (last {lines} lines):\n{tail}" if tail else "(output empty)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
