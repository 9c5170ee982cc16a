"""The host-wide lock around every change: an ``flock`` on ``RUNDIR/lock``, waited for a bounded
time.

The holder writes its process id and command line into the lock file, so that a process that
has to wait can say who it waits for (once, after a short wait) and, when the time is up, fail
with one line naming the holder. The file is opened without following a symbolic link.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import NwfilterError

log = logging.getLogger(__name__)

POLL_SECONDS = (0.01, 0.02, 0.05, 0.1)  # then every 0.1 s
NOTICE_AFTER_SECONDS = 2.0  # short waits (another guest's hook, a CLI command) are not worth a word
HOLDER_MAX_CHARS = 300


class LockTimeout(NwfilterError):
    """The host lock stayed taken longer than the configured wait."""


def holder_text() -> str:
    """How this process names itself in the lock file: ``PID COMMAND LINE``."""
    argv = list(sys.argv) or ["python"]
    argv[0] = "libvirt-nwfilter" if argv[0].endswith("__main__.py") else os.path.basename(argv[0])
    command = " ".join(" ".join(argv).split())
    return f"{os.getpid()} {command[:HOLDER_MAX_CHARS]}"


def describe_holder(text: str) -> str:
    pid, _, command = text.strip().partition(" ")
    if not pid.isdigit():
        return "another process (it did not say which)"
    return f"pid {pid} ({command or 'unknown command'})"


@contextlib.contextmanager
def host_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the lock ``path`` for the duration of the block, waiting at most ``timeout`` s."""
    fd = _open(path)
    try:
        _acquire(fd, path, timeout)
        record = holder_text().encode("utf-8", "replace") + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        yield
    finally:
        os.close(fd)


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if os.path.islink(path):
            raise NwfilterError(f"the lock file {path} is a symbolic link; refusing to follow it "
                                "(remove it: it is re-created)") from None
        raise NwfilterError(f"cannot open the lock file {path}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NwfilterError(f"the lock file {path} is not a regular file")
    return fd


def _acquire(fd: int, path: Path, timeout: float) -> None:
    """Take the lock, waiting at most ``timeout`` s: blocked in ``flock`` (so that waiters queue
    in the kernel, visible in /proc/locks) with an alarm that names the holder after a short
    wait and ends the wait at the deadline."""
    if _try_lock(fd):
        return
    deadline = time.monotonic() + timeout
    if threading.current_thread() is threading.main_thread():
        acquired = _wait_blocked(fd, path, timeout, deadline)
    else:  # signals reach the main thread only: poll
        acquired = _wait_polling(fd, path, timeout, deadline)
    if not acquired:
        holder = describe_holder(_read_holder(fd))
        raise LockTimeout(f"gave up after {timeout:g} s waiting for the lock {path}, held by {holder} "
                          "(lock-timeout and hook-lock-timeout in libvirt-nwfilter.conf set the wait)")


class _Deadline(Exception):
    pass


def _wait_blocked(fd: int, path: Path, timeout: float, deadline: float) -> bool:
    def on_alarm(signum, frame) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0.001:
            raise _Deadline()
        _notice(fd, path, timeout)
        signal.setitimer(signal.ITIMER_REAL, remaining)  # flock is resumed when this returns

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(min(NOTICE_AFTER_SECONDS, timeout), 0.001))
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except _Deadline:
        return _try_lock(fd)  # the alarm may have rung just as the lock came
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _wait_polling(fd: int, path: Path, timeout: float, deadline: float) -> bool:
    started, told, attempt = time.monotonic(), False, 0
    while not _try_lock(fd):
        now = time.monotonic()
        if now >= deadline:
            return False
        if not told and now - started >= NOTICE_AFTER_SECONDS:
            _notice(fd, path, timeout)
            told = True
        time.sleep(min(POLL_SECONDS[min(attempt, len(POLL_SECONDS) - 1)], deadline - now))
        attempt += 1
    return True


def _notice(fd: int, path: Path, timeout: float) -> None:
    log.warning("waiting up to %g s for the lock %s, held by %s", timeout, path, describe_holder(_read_holder(fd)))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, HOLDER_MAX_CHARS + 40, 0).decode("utf-8", "replace")
    except OSError:
        return ""
