"""The request server's spare (daemon/server.py): a request process forked ahead when the server
is idle (and readied there: work ahead of its request) takes the next connection; it is replaced
when the idle work began a new pass (it would start colder than a fresh fork); without a live
spare the connection's process is forked then.

Real forks and a real listening socket; the request itself is replaced by one that answers with
the pid of the process serving it."""

from __future__ import annotations

import os
import socket
import time

import pytest

from libvirt_nwfilter.daemon import protocol, request, server


@pytest.fixture
def serving(tmp_path, monkeypatch):
    monkeypatch.setattr(request, "handle", lambda conn, max_request: conn.sendall(f"{os.getpid()}\n".encode()) or 0)
    passes = [0]
    srv = server.Server(server.listen(tmp_path), 1 << 16, idle=lambda: False, idle_passes=lambda: passes[0],
                        ready_spare=lambda: (tmp_path / f"ready-{os.getpid()}").touch())
    yield srv, protocol.socket_path(str(tmp_path)), passes
    srv._stopping = True
    srv._finish()
    srv.sock.close()


def served_by(srv: server.Server, path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        srv._accept_all()
        pid = int(client.recv(64).decode())
    wait_reaped(srv, pid)
    return pid


def wait_reaped(srv: server.Server, pid: int) -> None:
    deadline = time.monotonic() + 10
    while pid in srv.children and time.monotonic() < deadline:
        srv._reap()
        time.sleep(0.01)
    assert pid not in srv.children


def test_the_spare_forked_when_idle_serves_the_next_connection(serving):
    srv, path, _ = serving
    srv._idle_work()
    spare = srv.spare.pid
    assert served_by(srv, path) == spare
    assert srv.spare is None  # the next one is forked at the next idle moment, not meanwhile
    srv._idle_work()
    assert srv.spare is not None and srv.spare.pid != spare
    following = srv.spare.pid
    assert served_by(srv, path) == following
    ready = os.path.dirname(path)
    assert os.path.exists(f"{ready}/ready-{spare}") and os.path.exists(f"{ready}/ready-{following}")
    assert not os.path.exists(f"{ready}/ready-{os.getpid()}")  # readied in the spare, not the server


def test_a_new_pass_of_idle_work_replaces_the_spare(serving):
    srv, path, passes = serving
    srv._idle_work()
    old = srv.spare.pid
    passes[0] += 1
    srv._idle_work()
    new = srv.spare.pid
    assert new != old
    assert served_by(srv, path) == new
    deadline = time.monotonic() + 10
    while _alive(old) and time.monotonic() < deadline:  # the dropped spare exits (the server reaps it)
        srv._reap()
        time.sleep(0.01)
    assert not _alive(old)


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def test_without_a_live_spare_the_connection_process_is_forked_then(serving):
    srv, path, _ = serving
    srv._idle_work()
    spare = srv.spare.pid
    os.kill(spare, 9)
    os.waitpid(spare, 0)  # gone before the server noticed
    pid = served_by(srv, path)
    assert pid not in (spare, os.getpid())
    assert srv.spare is None
