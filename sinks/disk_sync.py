"""Makes a lake on a local disk durable before PostgreSQL is told it may forget the changes.

A Delta commit on a local disk (delta-rs's, or :mod:`sinks.delta_append`'s) is written to
the page cache, not to the disk: it survives ``kill -9`` but not a power cut or a kernel
crash. PostgreSQL, once told an LSN is flushed, may recycle the WAL before it, so a commit
lost that way would be lost for good. :class:`LakeDiskSync` syncs the lake's filesystem
(``syncfs``, or ``sync`` where there is none) in a thread of its own, and says up to which
LSN the synced writes reach; the pipeline confirms no further.

One sync covers every commit, checkpoint and state file written before it started, so its
cost is shared by all the tables of a flush. It also writes back whatever else is dirty on
that filesystem: put a busy database and the lake on different filesystems.

Lakes on object stores need none of this: a finished PUT is durable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable

from sinks.errors import TerminalSinkError

log = logging.getLogger(__name__)


def filesystem_sync() -> Callable[[int], None]:
    """``sync(fd)``: write back the filesystem holding ``fd`` (Linux ``syncfs``), or every
    filesystem (``os.sync``) where ``syncfs`` is missing."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        return lambda fd: os.sync()
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int

    def sync(fd: int) -> None:
        if syncfs(fd) != 0:  # ctypes releases the GIL for the call
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return sync


class LakeDiskSync:
    """Syncs a local lake in the background; :meth:`durable` says how far that reaches.

    Example:
        >>> sync = LakeDiskSync("/tmp")  # doctest: +SKIP
        >>> sync.durable(lsn)  # 0 at first; lsn once a sync started after this call ended
        >>> sync.durable_now(lsn)  # lsn: syncs first (at shutdown)
        >>> sync.close()

    Warning: until a sync finishes, :meth:`durable` holds the confirmed LSN back, and the
    slot keeps the WAL since. A disk that stops answering stalls the confirmations, not the
    pipeline; an error from the disk stops the pipeline (:class:`TerminalSinkError`), since
    the writes it covers may be gone.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._sync = filesystem_sync()
        self._changed = threading.Condition()
        self._requested = 0  # newest LSN whose writes ended before it was asked for
        self._synced = 0  # newest LSN covered by a finished sync
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cdc-lake-sync", daemon=True)
        self._thread.start()

    def durable(self, lsn: int) -> int:
        """Everything written so far covers ``lsn``: returns the newest LSN made durable, at
        most ``lsn``, without waiting (the next sync is started in the background)."""
        with self._changed:
            self._raise_failure()
            if lsn > self._requested:
                self._requested = lsn
                self._changed.notify_all()
            return min(self._synced, lsn)

    def durable_now(self, lsn: int) -> int:
        """:meth:`durable`, waiting for the sync that covers ``lsn`` (used at shutdown)."""
        self.durable(lsn)
        with self._changed:
            self._changed.wait_for(lambda: self._synced >= lsn or self._failure is not None)
            self._raise_failure()
            return lsn

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise TerminalSinkError(
                f"syncing the lake {self.root} to disk failed ({self._failure}): the newest "
                "commits may not be on the disk; check the disk, then restart (the slot "
                "still holds everything since the last confirmed LSN)"
            ) from self._failure

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._requested > self._synced)
                if self._closed:
                    return
                # Taken before the sync starts: the writes it stands for have ended.
                target = self._requested
            try:
                self._sync_root()
            except OSError as e:
                self._fail(e)
                return
            with self._changed:
                self._synced = max(self._synced, target)
                self._changed.notify_all()

    def _sync_root(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except FileNotFoundError:
            return  # nothing was ever written there
        try:
            self._sync(fd)
        finally:
            os.close(fd)

    def _fail(self, error: OSError) -> None:
        log.error("syncing the lake %s failed: %s", self.root, error)
        with self._changed:
            self._failure = error
            self._changed.notify_all()
