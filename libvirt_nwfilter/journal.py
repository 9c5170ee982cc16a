"""The intent journal: what a change is about to do, written before the kernel is touched.

``RUNDIR/journal.json`` is written atomically before every kernel transaction and removed once
the kernel, the records (and, for a filter update, the stored filter) all say the same. It
names, per port, the binding before (``old``) and after (``new``) the change (None: no
binding), the filter definition being stored (``filter``: its new and previous XML) and the
backends whose rules must go (``teardown``: a backend change). A journal that exists therefore
means: a process was interrupted somewhere between writing it and removing it; the kernel and
the records may each be before, in the middle of, or after the change. The next command that
takes the lock completes it (:mod:`recovery`).

Reading validates everything (a regular file, JSON of the documented shape, every binding and
filter parses); anything else is :class:`JournalDamaged`, whose message names the file, the
problem and the repair.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .config import BACKENDS
from .errors import NwfilterError
from .files import FileProblem, exists, read_json, write_atomically
from .lock import describe_holder, holder_text
from .model import Binding
from .state import valid_port
from .bindingxml import format_binding, parse_binding
from .xml import parse_filter

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
FORMAT = 1
MAX_JOURNAL_BYTES = 256 << 20


@dataclass(frozen=True)
class FilterUpdate:
    """A filter definition stored as part of the change (``previous`` None: there was none
    of ours, the built-in one or nothing)."""

    name: str
    new: str
    previous: str | None = None


@dataclass(frozen=True)
class PortIntent:
    old: Binding | None
    new: Binding | None


@dataclass(frozen=True)
class Intent:
    """One interrupted (or ongoing) change: see the module docstring."""

    command: str
    ports: Mapping[str, PortIntent]
    filter: FilterUpdate | None = None
    teardown: tuple[str, ...] = ()
    writer: str = ""  # "PID COMMAND LINE" of the process that wrote it

    def describe(self) -> str:
        what = f"'{self.command}'"
        if self.filter is not None:
            what += f" (filter '{self.filter.name}')"
        if self.ports:
            shown = sorted(self.ports)
            what += " on " + ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
        if self.teardown:
            what += f" (moving from backend {', '.join(self.teardown)})"
        if self.writer:
            what += f" of {describe_holder(self.writer)}"
        return what


class JournalDamaged(NwfilterError):
    """The journal exists but cannot be read."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"the journal {path} {problem}: the change it describes cannot be completed; "
                         "changes rebuild every binding from its record until the repair 'libvirt-nwfilter "
                         "reapply' (rebuilds every binding from its record, then removes the journal)")


class Journal:
    def __init__(self, rundir: Path):
        self.path = Path(rundir) / JOURNAL

    def exists(self) -> bool:
        return exists(self.path)

    def read(self) -> Intent | None:
        """The pending intent (None: nothing pending); JournalDamaged when unreadable."""
        try:
            data = read_json(self.path, MAX_JOURNAL_BYTES)
        except FileProblem as problem:
            raise JournalDamaged(self.path, str(problem)) from None
        if data is None:
            return None
        try:
            return _intent_from(data, str(self.path))
        except KeyError as error:
            raise JournalDamaged(self.path, f"has no '{error.args[0]}' field") from None
        except (TypeError, ValueError, NwfilterError) as error:
            raise JournalDamaged(self.path, f"does not have the expected content ({_one_line(error)})") from None

    def write(self, intent: Intent) -> None:
        data = {"format": FORMAT, "command": intent.command, "writer": holder_text(),
                "ports": {port: {"old": _xml(p.old), "new": _xml(p.new)} for port, p in intent.ports.items()},
                "filter": None if intent.filter is None else {"name": intent.filter.name, "new": intent.filter.new,
                                                              "previous": intent.filter.previous},
                "teardown": list(intent.teardown)}
        write_atomically(self.path, json.dumps(data, sort_keys=True) + "\n", mode=0o600)

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise NwfilterError(f"cannot remove {self.path}: {error.strerror}") from None


def _xml(binding: Binding | None) -> str | None:
    return None if binding is None else format_binding(binding)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _intent_from(data: object, source: str) -> Intent:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a format {FORMAT} journal object")
    command, ports, teardown, writer = data["command"], data["ports"], data["teardown"], data.get("writer", "")
    if not all(isinstance(value, kind) for value, kind in ((command, str), (ports, dict), (teardown, list),
                                                           (writer, str))):
        raise TypeError("'command', 'ports', 'teardown' or 'writer' has the wrong type")
    if any(name not in BACKENDS for name in teardown):
        raise ValueError(f"unknown backend in 'teardown': {teardown}")
    intents = {}
    for port, entry in ports.items():
        if not valid_port(port) or not isinstance(entry, dict):
            raise ValueError(f"bad entry for port {port!r}")
        old, new = (_binding(entry[key], port, source) for key in ("old", "new"))
        intents[port] = PortIntent(old, new)
    return Intent(command, intents, _filter_update(data["filter"], source), tuple(teardown), writer)


def _binding(text: object, port: str, source: str) -> Binding | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"port {port}: a binding that is not text")
    binding = parse_binding(text, source, stored=True)
    if binding.portdev != port:
        raise ValueError(f"port {port}: the binding of port {binding.portdev}")
    return binding


def _filter_update(value: object, source: str) -> FilterUpdate | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("'filter' is not an object")
    name, new, previous = value["name"], value["new"], value["previous"]
    if not isinstance(name, str) or not isinstance(new, str) or not isinstance(previous, (str, type(None))):
        raise TypeError("'filter' has fields of the wrong type")
    for text in (new, previous):
        if text is not None and parse_filter(text, source).name != name:
            raise ValueError(f"'filter' holds a definition that is not filter '{name}'")
    return FilterUpdate(name, new, previous)
