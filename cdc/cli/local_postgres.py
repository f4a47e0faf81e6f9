"""A throwaway PostgreSQL server built from the machine's own binaries.

Used by ``cdc demo`` and by the test fixtures: both need a server with ``wal_level=logical``
that nobody else depends on, without Docker and without touching a system cluster.

:class:`LocalPostgres` runs ``initdb`` into a directory of its own, starts the server on a
loopback port with trust authentication, and removes everything again on :meth:`~LocalPostgres.stop`
(when it created the directory itself).

Hazards, all deliberate for a throwaway server:

* ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are off, so a crash of the
  machine (or of the server) can lose or corrupt committed data. Never point it at data
  you want to keep.
* Authentication is ``trust``: anyone who can reach ``127.0.0.1`` on that port (any local
  user) can connect as superuser. It never listens on other interfaces.
* PostgreSQL refuses to run as root. When this process is root the server runs as the
  ``postgres`` OS user (via ``runuser``, or ``su`` where that is missing), so that user
  must exist and be able to reach the base directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from cdc.cli.errors import LocalPostgresError

__all__ = ["LocalPostgres", "find_pg_bin_dir"]

#: OS user the server runs as when this process is root.
POSTGRES_OS_USER = "postgres"

#: Where Debian/Ubuntu install the server binaries (one directory per major version).
_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")

#: Unix socket paths are limited to ~107 bytes (sun_path); keep a margin for ".s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 90

#: Name of the settings file written into the data directory and included by postgresql.conf.
_SETTINGS_FILE = "local_postgres.conf"

_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or in "
    "/usr/lib/postgresql/*/bin. Install them with `apt-get install postgresql` "
    "(Debian/Ubuntu) or `brew install postgresql` (macOS), or pass `--source DSN` "
    "to use an existing server (with wal_level=logical) instead."
)


def find_pg_bin_dir() -> Path | None:
    """Return the directory holding ``initdb`` and ``pg_ctl``, or None when there is none.

    Looks for ``initdb`` on ``PATH`` first, then in ``/usr/lib/postgresql/*/bin`` with the
    newest major version first (Debian does not put ``initdb`` on ``PATH``).
    """
    on_path = shutil.which("initdb")
    if on_path is not None:
        # PATH often holds a symlink (/usr/local/bin/initdb -> .../15/bin/initdb); prefer
        # the real directory, where pg_ctl and postgres of the same version live.
        for candidate in (Path(on_path).resolve().parent, Path(on_path).parent):
            if _is_executable(candidate / "pg_ctl"):
                return candidate

    versions: list[tuple[tuple[int, ...], Path]] = []
    with contextlib.suppress(OSError):
        for version_dir in _DEBIAN_PG_ROOT.iterdir():
            bin_dir = version_dir / "bin"
            if _is_executable(bin_dir / "initdb") and _is_executable(bin_dir / "pg_ctl"):
                versions.append((_version_key(version_dir.name), bin_dir))
    if versions:
        return max(versions, key=lambda item: item[0])[1]
    return None


class LocalPostgres:
    """A private PostgreSQL server on a loopback port, for demos and tests.

    ::

        with LocalPostgres() as pg:
            conn = psycopg.connect(pg.dsn)

    Args:
        base_dir: directory for the data directory, the log and (when the path is short
            enough) the unix socket. Created if missing. When None, a temporary directory
            is created and removed again by :meth:`stop`. A given ``base_dir`` is kept, and
            an existing data directory in it is reused on the next :meth:`start`.
        port: TCP port on 127.0.0.1. When None a free port is picked (and another one
            tried if it is taken by the time the server binds it).
        settings: server settings that override the defaults (see :attr:`DEFAULT_SETTINGS`).
        start_timeout: seconds :meth:`start` waits for the server to accept connections.

    Hazard: the defaults turn durability off (``fsync=off`` and friends), so the server can
    lose data on a crash; that is fine only because the server is thrown away.
    """

    #: Defaults applied on every start; ``settings`` overrides them key by key.
    DEFAULT_SETTINGS: Mapping[str, str] = {
        "wal_level": "logical",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "listen_addresses": "127.0.0.1",
        # Throwaway server: durability costs time and buys nothing here, since the data
        # directory is deleted afterwards. A crash may lose or corrupt data.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self._given_base_dir = Path(base_dir).absolute() if base_dir is not None else None
        self._port_given = port is not None
        self._port = port if port is not None else _free_port()
        self._overrides = dict(settings or {})
        self._start_timeout = start_timeout
        self._base_dir: Path | None = self._given_base_dir
        self._socket_dir: Path | None = None
        self._owned_dirs: list[Path] = []
        self._bin_dir: Path | None = None
        self._started = False

    # -- properties ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port the server listens on (127.0.0.1 only)."""
        return self._port

    @property
    def dsn(self) -> str:
        """Connection string for the ``postgres`` superuser and database (trust auth)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """Connection string for the ``postgres`` superuser on ``database``."""
        return f"postgresql://{POSTGRES_OS_USER}@127.0.0.1:{self._port}/{database}"

    @property
    def base_dir(self) -> Path:
        """Directory holding the data directory and the log."""
        if self._base_dir is None:
            raise LocalPostgresError("the server has no directory yet: call start() first")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server log (written by ``pg_ctl -l``)."""
        return self.base_dir / "postgres.log"

    @property
    def running(self) -> bool:
        """True while the server started by :meth:`start` is alive."""
        if not self._started or self._base_dir is None:
            return False
        return _postmaster_alive(self.data_dir / "postmaster.pid")

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster if needed, start the server and wait until it accepts connections.

        Raises:
            LocalPostgresError: the binaries are missing, ``initdb`` or ``pg_ctl`` failed, or
                the server did not accept connections within ``start_timeout`` seconds. The
                message includes the tail of the server log where there is one.
        """
        if self._started:
            return
        bin_dir = find_pg_bin_dir()
        if bin_dir is None:
            raise LocalPostgresError(_INSTALL_HINT)
        self._bin_dir = bin_dir
        try:
            self._prepare_dirs()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            self._start_server()
        except BaseException:
            # Also on Ctrl-C while waiting: a half-started server must not outlive us.
            if self._base_dir is not None and _postmaster_alive(self.data_dir / "postmaster.pid"):
                with contextlib.suppress(LocalPostgresError):
                    self._pg_ctl_stop()
            self._cleanup_dirs()
            raise
        self._started = True
        # A crashed test session or an interrupted demo must not leave a server behind.
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are disconnected) and clean up.

        Idempotent. Removes the base directory when it was created by :meth:`start`.

        Raises:
            LocalPostgresError: ``pg_ctl stop`` failed while the server is still running.
        """
        atexit.unregister(self.stop)
        try:
            if self._started and self._base_dir is not None and self.running:
                self._pg_ctl_stop()
        finally:
            self._started = False
            self._cleanup_dirs()

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

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalPostgres(port={self._port}, base_dir={self._base_dir}, {state})"

    # -- steps -----------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        if self._given_base_dir is None:
            # mkdtemp under the system temp dir: /tmp is world-traversable, so the postgres
            # user can reach it once the directory itself is chowned.
            self._base_dir = Path(tempfile.mkdtemp(prefix="cdc-pg-"))
            self._owned_dirs.append(self._base_dir)
        else:
            self._base_dir = self._given_base_dir
            try:
                self._base_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LocalPostgresError(f"cannot create {self._base_dir}: {e}") from e
        self._hand_to_server_user(self._base_dir)

        if len(str(self._base_dir)) <= _MAX_SOCKET_DIR_LEN:
            self._socket_dir = self._base_dir
        else:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="cdc-pgs-"))
            self._owned_dirs.append(self._socket_dir)
            self._hand_to_server_user(self._socket_dir)

    def _hand_to_server_user(self, directory: Path) -> None:
        """As root, give ``directory`` to the postgres user and check it can write there."""
        if not _is_root():
            return
        try:
            shutil.chown(directory, user=POSTGRES_OS_USER, group=POSTGRES_OS_USER)
        except (LookupError, OSError) as e:
            raise LocalPostgresError(
                f"running as root, so PostgreSQL must run as the {POSTGRES_OS_USER!r} OS user, "
                f"but {directory} could not be given to it: {e}"
            ) from e
        probe = self._as_server_user(["test", "-w", str(directory), "-a", "-x", str(directory)])
        try:
            returncode = subprocess.run(probe, capture_output=True, check=False).returncode
        except OSError as e:
            raise LocalPostgresError(
                f"cannot run commands as the {POSTGRES_OS_USER!r} OS user (runuser/su): {e}"
            ) from e
        if returncode != 0:
            raise LocalPostgresError(
                f"the {POSTGRES_OS_USER!r} OS user cannot write to {directory} (most likely "
                "a parent directory it cannot traverse); choose a base_dir under /tmp or "
                "another world-traversable directory"
            )

    def _initdb(self) -> None:
        self._run(
            [
                str(self._bin("initdb")),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                POSTGRES_OS_USER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                # Throwaway cluster: skip the final fsync of the new data directory.
                "--no-sync",
            ],
            what="initdb",
        )
        # Trust only over loopback and the private socket, whatever initdb's defaults are.
        hba = (
            "# Written by cdc.cli.local_postgres: throwaway server, trust on loopback only.\n"
            "local all         all              trust\n"
            "host  all         all 127.0.0.1/32 trust\n"
            "local replication all              trust\n"
            "host  replication all 127.0.0.1/32 trust\n"
        )
        self._write_server_file(self.data_dir / "pg_hba.conf", hba)
        conf = self.data_dir / "postgresql.conf"
        self._write_server_file(
            conf,
            conf.read_text(encoding="utf-8") + f"\ninclude_if_exists '{_SETTINGS_FILE}'\n",
        )

    def _start_server(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        # Only a port we picked may be replaced: someone may grab it between the pick and
        # the server's bind.
        attempts = 1 if self._port_given else 3
        for attempt in range(1, attempts + 1):
            self._write_settings()
            log_size = _file_size(self.log_path)
            try:
                self._run(
                    [
                        str(self._bin("pg_ctl")),
                        "start",
                        "-D",
                        str(self.data_dir),
                        "-l",
                        str(self.log_path),
                        "-w",
                        "-t",
                        str(max(1, int(deadline - time.monotonic()))),
                    ],
                    what="pg_ctl start",
                )
            except LocalPostgresError:
                new_log = _read_from(self.log_path, log_size)
                if attempt < attempts and "could not bind" in new_log:
                    self._port = _free_port()
                    continue
                raise
            break
        self._wait_for_connections(deadline)

    def _wait_for_connections(self, deadline: float) -> None:
        # pg_ctl -w returns once postmaster.pid says "ready"; a real connection proves the
        # TCP listener and pg_hba.conf are as expected.
        last_error: Exception | None = None
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as e:
                last_error = e
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise LocalPostgresError(
            f"PostgreSQL on port {self._port} did not accept connections within "
            f"{self._start_timeout:.0f}s: {last_error}\n{self._log_tail()}"
        ) from last_error

    def _pg_ctl_stop(self) -> None:
        self._run(
            [str(self._bin("pg_ctl")), "stop", "-D", str(self.data_dir), "-m", "fast", "-w"],
            what="pg_ctl stop",
        )

    def _cleanup_dirs(self) -> None:
        for directory in self._owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._owned_dirs.clear()
        if self._given_base_dir is None:
            self._base_dir = None
        self._socket_dir = None

    # -- helpers ---------------------------------------------------------------------

    def _settings(self) -> dict[str, str]:
        merged = dict(self.DEFAULT_SETTINGS)
        merged["port"] = str(self._port)
        merged["unix_socket_directories"] = str(self._socket_dir or self.base_dir)
        merged.update(self._overrides)
        return merged

    def _write_settings(self) -> None:
        lines = [
            "# Written by cdc.cli.local_postgres on every start; edits are overwritten.",
            *(f"{key} = {_conf_quote(value)}" for key, value in self._settings().items()),
        ]
        self._write_server_file(self.data_dir / _SETTINGS_FILE, "\n".join(lines) + "\n")

    def _write_server_file(self, path: Path, text: str) -> None:
        try:
            path.write_text(text, encoding="utf-8")
            if _is_root():
                shutil.chown(path, user=POSTGRES_OS_USER, group=POSTGRES_OS_USER)
        except OSError as e:
            raise LocalPostgresError(f"cannot write {path}: {e}") from e

    def _bin(self, name: str) -> Path:
        assert self._bin_dir is not None, "start() sets the binary directory first"
        return self._bin_dir / name

    def _as_server_user(self, argv: Sequence[str]) -> list[str]:
        """Wrap ``argv`` so that it runs as the postgres OS user when we are root."""
        if not _is_root():
            return list(argv)
        runuser = shutil.which("runuser")
        if runuser is not None:
            return [runuser, "-u", POSTGRES_OS_USER, "--", *argv]
        # su needs an explicit shell: the postgres account's own may be nologin.
        return ["su", POSTGRES_OS_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _run(self, argv: Sequence[str], *, what: str) -> None:
        env = os.environ.copy()
        # pg_ctl/initdb read these; the explicit -D and settings file must win.
        for var in ("PGDATA", "PGPORT", "PGHOST"):
            env.pop(var, None)
        try:
            # stdin closed and cwd in base_dir: the postgres user may not be able to read the
            # caller's working directory, and nothing here must wait for input.
            result = subprocess.run(
                self._as_server_user(argv),
                cwd=self.base_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
                timeout=self._start_timeout + 30,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise LocalPostgresError(f"{what} could not be run: {e}") from e
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise LocalPostgresError(
                f"{what} failed with exit code {result.returncode}:\n{output}\n{self._log_tail()}"
            ) from subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, LocalPostgresError):
            return "(no server log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"last lines of {self.log_path}:\n{tail}" if tail else "(server log is empty)"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(name: str) -> tuple[int, ...]:
    """Sort key for version directory names such as ``15`` or ``9.6``; others sort first."""
    if re.fullmatch(r"\d+(\.\d+)*", name):
        return tuple(int(part) for part in name.split("."))
    return (-1,)


def _free_port() -> int:
    # Bind to port 0 and let the kernel choose; the port is released at once, so another
    # process could take it before the server binds it (start() retries then).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    """Quote a value for postgresql.conf (single quotes, embedded quotes doubled)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _postmaster_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text(encoding="utf-8").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Alive, but owned by another user (can only happen when not root).
        return True
    return True


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
