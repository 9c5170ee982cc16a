"""Unix sockets in a run directory whose path is longer than a socket address can hold."""

from __future__ import annotations

import os
import socket

from libvirt_nwfilter.daemon import protocol, wakeup


def deep_directory(tmp_path):
    directory = tmp_path / ("d" * 60) / ("e" * 60)
    directory.mkdir(parents=True)
    assert len(os.fsencode(protocol.socket_path(str(directory)))) > protocol.UnixAddress.MAX
    return directory


def test_a_long_path_is_bound_and_reached_through_the_directory_descriptor(tmp_path):
    path = protocol.socket_path(str(deep_directory(tmp_path)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        with protocol.UnixAddress(path) as address:
            assert address.startswith("/proc/self/fd/")
            server.bind(address)
        server.listen(1)
        assert os.path.exists(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            with protocol.UnixAddress(path) as address:
                client.connect(address)
            accepted, _ = server.accept()
            client.sendall(b"hello")
            assert accepted.recv(5) == b"hello"
            accepted.close()


def test_a_short_path_is_its_own_address_and_no_descriptor_stays_open(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    with protocol.UnixAddress(str(tmp_path / "s.sock")) as address:
        assert address == str(tmp_path / "s.sock")
    with protocol.UnixAddress(protocol.socket_path(str(deep_directory(tmp_path)))):
        pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_learners_wakeup_datagrams_arrive_in_a_long_run_directory(tmp_path):
    rundir = deep_directory(tmp_path)
    sock = wakeup.listen(rundir)
    try:
        wakeup.notify(rundir, ["vnet1", "vnet0"])
        assert wakeup.receive(sock) == {"vnet0", "vnet1"}
    finally:
        sock.close()
