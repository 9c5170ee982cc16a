"""The resident service ``libvirt-nwfilterd`` as a process in tests, and its thin clients.

:class:`Daemon` starts ``python -m libvirt_nwfilter.daemon`` inside a namespace (``ip netns
exec``), with the configuration and run directories of a test, and waits until its socket
answers; :meth:`Daemon.stop` ends it by its PID (SIGTERM, then SIGKILL) and is idempotent.

:func:`client_argv` / :func:`hook_argv` are the thin clients as operators run them: the
``libvirt-nwfilter`` console script's entry point, and the hook wrapper's command
(``python -I -S -c ...``). :func:`in_process_env` makes them run in-process
(``LIBVIRT_NWFILTER_NO_SERVICE=1``), for comparisons.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import netlab

REPO = Path(__file__).resolve().parent.parent
SOCKET_NAME = "libvirt-nwfilterd.sock"
START_TIMEOUT = 30.0


def client_argv(ns: str | None, *args: str) -> list[str]:
    """``libvirt-nwfilter ARGS`` through the thin client, in namespace ``ns``."""
    code = "import sys; from libvirt_nwfilter.client import main; sys.exit(main())"
    return netlab.ns_argv(ns, [sys.executable, "-c", code, *args])


def hook_argv(ns: str | None, *args: str) -> list[str]:
    """The hook wrapper's command (as install-hook writes it), in namespace ``ns``."""
    code = (f"import sys; sys.path.append({str(REPO)!r}); "
            "from libvirt_nwfilter.client import hook_main; sys.exit(hook_main())")
    return netlab.ns_argv(ns, [sys.executable, "-I", "-S", "-c", code, *args])


def env_for(confdir: Path, rundir: Path, backend: str = "nftables", service: bool = True, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT_NWFILTER_")}
    env.update(LIBVIRT_NWFILTER_CONFDIR=str(confdir), LIBVIRT_NWFILTER_RUNDIR=str(rundir),
               LIBVIRT_NWFILTER_BACKEND=backend, PYTHONPATH=str(REPO))
    if not service:
        env["LIBVIRT_NWFILTER_NO_SERVICE"] = "1"
    env.update(extra)
    return env


class Daemon:
    """``libvirt-nwfilterd`` running in namespace ``ns`` (None: this one)."""

    def __init__(self, ns: str | None, confdir: Path, rundir: Path, backend: str = "nftables",
                 options: Sequence[str] = ("--no-libvirt",), log: Path | None = None):
        self.ns, self.confdir, self.rundir, self.backend = ns, Path(confdir), Path(rundir), backend
        self.options = list(options)
        self.log = Path(log) if log else self.rundir.parent / "libvirt-nwfilterd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.rundir / SOCKET_NAME

    def start(self) -> "Daemon":
        self.rundir.mkdir(parents=True, exist_ok=True)
        argv = netlab.ns_argv(self.ns, [sys.executable, "-m", "libvirt_nwfilter.daemon", "--debug",
                                        *self.options])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
                                         env=env_for(self.confdir, self.rundir, self.backend),
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirt-nwfilterd did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket))
                return True
            except OSError:
                return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 30.0, start: int = 0) -> str:
        """Wait until the log (from offset ``start``) holds ``text``; returns that part."""
        deadline = time.monotonic() + timeout
        while True:
            part = self.log_text()[start:]
            if text in part:
                return part
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the service log within {timeout}s:\n{part[-4000:]}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
