"""What the service knows about the kernel: the ports whose rules are what their records say.
``RUNDIR/kernel-intact.json``, written by the healer.

With nftables the file names the nf_tables generation it is valid for: the kernel counts every
committed transaction, so a reader that finds the kernel at another generation knows that
something happened since (the healer may not have seen it yet). Without a generation (the
ebiptables backend, checked periodically) it is what the last check found. The healer removes
the file before a repair and when it knows nothing. A hook ``reconnect`` (``Service.sync``)
skips its reference namespace for the ports the file names with their current ruleset hash.
The file counts only in the network namespace the service watches, and only while it runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

from ..files import write_atomically

KNOWLEDGE_FILE = "kernel-intact.json"
CATCH_UP = 1.0  # seconds a reader waits for the healer to account for the latest transactions


def _netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def forget(rundir: Path) -> None:
    """Something changed: what the file says is no longer known."""
    (Path(rundir) / KNOWLEDGE_FILE).unlink(missing_ok=True)


def record(rundir: Path, backend: str, intact: Mapping[str, str], generation: int | None = None) -> None:
    """Ports whose rules are intact: port -> ruleset hash of its record (as of ``generation``)."""
    data = {"pid": os.getpid(), "netns": _netns(), "backend": backend, "generation": generation,
            "ports": dict(intact)}
    write_atomically(Path(rundir) / KNOWLEDGE_FILE, json.dumps(data, sort_keys=True) + "\n", mode=0o600)


def _read(rundir: Path, backend: str) -> tuple[dict[str, str], int | None] | None:
    try:
        data = json.loads((Path(rundir) / KNOWLEDGE_FILE).read_text(encoding="utf-8"))
        os.kill(int(data["pid"]), 0)
        if data["netns"] != _netns() or data["backend"] != backend:
            return None
        generation = data.get("generation")
        return ({str(port): str(digest) for port, digest in data["ports"].items()},
                None if generation is None else int(generation))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def intact(rundir: Path, backend: str, generation: Callable[[], int | None] | None = None) -> dict[str, str]:
    """Port -> ruleset hash of the ports the running service knows to be intact, in this network
    namespace and for ``backend`` (empty when nothing is known). With ``generation`` (the
    kernel's now), only what is known as of that generation, waiting a little for the service
    to catch up with the latest transactions."""
    now = generation() if generation is not None else None
    deadline = time.monotonic() + CATCH_UP
    while True:
        found = _read(rundir, backend)
        if found is None:
            return {}
        ports, known_at = found
        if generation is None or known_at is None:
            return ports if generation is None else {}
        if now is not None and known_at == now:
            return ports
        if now is None or time.monotonic() > deadline:
            return {}
        time.sleep(0.01)
