"""What the kernel holds of ours, read from the ``*-save`` outputs of the survey (pure).

The survey is ``ebtables-save -t nat``, ``iptables-save -t filter``, ``ip6tables-save -t filter``
(:class:`~.tools.Tool`.save, in :data:`~.tools.TOOLS` order; a failed step gives ""). Each
output's table of ours is read into one :class:`Save`: chains with their policies and rules
(counters dropped: ``[n:m]``, ``-c n m``), and the lookups recovery and digests need.

:func:`inventory` names, per port, every chain of ours (final, temporary, orphaned), the rules
elsewhere that lead to them and its ``nwf-in-post`` ACCEPT, as a record a plan can remove or
leave alone; :func:`purge_steps` removes everything of ours; :func:`repair_globals_lines` makes
the global chains and their hooks exactly right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ...ir import Side
from ..base import Step, not_named
from .names import (GLOBAL_CHAINS, GLOBAL_HOOKS, GLOBAL_IN_POST, NAME, RECORD_FORMAT, delete_line, is_port_name,
                    l2_root_chain, l3_chain, rule_target)
from .tools import TOOLS, Tool

_COUNTERS_PREFIX_RE = re.compile(r"\A\[\d+:\d+\]\s+")
_COUNTERS_SUFFIX_RE = re.compile(r"\s+-c\s+\d+\s+\d+\s*\Z")
_PHYSDEV_IN_RE = re.compile(r"--physdev-in\s+(\S+)")


@dataclass
class Save:
    """One tool's table of ours in its ``*-save`` output."""

    tool: Tool
    policies: dict[str, str] = field(default_factory=dict)  # declared chain → policy ("-" for user chains)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain → "-A …" lines, in order
    lines: list[tuple[str, str | None, str]] = field(default_factory=list)  # (source, target, line)
    ours: dict[str, tuple[str, str]] = field(default_factory=dict)  # chain of ours → (port, role)
    owned: dict[str, list[str]] = field(default_factory=dict)  # port → its chains
    by_target: dict[str, list[str]] = field(default_factory=dict)  # chain of ours → lines leading to it
    in_post: dict[str, list[str]] = field(default_factory=dict)  # port → nwf-in-post lines
    hooks: list[str] = field(default_factory=list)  # lines into the global chains, in order

    @property
    def chains(self) -> list[str]:
        return list(self.policies)

    def port_of(self, chain: str | None) -> str | None:
        return self.ours[chain][0] if chain in self.ours else None


def parse_save(text: str, tool: Tool) -> Save:
    save = Save(tool)
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            continue
        if current != tool.table or line == "COMMIT":
            continue
        if line.startswith(":"):
            words = line[1:].split()
            save.policies[words[0]] = words[1] if len(words) > 1 else "-"
            save.rules.setdefault(words[0], [])
            continue
        line = _COUNTERS_SUFFIX_RE.sub("", _COUNTERS_PREFIX_RE.sub("", line))
        if line.startswith("-A "):
            source = line.split()[1]
            save.rules.setdefault(source, []).append(line)
            save.lines.append((source, rule_target(line), line))
    for chain in save.rules:
        found = tool.chain_owner(chain)
        if found is not None:
            save.ours[chain] = found
            save.owned.setdefault(found[0], []).append(chain)
    for source, target, line in save.lines:
        if target in save.ours and save.port_of(source) != save.ours[target][0]:
            save.by_target.setdefault(target, []).append(line)
        if source == GLOBAL_IN_POST and (found := _PHYSDEV_IN_RE.search(line)):
            save.in_post.setdefault(found.group(1), []).append(line)
        if target in GLOBAL_CHAINS and source not in GLOBAL_CHAINS and source not in save.ours:
            save.hooks.append(line)
    return save


def read(outputs: Sequence[str] | Mapping[str, str], tools: Sequence[Tool] = TOOLS) -> dict[str, Save]:
    """Survey outputs (in ``tools`` order, or by tool name) read per tool name."""
    if not isinstance(outputs, Mapping):
        outputs = dict(zip((t.name for t in tools), outputs))
    return {t.name: parse_save(outputs.get(t.name, "") or "", t) for t in tools}


def inventory(saves: Mapping[str, Save]) -> dict[str, dict]:
    """Records of every port that has objects of ours in the kernel (names no port of ours can
    have are someone else's chains that merely look like ours: left out). Temporary chains left
    by an interrupted change are included: passing such a record as ``old`` makes the next plan
    remove them."""
    recs: dict[str, dict] = {}

    def rec(port: str) -> dict:
        if port not in recs:
            recs[port] = {"format": RECORD_FORMAT, "backend": NAME, "port": port, "l2": {}, "l3": []}
            for t in TOOLS:
                recs[port][t.name] = {"chains": [], "rules": []}
        return recs[port]

    roles: dict[str, str] = {}
    for save in saves.values():
        part = save.tool.name
        # roots and L3 chains first, so they are removed before their sub-chains are re-declared
        for chain, (port, role) in sorted(save.ours.items(), key=lambda item: (":" in item[1][1], item[0])):
            rec(port)[part]["chains"].append(chain)
            roles[chain] = role
        for source, target, line in save.lines:
            if source in save.ours:
                continue  # inside a chain of ours: removed with the chain
            if target in save.ours:
                rec(save.ours[target][0])[part]["rules"].append(line)
            elif source == GLOBAL_IN_POST and (found := _PHYSDEV_IN_RE.search(line)):
                rec(found.group(1))[part]["rules"].append(line)
    for port, r in recs.items():
        for side, letter in ((Side.FROM_VM, "I"), (Side.TO_VM, "O")):
            subs = [roles[c][2:] for c in r["ebtables"]["chains"] if roles[c].startswith(f"{letter}:")]
            r["l2"][side.value] = subs if l2_root_chain(side, port) in r["ebtables"]["chains"] else None
        r["l3"] = [t.family for t in TOOLS if t.l3 and l3_chain("fi", port) in r[t.name]["chains"]]
    return {port: r for port, r in recs.items() if is_port_name(port)}


def purge_steps(tools: Sequence[Tool], saves: Mapping[str, Save], *, globals: bool = True) -> tuple[Step, ...]:
    """Steps that remove every object of ours in ``saves``: per-port chains (final, temporary,
    orphaned) and their links, and with ``globals`` the global chains and their hooks. One
    transaction per tool."""
    steps = []
    for tool in tools:
        save = saves.get(tool.name) or Save(tool)
        ours = [c for c in save.chains if c in save.ours]
        glob = [c for c in GLOBAL_CHAINS if c in save.policies] if tool.l3 else []
        lines = [delete_line(line) for source, target, line in save.lines
                 if source not in ours and source not in glob  # goes with its chain (globals are flushed)
                 and (target in ours or (globals and target in glob))]
        lines += [tool.declare(g) for g in glob]
        lines += tool.remove(ours)
        if globals:
            lines += [f"-X {g}" for g in glob]
        if lines:
            steps.append(Step(tool.restore, tool.text(lines)))
    return tuple(steps)


def repair_globals_lines(save: Save) -> list[str]:
    """Lines making the global chains and their hooks exactly right, given the current state:
    every rule leading into a global chain is deleted, the missing global chains are created
    (``-N``: a stale survey makes the transaction fail rather than flush a chain in use), and
    the hooks are inserted at the top of FORWARD/INPUT."""
    lines = [delete_line(line) for line in save.hooks]
    lines += [f"-N {chain}" for chain in GLOBAL_CHAINS if chain not in save.policies]
    lines += [f"-I {hook} {pos} -j {chain}" for chain, hook, pos in GLOBAL_HOOKS]
    return lines


def unrecorded(held: Mapping, record: Mapping | None) -> list[str]:
    """The chains and rules of the inventory record ``held`` that the stored ``record`` does not
    name. A rule is known by the chain it is in and where it leads (the tools print options in
    an order of their own; what else a rule says is the digests' business)."""
    def link(rule: str) -> tuple[str, str | None]:
        words = rule.split()
        return (words[1] if len(words) > 1 else "", rule_target(rule))

    phrases = []
    for tool in TOOLS:
        have, named = held.get(tool.name) or {}, (record or {}).get(tool.name) or {}
        if not isinstance(named, Mapping):
            named = {}
        phrases += not_named([(("chain", c), f"{tool.name} chain {c}") for c in have.get("chains", ())]
                             + [(("rule", *link(r)), f"{tool.name} rule '{r}'") for r in have.get("rules", ())],
                             [("chain", str(c)) for c in named.get("chains", ()) or ()]
                             + [("rule", *link(str(r))) for r in named.get("rules", ()) or ()])
    return phrases
