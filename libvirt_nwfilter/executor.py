"""The only module that runs firewall tools: plans from the backends, probes and listings.

Tools are run with argument lists (never a shell), a fixed minimal environment, and found in
the sbin directories themselves (libvirtd runs hooks with a short ``PATH``). Once a process has
called :func:`mark_changes`, it runs ``nft`` under the name :data:`MARKED_NFT` (a symbolic link
in the run directory): the kernel names the committing process in its notifications, and the
resident service tells our changes from anyone else's by that name. It also reads those
notifications (:func:`nft_notifications`) and the ruleset's generation (:func:`nft_generation`).

In the resident service (:func:`use_nft_library`), ``nft`` commands run in the process itself,
through libnftables (Debian's python3-nftables), with the same input, output and exit status as
the ``nft`` process; the process bears the marked name while it commits. Its context (one per
process and network namespace) can read the ruleset into its cache ahead, in the background
(:func:`warm_nft_cache`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .backends.base import Plan, Step
from .errors import FirewallError, PartialChange

log = logging.getLogger(__name__)

TOOL_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin"
_ENV = {"LC_ALL": "C", "PATH": TOOL_PATH}
TIMEOUT_SECONDS = 120
# How the tools name the input line they refused: nft -f "/dev/stdin:12:5-9: Error: …", the
# restore tools "line 12 failed" (kernel) or "Error occurred at line: 12" (parser).
_REFUSED_LINE_RE = re.compile(r"/dev/stdin:(\d+):|\bline:? (\d+)")


@lru_cache(maxsize=None)
def tool(name: str) -> str:
    """Absolute path of a tool, searched in the sbin and bin directories."""
    if name.startswith("/"):
        return name
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        raise FirewallError(f"'{name}' not found in {TOOL_PATH}; is it installed?")
    return found


MARKED_NFT = "nwfilter-nft"  # what our nft processes are called (at most 15 characters: comm)
_marked: dict[str, str] = {}  # real nft path -> the marked link, once mark_changes was called
_mark_dir: Path | None = None


def mark_changes(rundir: Path) -> None:
    """Run ``nft`` as :data:`MARKED_NFT` from now on, through a symbolic link in ``rundir``."""
    global _mark_dir
    _mark_dir = Path(rundir)


def _marked_tool(path: str) -> str:
    """``path`` (nft), or the marked link to it when this process marks its changes."""
    if _mark_dir is None or os.path.basename(path) != "nft":
        return path
    if path not in _marked:
        link = _mark_dir / MARKED_NFT
        try:
            if not link.is_symlink() or os.readlink(link) != path:
                temporary = _mark_dir / f".{MARKED_NFT}.{os.getpid()}"
                temporary.unlink(missing_ok=True)
                os.symlink(path, temporary)
                os.replace(temporary, link)
            _marked[path] = str(link)
        except OSError as error:  # unmarked: the service takes our change for a foreign one
            log.warning("cannot create %s (%s): changes are not marked as ours", link, error.strerror)
            _marked[path] = path
    return _marked[path]


def run(step: Step, netns: str | None = None) -> subprocess.CompletedProcess:
    """Run one step (in network namespace ``netns`` if given) and return the finished process
    (no exception on a non-zero exit)."""
    if netns is None and _library is not None:
        done = _run_in_library(step)
        if done is not None:
            return done
    argv = [_marked_tool(tool(step.argv[0])), *step.argv[1:]]
    if netns is not None:
        argv = [tool("ip"), "netns", "exec", netns, *argv]
    log.debug("running %s (%d bytes of input)", " ".join(argv), len(step.stdin))
    try:
        return subprocess.run(argv, input=step.stdin, capture_output=True, text=True, env=_ENV,
                              timeout=TIMEOUT_SECONDS, check=False)
    except OSError as error:
        raise FirewallError(f"could not run {argv[0]}: {error}") from None
    except subprocess.TimeoutExpired:  # killed: its transaction may or may not have happened
        raise PartialChange(f"{argv[0]} did not finish in {TIMEOUT_SECONDS} s; the outcome is unknown") from None


# ------------------------------------------------------------------------------------------
# nft through libnftables (the resident service)

_library = None  # the python3-nftables module, once use_nft_library() loaded it
_contexts: dict[tuple[int, int], object] = {}  # (process id, netns inode) -> libnftables context
_warming: threading.Thread | None = None  # filling this process's libnftables cache ahead (warm_nft_cache)
_LIBRARY_FLAGS = {"-j": "set_json_output", "-a": "set_handle_output", "-c": "set_dry_run"}
_PR_SET_NAME, _PR_GET_NAME = 15, 16


def use_nft_library() -> bool:
    """Run ``nft`` commands through libnftables from now on, in this process and those it forks
    (no process start, no dynamic linking: 15-25 ms less per transaction). False, and ``nft``
    processes as before, when python3-nftables is not installed."""
    global _library
    try:
        import nftables
    except ImportError as error:
        log.info("python3-nftables is not importable (%s): nft runs as a process", error)
        return False
    _library = nftables
    return True


def warm_nft_cache(steps: tuple[Step, ...]) -> None:
    """Run ``steps`` (dry runs, ``nft -c``) through this process's libnftables context in a
    background thread at the lowest priority, errors ignored; the next ``nft`` command of the
    process waits for them.
    libnftables reads every chain of the ruleset (9000 with 1000 ports) into its cache before a
    batch that adds rules or map elements, and keeps that cache while the ruleset's generation
    stays the same: read ahead, a request's batch does not read it again. No effect without the
    library (:func:`use_nft_library`)."""
    global _warming
    if _library is None or _warming is not None or not steps:
        return
    commands = [_library_command(step) for step in steps]
    if any(command is None or "set_dry_run" not in command[0] for command in commands):
        raise ValueError("warm_nft_cache runs dry runs of nft only (nft -c)")
    context = _context()

    def warm() -> None:
        with contextlib.suppress(OSError):  # the request's own work (and its client) go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for command, step in zip(commands, steps):
            status, _, error = _library_run(context, *command, step)
            if status != 0:
                log.debug("warming the nft cache: %s", error.strip())

    _warming = threading.Thread(target=warm, name="nft-cache", daemon=True)
    _warming.start()


def _run_in_library(step: Step) -> subprocess.CompletedProcess | None:
    """``step`` run through libnftables, or None when it is not an ``nft`` command the library
    runs alike (another program, options other than ``-j``, ``-a``, ``-c`` and ``-f -``)."""
    command = _library_command(step)
    if command is None:
        return None
    log.debug("running nft %s in libnftables (%d bytes of input)", " ".join(step.argv[1:]), len(step.stdin))
    with _named(MARKED_NFT if _mark_dir is not None else None):
        status, output, error = _library_run(_context(), *command, step)
    return subprocess.CompletedProcess(step.argv, 0 if status == 0 else 1, output, error)


def _library_command(step: Step) -> tuple[list[str], list[str] | None] | None:
    """(the context's flag setters, the command's words or None for ``-f -``) of an ``nft``
    step the library runs alike; None for any other step."""
    path = tool(step.argv[0])
    if os.path.basename(path) != "nft" or os.path.realpath(path) != os.path.realpath(tool("nft")):
        return None
    args = list(step.argv[1:])
    flags = []
    while args and args[0] in _LIBRARY_FLAGS:
        flags.append(_LIBRARY_FLAGS[args.pop(0)])
    if args == ["-f", "-"]:
        return flags, None
    if not args or any(arg.startswith("-") for arg in args):
        return None
    return flags, args


def _library_run(context, flags: list[str], words: list[str] | None, step: Step) -> tuple[int, str, str]:
    for setter in _LIBRARY_FLAGS.values():
        getattr(context, setter)(setter in flags)
    if words is None:
        return _library_batch(context, step.stdin)
    return context.cmd(" ".join(words))


def _context():
    """This process's libnftables context for its network namespace now, once the cache warming
    of the process is over. A context's netlink socket stays in the namespace it was opened in:
    a process that moved to another one (a request entering its client's) needs a new one."""
    global _warming
    if _warming is not None:
        _warming.join()
        _warming = None
    key = (os.getpid(), _netns_inode())
    context = _contexts.get(key)
    if context is None:
        _contexts.clear()
        context = _contexts[key] = _library.Nftables()
    return context


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def _library_batch(context, text: str) -> tuple[int, str, str]:
    """``nft -f -`` of ``text``: read from a memory file, so that errors name the input line
    (the library names no line of a command buffer); named /dev/stdin in errors, as by nft."""
    fd = os.memfd_create("nft-batch", os.MFD_CLOEXEC)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
        name = f"/proc/self/fd/{fd}"
        status, output, error = context.cmd_from_file(name)
        return status, output, error.replace(f"{name}:", "/dev/stdin:")
    finally:
        os.close(fd)


@contextlib.contextmanager
def _named(name: str | None) -> Iterator[None]:
    """This process (its ``comm``) called ``name`` meanwhile; unchanged for None."""
    if name is None:
        yield
        return
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    old = ctypes.create_string_buffer(16)
    prctl(_PR_GET_NAME, old, 0, 0, 0)
    prctl(_PR_SET_NAME, name.encode(), 0, 0, 0)
    try:
        yield
    finally:
        prctl(_PR_SET_NAME, old.value, 0, 0, 0)


def _failure(step: Step, result: subprocess.CompletedProcess) -> FirewallError:
    """The tool's first lines of complaint, after the input line it names and that line's port."""
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    detail = " | ".join(lines[:3]) or f"exit status {result.returncode}"
    return FirewallError(f"{step.argv[0]} refused the change{_refused_line(step, result.stderr or '')}: {detail}")


def _refused_line(step: Step, stderr: str) -> str:
    """`` of port P (input line N: TEXT)`` for the input line the tool names, if any."""
    found = _REFUSED_LINE_RE.search(stderr)
    number = int(found.group(1) or found.group(2)) if found else 0
    inputs = step.stdin.splitlines()
    if not 1 <= number <= len(inputs):
        return ""
    port = step.port_of_line(number)
    return f"{f' of port {port}' if port else ''} (input line {number}: {inputs[number - 1]})"


def execute(plan: Plan, netns: str | None = None) -> None:
    """Run a plan: apply, then commit; when an apply step or the first commit step fails
    (each step is one transaction, so nothing of the commit is in), the apply is rolled back
    and FirewallError raised. PartialChange when a commit step after the first failed (part of
    the change is in)."""
    for step in plan.apply:
        result = run(step, netns)
        if result.returncode != 0 and not step.ignore_errors:
            _roll_back(plan, netns)
            raise _failure(step, result)
    for number, step in enumerate(plan.commit):
        result = run(step, netns)
        if result.returncode != 0 and not step.ignore_errors:
            error = _failure(step, result)
            if number:
                raise PartialChange(str(error))
            _roll_back(plan, netns)
            raise error


def _roll_back(plan: Plan, netns: str | None) -> None:
    for undo in plan.rollback:
        run(undo, netns)


def survey(steps: tuple[Step, ...], netns: str | None = None) -> list[str]:
    """Run read-only listing steps; the stdout of each ("" where one failed)."""
    outputs = []
    for step in steps:
        result = run(step, netns)
        outputs.append(result.stdout if result.returncode == 0 else "")
    return outputs


REFERENCE_PREFIX = "libvirt-nwfilter-ref-"
SIMULATION_PREFIX = "libvirt-nwfilter-sim-"
_namespace_numbers = itertools.count(1)


@contextlib.contextmanager
def reference_namespace() -> Iterator[str]:
    """A fresh, empty network namespace to build reference rules in; always deleted."""
    with throwaway_namespace(REFERENCE_PREFIX) as name:
        yield name


@contextlib.contextmanager
def throwaway_namespace(prefix: str) -> Iterator[str]:
    """A fresh, empty network namespace named ``<prefix><pid>-<n>``; always deleted (also
    when this process was killed: the next caller with the same prefix removes it)."""
    _remove_stale_namespaces(prefix)
    name = f"{prefix}{os.getpid()}-{next(_namespace_numbers)}"
    if run(Step(("ip", "netns", "add", name))).returncode != 0:
        raise FirewallError(f"cannot create the throw-away network namespace {name}")
    try:
        yield name
    finally:
        run(Step(("ip", "netns", "delete", name)))


def _remove_stale_namespaces(prefix: str) -> None:
    """Delete namespaces of ours whose creating process is gone."""
    listing = run(Step(("ip", "netns", "list"))).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = name.removeprefix(prefix).split("-")[0]
        if name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            run(Step(("ip", "netns", "delete", name)))


def start(step: Step, netns: str | None = None) -> subprocess.Popen:
    """Start a long-running process (in ``netns`` if given) with text pipes for stdin and
    stdout; the caller talks to it and must end it (:func:`stop`)."""
    argv = [tool(step.argv[0]), *step.argv[1:]]
    if netns is not None:
        argv = [tool("ip"), "netns", "exec", netns, *argv]
    log.debug("starting %s", " ".join(argv))
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_ENV, bufsize=1)
    except OSError as error:
        raise FirewallError(f"could not run {argv[0]}: {error}") from None


def stop(process: subprocess.Popen, timeout: float = 5.0) -> str:
    """End a process from :func:`start` (SIGTERM, then SIGKILL); returns its stderr."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    error = process.stderr.read() if process.stderr else ""
    if process.stderr is not None:
        process.stderr.close()
    return error


def query(argv: tuple[str, ...], stdin: str = "") -> tuple[bool, str]:
    """Run a read-only command (probe, listing); returns (succeeded, stdout or stderr)."""
    result = run(Step(argv, stdin))
    return result.returncode == 0, result.stdout if result.returncode == 0 else result.stderr


def read_text(path: str) -> str:
    """A small kernel file (procfs), stripped; empty when absent."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def kernel_release() -> str:
    return os.uname().release


def read_sysctl(name: str) -> str | None:
    """A sysctl such as ``net/bridge/bridge-nf-call-iptables``, None when it does not exist."""
    value = read_text(f"/proc/sys/{name}")
    return value or None


def write_sysctl(name: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{name}", "w", encoding="ascii") as handle:
            handle.write(value)
    except OSError as error:
        raise FirewallError(f"cannot set {name.replace('/', '.')} = {value}: {error.strerror}") from None


def load_module(name: str) -> bool:
    """modprobe a kernel module; True when it is loaded afterwards."""
    return run(Step(("modprobe", name))).returncode == 0


# ------------------------------------------------------------------------------------------
# nf_tables notifications (netlink), for the resident service

_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; the socket module does not export it
NOTIFICATION_BUFFER = 64 << 20  # bytes of notifications the kernel may queue for us


def nft_notifications() -> socket.socket:
    """A netlink socket receiving every nf_tables notification of this network namespace (see
    :mod:`~libvirt_nwfilter.backends.nftables.notices`), with a receive buffer large enough
    for a rebuild of thousands of ports. ``recv`` raises ``OSError(ENOBUFS)`` when notifications
    were lost all the same."""
    from .backends.nftables.notices import NFNLGRP_NFTABLES

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, NOTIFICATION_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NOTIFICATION_BUFFER)
        sock.bind((0, 0))
        sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except OSError:
        sock.close()
        raise
    return sock


def nft_generation() -> int | None:
    """The nf_tables generation of this network namespace now (it grows with every committed
    transaction); None when it cannot be read."""
    from .backends.nftables.notices import generation_answer, generation_request

    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER) as sock:
            sock.settimeout(5.0)
            sock.sendto(generation_request(), (0, 0))
            return generation_answer(sock.recv(1 << 16))
    except OSError as error:
        log.debug("cannot read the nf_tables generation: %s", error)
        return None
