"""The service's socket protocol, shared by the thin clients and the service.

It imports only ``os``, ``struct`` and ``_socket`` (``socket``, ``json`` and ``re`` would add
about 10 ms to every client's start).

A client connects to ``RUNDIR/libvirt-nwfilterd.sock`` (a Unix stream socket, mode 0600, root
only) and sends ONE request: ``MAGIC``, the payload length (4 bytes, big endian) and the
payload, NUL-separated ``key=value`` fields (UTF-8, surrogate escapes for other bytes)::

    kind=cli|hook  cwd=/dir  arg=...  arg=...  env=LIBVIRT_NWFILTER_RUNDIR=/run/x ...

With the first bytes it passes its standard input, output and error and its network namespace
(``/proc/self/ns/net``) (``SCM_RIGHTS``), so the request reads and writes the streams itself
(output is byte-identical to the in-process path; standard input, the domain XML of a hook call
or a filter given as ``-``, needs no copying) and acts on the client's network namespace.

The service answers with lines: ``took`` once it has taken the request (from then on the
client never runs it itself), then ``exit N`` when it finished; or ``error MESSAGE`` when it
refused the request (malformed, too large, not root). End of file before ``exit`` means the
service died while running it.
"""

from __future__ import annotations

import os
import struct

import _socket

SOCKET_NAME = "libvirt-nwfilterd.sock"
MAGIC = b"NWF1"
HEADER = struct.Struct("!4sI")
FD_COUNT = 4  # stdin, stdout, stderr, network namespace
DEFAULT_MAX_REQUEST = 1 << 20  # bytes of command line and environment (standard input is not in it)
KINDS = ("cli", "hook")
#: Variables a request carries; everything else in the service's environment stays the service's.
ENV_PREFIX = "LIBVIRT_NWFILTER_"
ENV_NAMES = ("EDITOR", "VISUAL")
TOOK = b"took"
_SCM_RIGHTS = 1  # <sys/socket.h>; _socket does not export it


class ProtocolError(Exception):
    """A malformed or refused request (one line)."""


class NoRequest(ProtocolError):
    """The client closed the connection without sending anything (a liveness probe)."""


def socket_path(rundir: str) -> str:
    return os.path.join(rundir, SOCKET_NAME)


class UnixAddress:
    """A Unix socket's path usable as its address however long it is: ``with
    UnixAddress(path) as address: sock.bind(address)``. A socket address holds 107 bytes; a
    longer path is reached through ``/proc/self/fd`` and a descriptor of its directory, kept
    open while the address is in use."""

    MAX = 107

    def __init__(self, path: str):
        self.path, self.directory = path, None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= self.MAX:
            return self.path
        parent, name = os.path.split(self.path)
        self.directory = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.directory}/{name}"

    def __exit__(self, *exc_info) -> None:
        if self.directory is not None:
            os.close(self.directory)
            self.directory = None


def carried(name: str) -> bool:
    """Whether a request carries the environment variable ``name``."""
    return name.startswith(ENV_PREFIX) or name in ENV_NAMES


def encode_request(kind: str, argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    fields = [f"kind={kind}", f"cwd={cwd}", *(f"arg={a}" for a in argv),
              *(f"env={k}={v}" for k, v in env.items() if carried(k))]
    payload = "\0".join(fields).encode("utf-8", "surrogateescape")
    return HEADER.pack(MAGIC, len(payload)) + payload


def send_request(sock, data: bytes, fds: list[int]) -> None:
    """The request, with ``fds`` passed along its first bytes."""
    ancillary = [(_socket.SOL_SOCKET, _SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    sent = sock.sendmsg([data], ancillary)
    while sent < len(data):
        sent += sock.send(data[sent:])


def answer(sock, line: str) -> None:
    """Send one answer line (``took``, ``exit N``, ``error MESSAGE``)."""
    sock.sendall(" ".join(line.split()).encode("utf-8", "backslashreplace") + b"\n")


# ------------------------------------------------------------------------------------------
# The service's side


def receive_request(sock, max_size: int) -> tuple[dict, list[int]]:
    """Read one request: ({"kind", "cwd", "argv", "env"}, the passed file descriptors).
    ProtocolError when it is malformed or larger than ``max_size``; the descriptors received
    are closed then."""
    fds: list[int] = []
    try:
        head = b""
        while len(head) < HEADER.size:
            chunk, ancdata, _, _ = sock.recvmsg(HEADER.size - len(head), _socket.CMSG_SPACE(FD_COUNT * 4 * 2))
            fds += _fds(ancdata)
            if not chunk:
                raise ProtocolError("incomplete request") if head or fds else NoRequest("no request")
            head += chunk
        magic, size = HEADER.unpack(head)
        if magic != MAGIC:
            raise ProtocolError("not a libvirt-nwfilter request")
        if size > max_size:
            raise ProtocolError(f"request of {size} bytes refused (at most {max_size})")
        if len(fds) != FD_COUNT:
            raise ProtocolError(f"expected {FD_COUNT} file descriptors (stdin, stdout, stderr, network "
                                f"namespace), got {len(fds)}")
        return _decode(_read_exactly(sock, size)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _fds(ancdata) -> list[int]:
    found: list[int] = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _SCM_RIGHTS:
            count = len(data) // 4
            found += struct.unpack(f"{count}i", data[: count * 4])
    return found


def _read_exactly(sock, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            raise ProtocolError("incomplete request")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _decode(payload: bytes) -> dict:
    request: dict = {"kind": None, "cwd": None, "argv": [], "env": {}}
    for field in payload.decode("utf-8", "surrogateescape").split("\0"):
        key, eq, value = field.partition("=")
        if not eq:
            raise ProtocolError("malformed request field")
        if key in ("kind", "cwd"):
            if request[key] is not None:
                raise ProtocolError(f"'{key}' given twice")
            request[key] = value
        elif key == "arg":
            request["argv"].append(value)
        elif key == "env":
            name, eq, text = value.partition("=")
            if not eq or not carried(name):
                raise ProtocolError(f"a request may carry only {ENV_PREFIX}* variables, EDITOR and VISUAL")
            request["env"][name] = text
        else:
            raise ProtocolError(f"unknown request field '{key[:40]}'")
    if request["kind"] not in KINDS:
        raise ProtocolError(f"request kind must be one of {', '.join(KINDS)}")
    if not (request["cwd"] or "").startswith("/"):
        raise ProtocolError("the working directory must be an absolute path")
    return request
