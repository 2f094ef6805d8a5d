"""One writer per output directory: an ``flock`` on ``DIR/.lock`` held for the whole run.

``fcntl.flock`` locks belong to the open file description, so the kernel releases the lock when
the holding process dies, SIGKILL included: a crashed run never leaves a stale lock behind.
The file's text (pid, host, start time) is only there to name the holder in the error message
of a second run; it is not what enforces exclusion.

Caveat (documented in docs/precompute.md): ``flock`` is reliable on local filesystems and on
NFSv4 (Linux emulates it with POSIX locks); on filesystems without lock support two drivers on
different machines are not kept apart. Only the driver takes the lock; dask workers write
content-addressed cache entries, which are safe to write concurrently.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
from pathlib import Path

from anaus_core.errors import UserInputError

LOCK_NAME = ".lock"


class OutputLock:
    """Context manager: exclusive, non-blocking lock on ``out_dir/.lock``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserInputError(
                f"{self.out_dir}: is being written by another precompute-masks run ({holder}); "
                "wait for it to finish or use another --out directory"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _dt.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
    except (OSError, ValueError):
        return "holder unknown"
