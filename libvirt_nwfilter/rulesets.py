"""Ports' compiled rulesets and their fingerprints, kept per process (pure functions of what
they are computed from): the resident service computes them for every recorded binding while
idle, and the requests it forks find them. A ruleset is reused while the filters of its tree are
the very objects it was compiled from (a filter file's content parses to one object per process,
:func:`~libvirt_nwfilter.store.FilterStore.source`); a fingerprint while its ruleset is."""

from __future__ import annotations

import zlib

from .compiler import compile_port
from .ir import PortRuleset, ruleset_text
from .model import Filter, FilterRef, make_params
from .resolve import Lookup, port_variables, resolve, tree_filters

MAX_KEPT = 1 << 14  # entries of each memory before it starts anew

# (filter, its variables, MAC, rule limit, ids of the tree's filters) -> (those filters, the ruleset)
_rulesets: dict[tuple, tuple[tuple[Filter, ...], PortRuleset]] = {}
# id of a ruleset -> (the ruleset, its fingerprint)
_fingerprints: dict[int, tuple[PortRuleset, str]] = {}


def port_ruleset(ref: FilterRef, mac: str, lookup: Lookup, max_rules: int | None = None) -> PortRuleset:
    """The compiled ruleset of ``ref`` on a port with ``mac`` (see :func:`.resolve.resolve`)."""
    filters = tree_filters(ref.filter, lookup)
    variables = make_params(port_variables(ref.param_dict(), mac))  # with and without MAC=mac alike
    key = (ref.filter, variables, mac, max_rules, tuple(map(id, filters)))
    kept = _rulesets.get(key)
    if kept is not None and all(a is b for a, b in zip(kept[0], filters)):
        return kept[1]
    ruleset = compile_port(resolve(ref, mac, lookup, max_rules=max_rules))
    if len(_rulesets) >= MAX_KEPT:
        _rulesets.clear()
    _rulesets[key] = (filters, ruleset)  # the filters are kept alive: their ids are not reused meanwhile
    return ruleset


def ruleset_hash(ruleset: PortRuleset) -> str:
    """A 64-bit fingerprint of a compiled ruleset (zlib: hashlib costs start-up time)."""
    kept = _fingerprints.get(id(ruleset))
    if kept is not None and kept[0] is ruleset:
        return kept[1]
    data = ruleset_text(ruleset).encode()
    fingerprint = f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"
    if len(_fingerprints) >= MAX_KEPT:
        _fingerprints.clear()
    _fingerprints[id(ruleset)] = (ruleset, fingerprint)
    return fingerprint
