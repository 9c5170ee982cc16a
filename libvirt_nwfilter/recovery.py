"""Completing what an interrupted process left, before a command does its own work.

:func:`complete` takes the journal's intent (:mod:`journal`) and rolls it FORWARD: the filter
definition it names is stored, every port it names gets its new binding (or none), and every
binding is rebuilt from the records in one plan (:meth:`Committer.rebuild`: whatever the kernel
holds, half a change included, is replaced by exactly the records). If the new state cannot be
applied (the kernel refuses it now), it rolls BACK the same way to the old bindings and the
previous definition. Then the rules of any backend the intent moves away from are removed, the
index is rebuilt from the files and the journal removed. A process killed during recovery leaves
the journal: the next command starts the recovery again.

:func:`move_backend`: when records were made by another backend than the one configured, every
binding is rebuilt with the configured one and the other's rules removed (journalled like any
change, so an interruption is completed).
"""

from __future__ import annotations

import logging
from typing import Sequence

from .commit import Committer
from .errors import NwfilterError
from .journal import Intent, Journal
from .state import State
from .store import FilterStore
from .xml import parse_filter

log = logging.getLogger(__name__)


def complete(intent: Intent, committer: Committer, state: State, journal: Journal, store: FilterStore,
             forget: Sequence[str] = ()) -> None:
    """Finish the interrupted change ``intent`` (forward, else back); see the module docstring.
    ``forget``: ports whose records go as well (``binding-delete --force``)."""
    log.warning("completing the interrupted %s", intent.describe())
    with committer.adopted():
        try:
            _roll(intent, committer, state, store, True, forget)
        except NwfilterError as error:
            if intent.filter is not None:
                log.error("cannot complete the update of filter '%s' (%s); restoring the previous one",
                          intent.filter.name, error)
            else:
                log.error("cannot complete %s (%s); restoring the previous bindings", intent.describe(), error)
            _roll(intent, committer, state, store, False, forget)
    state.rebuild_index()
    journal.clear()


def _roll(intent: Intent, committer: Committer, state: State, store: FilterStore, forward: bool,
          forget: Sequence[str]) -> None:
    if intent.filter is not None:
        text = intent.filter.new if forward else intent.filter.previous
        if text is not None:
            store.write(parse_filter(text, str(committer.journal.path)))
        elif not store.origin(intent.filter.name).shipped:
            store.remove(intent.filter.name)
    records, _ = state.scan()
    wanted = {a.binding.portdev: a.binding for a in records}
    for port, change in intent.ports.items():
        target = change.new if forward else change.old
        if target is None:
            wanted.pop(port, None)
        else:
            wanted[port] = target
    gone = [port for port, change in intent.ports.items() if (change.new if forward else change.old) is None]
    for port in forget:
        wanted.pop(port, None)
        gone.append(port)
    committer.rebuild(list(wanted.values()), intent.command, forget=gone, teardown=intent.teardown)


def move_backend(committer: Committer, state: State) -> None:
    """Rebuild every binding with the configured backend if another one made some of them."""
    records, _ = state.scan()
    others = sorted({a.backend for a in records} - {committer.backend.name})
    if not others:
        return
    log.warning("bindings were applied with backend %s; moving all %d to %s", ", ".join(others), len(records),
                committer.backend.name)
    committer.rebuild([a.binding for a in records], "backend change", teardown=others)
