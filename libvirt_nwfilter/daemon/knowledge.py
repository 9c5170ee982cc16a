"""What the service knows about the kernel: the ports whose rules it found intact, and since
when nothing touched our tables. ``RUNDIR/kernel-intact.json``, written by the healer.

The healer removes the file as soon as it sees a change to our tables (before it looks at the
change), and writes it again after a check found every port intact (or after a repair). A hook
``reconnect`` (``Service.sync``) can then skip its reference namespace for ports the file names
with their current ruleset hash: their rules are what the records say. The file counts only in
the network namespace the service watches, and only while the service runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from ..files import write_atomically

KNOWLEDGE_FILE = "kernel-intact.json"


def _netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def forget(rundir: Path) -> None:
    """Something changed: what the file says is no longer known."""
    (Path(rundir) / KNOWLEDGE_FILE).unlink(missing_ok=True)


def record(rundir: Path, backend: str, intact: Mapping[str, str]) -> None:
    """Ports found intact: port -> ruleset hash of its record."""
    data = {"pid": os.getpid(), "netns": _netns(), "backend": backend, "ports": dict(intact)}
    write_atomically(Path(rundir) / KNOWLEDGE_FILE, json.dumps(data, sort_keys=True) + "\n", mode=0o600)


def intact(rundir: Path, backend: str) -> dict[str, str]:
    """Port -> ruleset hash of the ports the running service found intact, in this network
    namespace and for ``backend`` (empty when nothing is known)."""
    try:
        data = json.loads((Path(rundir) / KNOWLEDGE_FILE).read_text(encoding="utf-8"))
        os.kill(int(data["pid"]), 0)
        if data["netns"] != _netns() or data["backend"] != backend:
            return {}
        return {str(port): str(digest) for port, digest in data["ports"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
