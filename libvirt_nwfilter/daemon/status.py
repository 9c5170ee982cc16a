"""What the service tells ``status``: ``RUNDIR/libvirt-nwfilterd.json``, written by the watcher.

The file is a report, never state: ``status`` shows it only while the PID it names runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import NwfilterError
from ..files import write_atomically

log = logging.getLogger(__name__)

STATUS_FILE = "libvirt-nwfilterd.json"


class Report:
    """The watcher's report, rewritten (atomically) on every change."""

    def __init__(self, rundir: Path, service_pid: int, started: float):
        self.path = Path(rundir) / STATUS_FILE
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"pid": service_pid, "started": started, "libvirt": "not connected",
                                      "healing": "off", "repairs": 0, "last_repair": None,
                                      "events": 0, "last_event": None, "learning": "off", "learned": 0,
                                      "last_learned": None}

    def update(self, **values: Any) -> None:
        """A report that cannot be written is logged: the work it reports goes on."""
        with self._lock:
            self._data.update(values)
            try:
                write_atomically(self.path, json.dumps(self._data, sort_keys=True) + "\n", mode=0o644)
            except NwfilterError as error:
                log.warning("status not reported: %s", error)

    def count(self, key: str, **values: Any) -> None:
        with self._lock:
            self._data[key] = self._data.get(key, 0) + 1
        self.update(**values)


def read(rundir: Path) -> dict[str, Any] | None:
    """The report of the running service, None when no service runs for ``rundir``."""
    try:
        data = json.loads((Path(rundir) / STATUS_FILE).read_text(encoding="utf-8"))
        pid = int(data["pid"])
        os.kill(pid, 0)
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read()
        if not any(name in command for name in (b"nwfilterd", b"libvirt_nwfilter.daemon")):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


def status_lines(rundir: Path) -> list[tuple[str, str]]:
    """Label/value lines for ``libvirt-nwfilter status``."""
    data = read(rundir)
    if data is None:
        return [("Service", "not running (the hook and the command work in-process; no hot-plug, "
                            "live metadata or self-healing)")]
    lines = [("Service", f"running (pid {data['pid']}, up {_duration(time.time() - data['started'])})"),
             ("libvirt", data["libvirt"]), ("Self-healing", data["healing"])]
    repair = data.get("last_repair")
    lines.append(("Repairs", f"{data['repairs']}" + (f", last {_ago(repair['time'])}: {repair['what']}"
                                                     if repair else "")))
    learned = data.get("last_learned")
    lines.append(("IP learning", f"{data.get('learning', 'off')}; {data.get('learned', 0)} change(s) applied"
                  + (f", last {_ago(learned['time'])}: {learned['what']}" if learned else "")))
    event = data.get("last_event")
    lines.append(("libvirt events handled", f"{data['events']}" + (f", last {_ago(event['time'])}: {event['what']}"
                                                                   if event else "")))
    return lines


def _ago(when: float) -> str:
    return f"{_duration(time.time() - when)} ago"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    parts += [f"{minutes}m"] if minutes or hours or days else []
    return "".join(parts + [f"{secs}s"])
