"""Telling the service's learner that binding records changed: a datagram naming the ports on
``RUNDIR/libvirt-nwfilterd-learning.sock`` (root only), sent by every process that writes
records (the learner reads them then, instead of at its next periodic scan).

Best effort by design: nobody listening (no service), a full queue or any other error loses
the datagram, and the learner's periodic scan of the records catches up.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterable

from .protocol import UnixAddress

SOCKET = "libvirt-nwfilterd-learning.sock"
EVERYTHING = b"*"  # read every record
MAX_DATAGRAM = 8192


def path(rundir: Path | str) -> str:
    return os.path.join(str(rundir), SOCKET)


def notify(rundir: Path | str, ports: Iterable[str]) -> None:
    """Name ``ports`` to the learner, if one listens."""
    target = path(rundir)
    if not os.path.exists(target):
        return
    data = " ".join(sorted(set(ports))).encode()
    if len(data) > MAX_DATAGRAM or not data:
        data = EVERYTHING
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                                        | socket.SOCK_CLOEXEC) as sock:
        with UnixAddress(target) as address:
            sock.sendto(data, address)


def listen(rundir: Path | str) -> socket.socket:
    """The learner's socket (non-blocking, mode 0600), replacing a stale one."""
    target = path(rundir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        with UnixAddress(target) as address:
            sock.bind(address)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def receive(sock: socket.socket) -> set[str] | None:
    """The ports named in the pending datagrams (None: read every record)."""
    ports: set[str] = set()
    while True:
        try:
            data = sock.recv(MAX_DATAGRAM + 1)
        except (BlockingIOError, InterruptedError):
            return ports
        if data == EVERYTHING:
            ports = None  # type: ignore[assignment]
        elif ports is not None:
            ports.update(data.decode(errors="replace").split())
