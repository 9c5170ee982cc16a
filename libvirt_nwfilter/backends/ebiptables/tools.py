"""The three tools the ebiptables backend drives, one frozen description each (pure).

What the code would otherwise ask with ``if tool == EBTABLES`` is an attribute here: the table
of ours, the restore and save commands, how a chain is declared, whether the input ends with
``COMMIT``, whether the tool holds the L3 copies (and with them the global chains and
``nwf-in-post``), and how our per-port chain names read back.

What the restore tools accept (verified on Debian 12, ebtables/iptables 1.8.9 nf_tables)
---------------------------------------------------------------------------------------

* ``ebtables-restore --noflush`` (no ``-w``/``--concurrent`` option): ``*nat``, ``:CHAIN POLICY``
  (creates the chain, or *flushes* an existing one and sets its policy), ``-N`` (fails when the
  chain exists), ``-A``, ``-I``, ``-D`` (rule spec), ``-F``, ``-X``, ``-P``, ``-E``. The whole input
  is one transaction (an error anywhere applies nothing). A chain created and deleted in the same
  transaction makes it fail (``CHAIN_USER_ADD … Operation not supported``), so only chains known to
  exist are removed there. Deleting a chain and creating or renaming another to its name in the
  same transaction works. Jumps follow ``-E``.
* ``iptables-restore -w --noflush`` / ``ip6tables-restore``: ``:CHAIN - [0:0]`` creates or flushes;
  ``-N``, ``-A``, ``-I``, ``-D``, ``-F``, ``-X``, ``-E`` all work; one transaction per ``COMMIT``.
  A rule without ``-j`` is accepted (used for ``continue``, §12 R1). Quoted arguments take ``\\"``
  and ``\\\\`` escapes. Missing ipsets fail at parse time (``Set X doesn't exist``).
* ebtables-nft lists every user chain as ``policy: RETURN`` in ``ebtables -L``, whatever its real
  policy; ``ebtables-save`` and ``nft list`` show the truth. A bare ``-N`` (as libvirt uses)
  creates a chain with policy **ACCEPT** (the documented ebtables default).

Every ebtables chain we create gets policy ACCEPT, as libvirt's do (tests/ORACLE.md shows each of
libvirt's chains ending in ``counter accept``): a frame that falls off a sub-chain is accepted.
semantics.md §4 says RETURN; observed libvirt behaviour wins. iptables user chains always return.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .names import EB_CHAIN_PATTERNS, EBTABLES_CHAIN_MAX, IP_CHAIN_PATTERNS, IPTABLES_CHAIN_MAX


@dataclass(frozen=True)
class Tool:
    name: str  # also the key of its part in a record
    table: str  # the one table of ours
    restore: tuple[str, ...]  # runs one transaction from stdin (--noflush: only what it names)
    save: tuple[str, ...]  # lists the table (the survey)
    policy: str  # after ":CHAIN": what declaring a chain gives it (and flushes it)
    commits: bool  # the input ends with COMMIT
    l3: bool  # holds L3 copies, the global chains and nwf-in-post (ip(6)tables)
    family: int | None  # IP family of its L3 copies
    chain_max: int
    chain_patterns: tuple[re.Pattern, ...]  # our per-port chain names: kind, port, (sub)

    def declare(self, chain: str) -> str:
        """Create ``chain``, or flush it if it exists (restore ``--noflush`` semantics)."""
        return f":{chain} {self.policy}"

    def remove(self, chains: Sequence[str]) -> list[str]:
        """Lines deleting ``chains``: declaring them first makes the removal independent of
        whether each still exists and drops every reference between them (a root's jumps into
        its sub-chains)."""
        return [self.declare(c) for c in chains] + [f"-X {c}" for c in chains]

    def text(self, lines: Sequence[str]) -> str:
        """A whole restore input: the table, ``lines``, and COMMIT where the tool wants one."""
        return "\n".join([f"*{self.table}", *lines, *self.footer]) + "\n"

    @property
    def footer(self) -> tuple[str, ...]:
        return ("COMMIT",) if self.commits else ()

    def chain_owner(self, chain: str) -> tuple[str, str] | None:
        """The port and role of one of our per-port chains (None: not one)."""
        for pattern in self.chain_patterns:
            found = pattern.fullmatch(chain)
            if found:
                sub = found.groupdict().get("sub")
                return found.group("port"), found.group("kind") + (f":{sub}" if sub else "")
        return None


EBTABLES = Tool("ebtables", "nat", ("ebtables-restore", "--noflush"), ("ebtables-save", "-t", "nat"),
                "ACCEPT", commits=False, l3=False, family=None,
                chain_max=EBTABLES_CHAIN_MAX, chain_patterns=EB_CHAIN_PATTERNS)
IPTABLES = Tool("iptables", "filter", ("iptables-restore", "-w", "--noflush"), ("iptables-save", "-t", "filter"),
                "- [0:0]", commits=True, l3=True, family=4,
                chain_max=IPTABLES_CHAIN_MAX, chain_patterns=IP_CHAIN_PATTERNS)
IP6TABLES = dataclasses.replace(IPTABLES, name="ip6tables", restore=("ip6tables-restore", "-w", "--noflush"),
                                save=("ip6tables-save", "-t", "filter"), family=6)
TOOLS = (EBTABLES, IPTABLES, IP6TABLES)  # the survey's order; plans apply in this order


def configured(restore: Mapping[str, Sequence[str]] | None = None,
               save: Mapping[str, Sequence[str]] | None = None) -> tuple[Tool, ...]:
    """:data:`TOOLS` with other commands for some of them (by tool name)."""
    restore, save = restore or {}, save or {}
    return tuple(dataclasses.replace(tool, restore=tuple(restore.get(tool.name, tool.restore)),
                                     save=tuple(save.get(tool.name, tool.save))) for tool in TOOLS)
