"""Output folders of every writing command: one writer at a time, usable, no stale temp files.

``claim_output(out, command=...)`` is the one mechanism every command that writes a folder
(``precompute-masks``, ``pretrain``, ``lpsam adapt/train-prompter/predict``, ``make-phantoms``,
``export-encoder``, ``demo``) goes through before writing anything:

1. the path must not be an existing file, and the folder must be creatable and writable
   (a one-line ``UserInputError`` otherwise, never a traceback);
2. an ``flock`` on ``OUT/.lock`` is taken for the whole run (``OutputLock``); a second command
   writing the same folder stops with a one-line error naming the holder;
3. temporary files a killed run left behind (names containing ``.tmp-``, e.g. a checkpoint's
   ``.last.pt.tmp-PID``) are removed. This is safe only because the lock is held: no live
   writer can own them.

``fcntl.flock`` locks belong to the open file description, so the kernel releases the lock when
the holding process dies, SIGKILL included: a crashed run never leaves a stale lock behind.
The file's text (command, pid, host, start time) only names the holder in the error message.
Caveat: ``flock`` is reliable on local filesystems and NFSv4; on filesystems without lock
support two writers on different machines are not kept apart.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from anaus_core.errors import UserInputError

LOCK_NAME = ".lock"
TEMP_MARK = ".tmp-"


class OutputLock:
    """Context manager: exclusive, non-blocking lock on ``out_dir/.lock``.

    ``command`` names the kind of run in the message a second writer gets.
    """

    def __init__(self, out_dir: str | Path, *, command: str = "anaus", option: str = "--out") -> None:
        self.out_dir = Path(out_dir)
        self.option = option
        self.path = self.out_dir / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        ensure_writable_dir(self.out_dir, option=self.option)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserInputError(f"{self.out_dir}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            command, holder = _read_holder(fd)
            os.close(fd)
            raise UserInputError(
                f"{self.out_dir}: is being written by another {command} run ({holder}); "
                "wait for it to finish or use another --out directory"
            ) from None
        info = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now().isoformat(timespec="seconds")}
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


def _read_holder(fd: int) -> tuple[str, str]:
    """(command, "pid … on host, started …") of the lock's holder, as far as its file says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (str(info.get("command", "anaus")),
                f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}")
    except (OSError, ValueError):
        return "anaus", "holder unknown"


def ensure_writable_dir(path: str | Path, *, option: str = "--out") -> Path:
    """Create ``path`` (and parents) as a folder or raise a one-line ``UserInputError``: an
    existing file, a read-only parent or folder, a path under a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{path}: {option} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{path}: {option} cannot be created ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserInputError(f"{path}: {option} is not writable")
    return path


def clean_stale_temps(directory: str | Path, *, recursive: bool = True) -> int:
    """Remove temporary files and folders left by a killed run (names containing ``.tmp-``,
    e.g. a half-written shard ``.shard-x.tar.tmp-…``, index ``.index.zarr.tmp-…`` or checkpoint
    ``.step-000100.pt.tmp-PID``). Only call it while holding the folder's ``OutputLock``, so no
    live writer's temp is removed. Returns how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for folder, dirs, files in os.walk(directory):
        for name in list(dirs):
            if TEMP_MARK in name:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                dirs.remove(name)
                removed += 1
        for name in files:
            if TEMP_MARK in name:
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
        if not recursive:
            break
    return removed


def is_primary_process() -> bool:
    """False in the non-zero ranks of a ``torchrun`` job (``RANK`` set and not 0): those share
    rank 0's output folder, so only rank 0 locks and cleans it."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@contextlib.contextmanager
def claim_output(out: str | Path, *, command: str, option: str = "--out", clean_temps: bool = True) -> Iterator[Path]:
    """Hold ``out`` for one writing command: checked writable, locked, stale temps removed.
    ``option`` names the argument in messages (``--out``, ``OUT``). In a ``torchrun`` job only
    rank 0 takes the lock (the other ranks write nothing there)."""
    if not is_primary_process():
        yield Path(out)
        return
    lock = OutputLock(out, command=command, option=option)
    lock.acquire()
    try:
        if clean_temps:
            clean_stale_temps(out)
        yield Path(out)
    finally:
        lock.release()
