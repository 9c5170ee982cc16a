"""The request server: the service's main process, single-threaded, forking one process per
connection (forking a process that runs threads is unsafe; the libvirt events and the healing
run in a separate process, :mod:`.watcher`, forked before any thread exists).

It only accepts, forks and reaps: reading, checking and running a request happen in the forked
process (:mod:`.request`), so a slow or malformed client never blocks the service. Requests that
change state serialise on the host lock, exactly as processes of the in-process path do.

When idle, it forks the process of the next request ahead (the spare), once its idle work is
done (a spare forked before the warm-up would start colder): a connection is handed to the spare
and the fork is not in the request's time. Without a spare (it died, or requests come faster
than spares), the connection's process is forked then.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from . import protocol, request

log = logging.getLogger(__name__)

PID_FILE = "libvirt-nwfilterd.pid"
MAX_CHILDREN = 64
STOP_GRACE = 30.0  # seconds running requests get to finish at a stop
IDLE_PERIOD = 1.0  # seconds between looks for idle work (a request or a child's end wakes us earlier)
_PR_SET_PDEATHSIG = 1


class ServiceError(Exception):
    """The service cannot start (one line)."""


def die_with_parent() -> None:
    """Be killed when the process that forked us dies (a SIGKILLed service leaves nothing)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def single_instance(rundir: Path) -> Iterator[None]:
    """Hold ``RUNDIR/libvirt-nwfilterd.pid`` (locked, with our PID) while the service runs."""
    rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = rundir / PID_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ServiceError(f"another libvirt-nwfilterd runs for {rundir} (pid {other or '?'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def running(rundir: Path) -> bool:
    """Whether a libvirt-nwfilterd runs for ``rundir`` (it holds the lock of its pid file)."""
    try:
        fd = os.open(Path(rundir) / PID_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def listen(rundir: Path) -> socket.socket:
    """The listening socket ``RUNDIR/libvirt-nwfilterd.sock``, mode 0600 (root only)."""
    path = protocol.socket_path(str(rundir))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket: the pid file lock says no service runs
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        with protocol.UnixAddress(path) as address:
            sock.bind(address)
    except OSError as error:
        sock.close()
        raise ServiceError(f"cannot listen on {path}: {error.strerror or error}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Server:
    """Accept, fork, reap; restart the watcher process when it exits."""

    def __init__(self, sock: socket.socket, max_request: int, watcher: Callable[[], None] | None = None,
                 idle: Callable[[], bool] | None = None, idle_passes: Callable[[], int] = lambda: 0,
                 ready_spare: Callable[[], None] = lambda: None):
        """``idle``: a slice of work done when no request runs (True: there is more);
        ``idle_passes``: how many passes of idle work began so far (a spare forked before the
        last one began is replaced); ``ready_spare``: run in the spare as it starts (work ahead
        of its request, in the background)."""
        self.sock = sock
        self.max_request = max_request
        self.children: set[int] = set()
        self.spare: _Spare | None = None
        self._idle = idle
        self._idle_passes = idle_passes
        self._ready_spare = ready_spare
        self._watcher_body = watcher
        self.watcher_pid: int | None = None
        self._watcher_started = 0.0
        self._stopping = False

    # -- processes ------------------------------------------------------------------------
    def _fork(self, body: Callable[[], int]) -> int:
        pid = os.fork()
        if pid:
            return pid
        status = 1
        try:
            die_with_parent()
            self.sock.close()
            if self.spare is not None:
                self.spare.channel.close()
            status = body()
        except BaseException:  # noqa: BLE001 - a forked process must never return into the loop
            log.exception("internal error")
        finally:
            os._exit(status)

    def _start_watcher(self) -> None:
        if self._watcher_body is None:
            return
        body = self._watcher_body
        self._watcher_started = time.monotonic()
        self.watcher_pid = self._fork(lambda: body() or 0)

    def _serve_connection(self, conn: socket.socket) -> None:
        if len(self.children) >= MAX_CHILDREN:
            log.warning("%d requests running: connection refused", len(self.children))
            with contextlib.suppress(OSError):
                protocol.answer(conn, f"error busy: {MAX_CHILDREN} requests running")
            conn.close()
            return
        spare, self.spare = self.spare, None
        if spare is not None and spare.hand(conn):
            pid = spare.pid
        else:
            if spare is not None:
                spare.drop()
            pid = self._fork(lambda: request.handle(conn, self.max_request))
        conn.close()
        self.children.add(pid)

    def _fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def spare() -> int:
            ours.close()
            self._ready_spare()
            return request.serve_handed(theirs, self.max_request)

        passes = self._idle_passes()
        try:
            pid = self._fork(spare)
        finally:
            theirs.close()
        self.spare = _Spare(pid, ours, passes)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.watcher_pid:
                self.watcher_pid = None
                if not self._stopping:
                    log.error("the watcher process exited (%s); restarting it", _describe(status))
            elif self.spare is not None and pid == self.spare.pid:
                log.warning("the spare request process exited (%s)", _describe(status))
                self.spare.channel.close()
                self.spare = None
            elif pid in self.children:
                self.children.discard(pid)
                if os.WIFSIGNALED(status):
                    log.error("request process %d killed by signal %d", pid, os.WTERMSIG(status))

    # -- loop -----------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until SIGTERM or SIGINT; then let running requests finish (bounded)."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._start_watcher()
        gc.freeze()  # forked requests then share the imported modules' pages
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        more = False
        try:
            while not self._stopping:
                for key, _ in selector.select(timeout=0 if more else IDLE_PERIOD):
                    if key.fileobj is self.sock:
                        self._accept_all()
                    else:
                        _drain(wake_r)
                self._reap()
                more = self._idle_work()
                if self.watcher_pid is None and not self._stopping and \
                        time.monotonic() - self._watcher_started > 5.0:
                    self._start_watcher()
        finally:
            selector.close()
            self.sock.close()
            self._finish()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    def _idle_work(self) -> bool:
        """A slice of the idle work when no request runs; True when there is more."""
        if self.children:
            return False
        more = False
        if self._idle is not None:
            try:
                more = self._idle()
            except Exception:  # noqa: BLE001 - idle work is never worth stopping the service
                log.exception("idle work failed; not done any more")
                self._idle = None
        if self.spare is not None and self.spare.passes != self._idle_passes():
            self.spare.drop()
            self.spare = None
        if not more and self.spare is None and not self._stopping:
            self._fork_spare()
        return more

    def _accept_all(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept: %s", error)
                    return
                raise
            conn.setblocking(True)
            self._serve_connection(conn)

    def _on_stop(self, signum, _frame) -> None:
        if not self._stopping:
            log.info("stopping (%s)", signal.Signals(signum).name)
        self._stopping = True

    def _finish(self) -> None:
        """Stop the watcher and the spare; wait for running requests (at most STOP_GRACE seconds)."""
        if self.spare is not None:
            self.children.add(self.spare.pid)
            self.spare.drop()
            self.spare = None
        if self.watcher_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.watcher_pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while (self.children or self.watcher_pid is not None) and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for pid in [*self.children, *([self.watcher_pid] if self.watcher_pid else [])]:
            log.warning("process %d still running after %g s: killed", pid, STOP_GRACE)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _Spare:
    """A forked request process waiting for its connection (see :func:`.request.serve_handed`)."""

    def __init__(self, pid: int, channel: socket.socket, passes: int):
        self.pid, self.channel, self.passes = pid, channel, passes

    def hand(self, conn: socket.socket) -> bool:
        """Give it ``conn``; False when it cannot take it (it died)."""
        try:
            socket.send_fds(self.channel, [b"c"], [conn.fileno()])
        except OSError:
            return False
        self.channel.close()
        return True

    def drop(self) -> None:
        """End it without a connection (it exits when its channel closes; the server reaps it)."""
        self.channel.close()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
