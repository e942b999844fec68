"""One writer per trait run: an OS file lock on the run's output directory.

``fcntl.flock`` belongs to the open file, so the OS releases it when the holder exits or is
killed: no stale lock is ever left to clean up by hand. The lock file (``<dir>/.lock``) holds one
line naming the holder (pid, host, start time) for a waiter to show. The holder deletes it on
release; a waiter that then gets the lock on the deleted file sees that it is no longer the file
at the path and locks the one there instead, so two runs never hold two different lock files.

On Linux NFS clients emulate flock with byte-range locks, so runs on different nodes sharing an
experiment directory exclude each other too. Windows has no flock: runs there are not locked.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from tlextract.errors import TLExtractError
from tlextract.store import disk_errors, make_parents, remove_empty

if sys.platform != "win32":
    import fcntl

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


@contextmanager
def run_lock(directory: Path, *, wait: bool = True, poll: float = 0.5) -> Iterator[None]:
    """Hold the lock of ``directory`` while the block runs (creating the directory if needed).

    If another process holds it: log one line naming the holder and check again every ``poll``
    seconds, or with ``wait=False`` raise :class:`TLExtractError` naming the holder. On release
    the lock file is removed, and so are the directories it created if nothing else was written
    in them (a run that failed before its first stage leaves no trace)."""
    if sys.platform == "win32":
        yield
        return
    path = directory / LOCK_FILE
    fd, created = _acquire(path, wait, poll)
    try:
        if fd is not None:
            _write_holder(fd)
        yield
    finally:
        if fd is not None:  # unlinked while still held: a waiter then sees a stale inode
            path.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a forked child shares the open file
            os.close(fd)
        remove_empty(created)  # not empty: the run wrote something there, kept


def _acquire(path: Path, wait: bool, poll: float) -> tuple[int | None, list[Path]]:
    """An open, locked descriptor of ``path``, waiting as asked (None where the file system
    cannot lock at all), and the directories created for it, deepest first."""
    directory, told, created = path.parent, False, list[Path]()
    while True:
        fd, made = _open(path)
        created = made or created
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                return fd, created
            os.close(fd)  # its holder removed it on release: lock the one at the path now
            continue
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            log.warning(f"{directory}: this file system cannot lock files ({e.strerror}); "
                        "two runs of this trait at once would not be stopped")  # fmt: skip
            return None, created
        if not wait:
            raise TLExtractError(
                f"{directory}: another run is writing it ({holder}); wait for it to "
                "finish, or run without --no-wait to wait."
            )
        if not told:
            log.warning(f"{directory} is being written by {holder}; waiting (use "
                        "--no-wait to stop instead)")  # fmt: skip
            told = True
        time.sleep(poll)


def _open(path: Path) -> tuple[int, list[Path]]:
    """``path`` opened (created if need be, the umask applies), and the directories created for
    it, deepest first."""
    while True:
        with disk_errors(path):
            created = make_parents(path.parent)
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), created
            except FileNotFoundError:  # a finishing run removed the directory just now
                continue


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _write_holder(fd: int) -> None:
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    line = f"pid {os.getpid()} on {socket.gethostname()} since {since}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode(), 0)  # unbuffered: a waiter sees it at once


def _holder(fd: int) -> str:
    """The holder's line. It writes it just after locking, so an empty file is read again."""
    for _ in range(20):
        line = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if line:
            return line
        time.sleep(0.05)
    return "an unknown process"
