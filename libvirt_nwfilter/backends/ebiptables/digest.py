"""Per-port digests of what a kernel holds, from the survey's :class:`~.listing.Save`s (pure).

Per port: its chains (role = the chain's kind and sub-chain name, e.g. ``I``, ``I:arp-ip``,
``FI``, temporary ones ``J``…; policy; rules in order, this port's chain names replaced by their
roles), the rules elsewhere that lead to them (``PREROUTING -i P -j nwf-I-P``, ``nwf-in …
--physdev-in P -g NFI-P``) and its ``nwf-in-post`` ACCEPT, and for ip(6)tables the FORWARD/INPUT
hooks into the global chains. Counters are dropped when the survey is read.

Digests compare the live kernel with a reference kernel built from the records (``rebuild_plan``
in a throw-away network namespace), never with what a change applied (plans run no survey): a
port's digest depends only on its own chains, rules, dispatch rules and the global hooks, not on
the other ports, and temporary names (an interrupted change) count as drift.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..base import PortRecord, canonical_digest
from .listing import Save
from .names import NAME
from .tools import TOOLS

DIGEST_FORMAT = 1
_TOKEN_RE = re.compile(r"\S+")


def port_structure(saves: Mapping[str, Save], port: str) -> dict | None:
    """What the kernel has for ``port`` (see the docstring), None when nothing."""
    chains, dispatch, hooks = [], [], {}
    for save in saves.values():
        tool = save.tool.name
        owned = save.owned.get(port, [])
        roles = {c: f"<{save.ours[c][1]}>" for c in owned}

        def subst(line: str) -> str:
            return _TOKEN_RE.sub(lambda m: roles.get(m.group(0), m.group(0)), line)

        for chain in owned:
            chains.append([tool, roles[chain], save.policies.get(chain, "-"),
                           [subst(r) for r in save.rules.get(chain, [])]])
        leading = [line for chain in owned for line in save.by_target.get(chain, [])]
        leading += [line for line in save.in_post.get(port, []) if line not in leading]
        dispatch += [[tool, subst(line)] for line in leading]
        if save.tool.l3 and (owned or leading):
            hooks[tool] = list(save.hooks)
    if not chains and not dispatch:
        return None
    return {"chains": sorted(chains), "dispatch": sorted(dispatch), "hooks": hooks}


def expects_nothing(record: PortRecord) -> bool:
    return not any((record.get(t.name) or {}).get("chains") or (record.get(t.name) or {}).get("rules") for t in TOOLS)


def port_digest(structure: dict | None) -> str:
    """sha256 (hex) of a port's normalised structure (``None``: nothing of the port)."""
    return canonical_digest({"backend": NAME, "format": DIGEST_FORMAT, "port": structure})
