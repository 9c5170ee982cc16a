"""What the request server keeps warm for the processes it forks: the state index read and
every recorded binding compiled and rendered once, so that a request (a ``reapply`` or ``define`` of many bindings
above all) finds the filter trees walked, the rules compiled and their nft text rendered.

Only caches of pure functions are filled (keyed by what they are computed from: a changed
filter or binding is simply a miss); nothing here is ever the truth. The server calls
:meth:`Warmer.step` when it is idle: a short slice of work at a time, once the records, the
index or the filters changed. Each spare request process then runs the backend's warm-up steps
(:meth:`Warmer.ready_spare`): libnftables' cache of the ruleset, kept while the ruleset's
generation is unchanged.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from .. import executor
from ..backends.base import PortChange, Step
from ..rulesets import ruleset_hash
from ..config import Config
from ..service import Service
from ..state import INDEX

log = logging.getLogger(__name__)

SLICE = 0.02  # seconds of work per step: a request arriving meanwhile waits at most that long


class Warmer:
    def __init__(self, config: Config, spare_steps: tuple[Step, ...] = ()):
        """``spare_steps``: the backend's warm-up steps, run in each spare request process."""
        self.config = config
        self.spare_steps = spare_steps
        self.bindings = Path(config.rundir) / "bindings"
        self.filters = Path(config.confdir) / "filters"
        self.index = Path(config.rundir) / INDEX
        self._seen: tuple | None = None  # the two directories and the index as last looked at
        self._records: dict[str, tuple[int, int]] = {}  # record file -> (inode, mtime) compiled
        self._work: Iterator[None] | None = None
        self.passes = 0  # passes of work begun (each found something changed)

    def step(self) -> bool:
        """One slice of work; True while there is more."""
        if self._work is None:
            todo = self._changed()
            if todo is None:
                return False
            self._work = self._compile(todo)
            self.passes += 1
        deadline = time.monotonic() + SLICE
        for _ in self._work:
            if time.monotonic() > deadline:
                return True
        self._work = None
        # What was compiled lives on in the caches: frozen, a forked request's garbage collections
        # neither walk it nor copy its pages (the server froze what it had before serving).
        gc.freeze()
        return False

    def ready_spare(self) -> None:
        """In a spare request process: the backend's warm-up steps begin in the background (the
        kernel's ruleset read into libnftables' cache while the request is still on its way)."""
        executor.warm_nft_cache(self.spare_steps)

    def run(self) -> None:
        """Everything at once (at start, before the socket listens)."""
        while self.step():
            pass

    def _changed(self) -> list[str] | None:
        """Record files written since they were last compiled (every one when a filter changed);
        None when nothing changed (a pass over no record reads the index again)."""
        seen = (_signature(self.bindings), _signature(self.filters), _signature(self.index))
        if seen == self._seen:
            return None
        filters_changed = self._seen is None or seen[1] != self._seen[1]
        self._seen = seen
        try:
            with os.scandir(self.bindings) as entries:
                records = {e.name: (e.inode(), e.stat().st_mtime_ns) for e in entries
                           if e.name.endswith(".json") and not e.name.startswith(".")}
        except OSError:
            records = {}
        todo = [name for name, signature in records.items() if filters_changed or self._records.get(name) != signature]
        self._records = records
        return sorted(todo)

    def _compile(self, names: list[str]) -> Iterator[None]:
        try:
            service = Service(self.config)
            backend = service.backend
            service.state.spell_index()  # the index kept per process while its file is unchanged
        except Exception as error:  # noqa: BLE001 - warming up is never required
            log.debug("nothing warmed up: %s", error)
            return
        for name in names:
            try:
                applied = service.state.get(name.removesuffix(".json"))
                if applied is not None:
                    ruleset = service.ruleset(applied.binding)
                    ruleset_hash(ruleset)
                    if applied.backend == backend.name:
                        backend.plan([PortChange(applied.binding.portdev, None, ruleset)])
            except Exception as error:  # noqa: BLE001 - the request will report it
                log.debug("%s not warmed up: %s", name, error)
            yield


def _signature(path: Path) -> tuple[int, int] | None:
    """Changes whenever a file in the directory ``path`` is written (renamed into place) or
    removed, or the file ``path`` is replaced."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns
