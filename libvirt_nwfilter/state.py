"""Applied bindings under the run directory, and the host-wide lock around every change.

One JSON file per port (``bindings/<port>.json``) holds the binding XML, the backend and its
record of what is in the kernel, and a hash of the applied ruleset. Files are written only after
the kernel accepted a change, atomically, so a crash leaves the old or the new state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import NwfilterError
from .model import Binding
from .store import write_atomically
from .syntax import PORT_NAME_RE
from .xml import format_binding, parse_binding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedBinding:
    """What is instantiated on one port."""

    binding: Binding
    backend: str
    record: dict[str, Any]
    ruleset_hash: str  # hash of the compiled ruleset: changes when the filters change


class State:
    """The run directory: bindings and the lock."""

    def __init__(self, rundir: Path):
        self.rundir = Path(rundir)
        self.bindings_dir = self.rundir / "bindings"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the host-wide lock (blocking) for the duration of the block."""
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.rundir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_partial_writes()
            yield
        finally:
            os.close(fd)

    def _remove_partial_writes(self) -> None:
        """Temporary files of writes a killed process left (nobody else writes under the lock)."""
        for directory in (self.rundir, self.bindings_dir):
            for leftover in directory.glob(".*.json.*") if directory.is_dir() else ():
                leftover.unlink(missing_ok=True)

    def _path(self, port: str) -> Path:
        if not PORT_NAME_RE.match(port) or port in (".", ".."):
            raise NwfilterError(f"'{port}' is not a valid port (interface) name")
        return self.bindings_dir / f"{port}.json"

    def get(self, port: str) -> AppliedBinding | None:
        path = self._path(port)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise NwfilterError(f"state file {path} is unreadable: {error}") from None
        return AppliedBinding(parse_binding(data["binding"], str(path)), data["backend"], data["record"],
                              data["hash"])

    def ports(self) -> list[str]:
        if not self.bindings_dir.is_dir():
            return []
        return sorted((p.stem for p in self.bindings_dir.glob("*.json")), key=lambda n: (n.lower(), n))

    def all(self) -> list[AppliedBinding]:
        found = []
        for port in self.ports():
            try:
                applied = self.get(port)
            except NwfilterError as error:
                log.warning("%s", error)
                continue
            if applied is not None:
                found.append(applied)
        return found

    def remove(self, port: str) -> None:
        self.update([], [port])

    def update(self, put: list[AppliedBinding], removed: list[str]) -> None:
        """Write the records of ``put``, remove those of ``removed``, then the index, once."""
        if put:
            self.bindings_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for applied in put:
            data = {"binding": format_binding(applied.binding), "backend": applied.backend,
                    "record": applied.record, "hash": applied.ruleset_hash}
            write_atomically(self._path(applied.binding.portdev), json.dumps(data, indent=1, sort_keys=True) + "\n",
                             mode=0o600)
        for port in removed:
            self._path(port).unlink(missing_ok=True)
        index = self.index()
        changed = {a.binding.portdev: _index_entry(a) for a in put} | dict.fromkeys(removed)
        if any(index.get(port) != entry for port, entry in changed.items()):
            for port, entry in changed.items():
                if entry is None:
                    index.pop(port, None)
                else:
                    index[port] = entry
            self._write_index(index)

    # -- the index: owner and mark id per port, so a change need not read every file ------
    @property
    def _index_path(self) -> Path:
        return self.rundir / "index.json"

    def index(self) -> dict[str, dict[str, Any]]:
        """Port -> {"owner": owner UUID, "id": mark id or None} (rebuilt from the files if needed)."""
        try:
            found = json.loads(self._index_path.read_text(encoding="utf-8"))
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        return self.rebuild_index()

    def rebuild_index(self) -> dict[str, dict[str, Any]]:
        index = {a.binding.portdev: _index_entry(a) for a in self.all()}
        self._write_index(index)
        return index

    def ids(self) -> dict[str, int]:
        """Port -> mark id of every binding that has one."""
        return {port: int(entry["id"]) for port, entry in self.index().items() if entry.get("id") is not None}

    def owned_ports(self, owner_uuid: str) -> list[str]:
        return sorted(port for port, entry in self.index().items() if entry.get("owner") == owner_uuid)

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self._index_path, json.dumps(index, sort_keys=True) + "\n", mode=0o600)


def _index_entry(applied: AppliedBinding) -> dict[str, Any]:
    return {"owner": applied.binding.owner_uuid, "id": applied.record.get("id")}
