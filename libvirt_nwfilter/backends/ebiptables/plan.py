"""Port changes → ``*-restore --noflush`` steps in libvirt's two phases, and new records (pure).

Phases (libvirt's two-phase protocol, one restore invocation per tool and phase for all ports)
-----------------------------------------------------------------------------------------------

Each ``*-restore --noflush`` run on the nf_tables based tools (Debian 12: iptables 1.8.9) is one
kernel transaction: it applies completely or not at all.

``apply``
    per tool: take every final name the old record does not list with ``-N`` (which fails when
    a chain of that name exists, so a leftover of a lost record refuses the change before
    anything changed, instead of old rules staying in front of the new ones), build every
    port's new chains under the temporary names (declared with ``:NAME``, which creates a chain
    or flushes a leftover one), fill them, and link the temporary roots *after* the old ones
    (``-A``), so old and new are both active, the old first. ip(6)tables also
    get the port's ``nwf-in-post`` ACCEPT if it was not there. Before the ip(6)tables step, an
    "ensure" step (errors ignored) creates the four global chains and their FORWARD/INPUT jumps in
    one transaction: it fails as a whole, changing nothing, when they exist already, so jumps are
    never duplicated. A rebuild instead repairs them at the start of the apply step
    (:func:`~.listing.repair_globals_lines`).
``commit``
    per tool: delete the old links (from the record), flush and delete the old chains and the
    ``-N`` placeholders, and rename the temporary chains to the final names (libvirt's
    tearOldRules; jumps follow a rename).
    Removing a port (``new=None``) happens here only (libvirt's allTeardown), so a failing batch
    removes nothing either.
``rollback``
    per tool, errors ignored: unlink and delete the temporary chains and the placeholders, and the
    ``nwf-in-post`` rule if this plan added it (libvirt's tearNewRules). A tool whose apply step failed has nothing to
    roll back (its transaction was not applied), so its rollback fails harmlessly.

Record (``PortRecord``, JSON)
-----------------------------

::

    {"format": 1, "backend": "ebiptables", "port": "vnet0",
     "l2": {"from-vm": ["mac", "arp-ip"], "to-vm": null},       # sub-chain names; null = no root
     "l3": [4],                                                  # families with NFI/NFO/NHI
     "ebtables":  {"chains": ["nwf-I-vnet0", "NI-vnet0:mac", …],
                   "rules":  ["-A PREROUTING -i vnet0 -j nwf-I-vnet0"]},
     "iptables":  {"chains": ["NFI-vnet0", "NFO-vnet0", "NHI-vnet0"],
                   "rules":  ["-A nwf-in -m physdev --physdev-in vnet0 -g NFI-vnet0", …,
                              "-A nwf-in-post -m physdev --physdev-in vnet0 -j ACCEPT"]},
     "ip6tables": {"chains": [], "rules": []}}

``chains`` are the chains the port owns, ``rules`` the rules it owns in chains it does not own
(written exactly as they were added, so ``-D`` removes them). Teardown uses only these two lists,
so a later version with other names still removes what an older one created. A record rebuilt
from the kernel (:func:`~.listing.inventory`, with leftover temporary chains) is a valid ``old``:
apply removes the temporaries first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ...errors import UnsupportedError
from ...ir import Jump, L2Side, PortRuleset, Side
from ..base import Batch, Plan, PortChange, PortRecord, Step
from .names import (GLOBAL_CHAINS, GLOBAL_HOOKS, L3_COPIES, NAME, RECORD_FORMAT, check_port, check_suffix,
                    delete_line, in_post_rule, is_temp_chain, l2_link, l2_root_chain, l2_sub_chain, l3_chain, l3_link,
                    rule_target)
from .render import render_l2_jump, render_l2_rule, render_l3_rule
from .tools import EBTABLES, IPTABLES, TOOLS, Tool

@dataclass
class ToolPart:
    """What one port puts into one tool's tables (names are the temporary ones)."""

    chains: list[tuple[str, str]] = field(default_factory=list)  # (temporary, final)
    rules: list[str] = field(default_factory=list)  # -A lines into our temporary chains
    links: list[tuple[str, str]] = field(default_factory=list)  # (-A line to temp, to final)
    permanent: list[str] = field(default_factory=list)  # rules kept across updates (in-post)


@dataclass
class PortParts:
    port: str
    tools: dict[str, ToolPart]  # by tool name
    l2: dict[str, list[str] | None]
    l3: list[int]


def _render_l2_side(port: str, side: Side, l2: L2Side, part: ToolPart) -> list[str] | None:
    if l2.empty:
        if l2.subchains:
            raise UnsupportedError(f"sub-chains without a root chain on the {side.value} side of {port}")
        return None
    root_t = l2_root_chain(side, port, temp=True)
    names = [sc.name for sc in l2.subchains]
    if len(set(names)) != len(names):
        raise UnsupportedError(f"duplicate sub-chain names on the {side.value} side of {port}: {names}")
    for name in names:
        check_suffix(name)
        if len(l2_sub_chain(side, port, name)) > EBTABLES.chain_max:  # pragma: no cover - budget
            raise UnsupportedError(f"chain name too long for port {port!r} and chain {name!r}")
    part.chains.append((root_t, l2_root_chain(side, port)))
    for name in names:
        part.chains.append((l2_sub_chain(side, port, name, temp=True), l2_sub_chain(side, port, name)))
    for item in l2.root:
        if isinstance(item, Jump):
            if item.chain not in names:
                raise UnsupportedError(f"jump to unknown sub-chain {item.chain!r} on port {port}")
            part.rules.append(render_l2_jump(root_t, item, l2_sub_chain(side, port, item.chain, temp=True)))
        else:
            part.rules.append(render_l2_rule(root_t, item))
    for sc in l2.subchains:
        sub_t = l2_sub_chain(side, port, sc.name, temp=True)
        for rule in sc.rules:
            part.rules.append(render_l2_rule(sub_t, rule))
    part.links.append((l2_link(side, port, root_t), l2_link(side, port, l2_root_chain(side, port))))
    return names


def render_port(port: str, ruleset: PortRuleset) -> PortParts:
    """Everything ``ruleset`` puts on ``port``, per tool, under the temporary names."""
    check_port(port)
    parts = {t.name: ToolPart() for t in TOOLS}
    l2 = {side.value: _render_l2_side(port, side, ruleset.l2(side), parts[EBTABLES.name])
          for side in (Side.FROM_VM, Side.TO_VM)}
    families = []
    copies = {"fi": ruleset.fi, "fo": ruleset.fo, "hi": ruleset.hi}
    for tool in (t for t in TOOLS if t.l3):
        per_copy = {c: [r for r in copies[c] if r.family == tool.family] for c in L3_COPIES}
        if not any(per_copy.values()):
            continue
        families.append(tool.family)
        part = parts[tool.name]
        part.chains += [(l3_chain(c, port, temp=True), l3_chain(c, port)) for c in L3_COPIES]
        part.rules += [render_l3_rule(l3_chain(c, port, temp=True), rule) for c in L3_COPIES for rule in per_copy[c]]
        part.links += [(l3_link(c, port, l3_chain(c, port, temp=True)), l3_link(c, port, l3_chain(c, port)))
                       for c in L3_COPIES]
        part.permanent.append(in_post_rule(port))
    for rule in ruleset.fi + ruleset.fo + ruleset.hi:
        if rule.family not in (4, 6):
            raise UnsupportedError(f"unknown IP family {rule.family} ({rule.origin})")
    return PortParts(port=port, tools=parts, l2=l2, l3=families)


def record_for(parts: PortParts) -> dict:
    """The record of a port once ``parts`` are committed."""
    rec: dict = {"format": RECORD_FORMAT, "backend": NAME, "port": parts.port, "l2": parts.l2, "l3": parts.l3}
    for name, part in parts.tools.items():
        rec[name] = {"chains": [final for _, final in part.chains],
                     "rules": [final for _, final in part.links] + list(part.permanent)}
    return rec


@dataclass
class _Old:
    """A tool's part of an old record: final and (left over) temporary chains and rules."""

    final_chains: list[str]
    final_rules: list[str]
    temp_chains: list[str]
    temp_rules: list[str]

    @classmethod
    def of(cls, record: PortRecord | None, tool: Tool) -> "_Old":
        if not record:
            return cls([], [], [], [])
        if record.get("backend", NAME) != NAME:
            raise UnsupportedError(f"record of backend {record.get('backend')!r} given to the {NAME} backend")
        data = record.get(tool.name) or {}
        chains = [str(c) for c in data.get("chains", ())]
        rules = [str(r) for r in data.get("rules", ())]
        temp_rules = [r for r in rules if is_temp_chain(rule_target(r) or "")]
        return cls([c for c in chains if not is_temp_chain(c)], [r for r in rules if r not in temp_rules],
                   [c for c in chains if is_temp_chain(c)], temp_rules)


def ensure_globals_text() -> str:
    """Creates the four global chains and their hooks in one transaction; fails without any
    change when any of them exists (hence run with errors ignored)."""
    lines = [f"-N {c}" for c in GLOBAL_CHAINS]
    lines += [f"-I {hook} {pos} -j {chain}" for chain, hook, pos in GLOBAL_HOOKS]
    return IPTABLES.text(lines)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _phases(tool: Tool, old: _Old, part: ToolPart) -> tuple[list[str], list[str], list[str]]:
    """One port's lines in one tool: apply, commit, rollback."""
    # apply: drop leftovers of an interrupted earlier change, then build the new set. Every
    # final name the old record does not list is taken now with -N, which fails when a chain
    # of that name exists: a leftover of a lost record refuses the change before anything
    # changed (the caller rebuilds, removing what no record names) instead of the rename.
    added = [p for p in part.permanent if p not in old.final_rules]
    placeholders = _unique(final for _, final in part.chains if final not in old.final_chains)
    apply = [*(delete_line(x) for x in old.temp_rules), *tool.remove(old.temp_chains),
             *(f"-N {final}" for final in placeholders),
             *(tool.declare(temp) for temp, _ in part.chains), *part.rules, *(temp for temp, _ in part.links),
             *added]
    # commit: tear the old set and the placeholders (known to exist: apply made them, in a
    # transaction of its own), move the new set to the final names.
    commit = [*(delete_line(x) for x in old.final_rules if x not in part.permanent),
              *tool.remove(_unique(old.final_chains + placeholders)),
              *(f"-E {temp} {final}" for temp, final in part.chains)]
    # rollback: remove what apply added.
    rollback = [*(delete_line(temp) for temp, _ in part.links), *(delete_line(x) for x in added),
                *tool.remove([temp for temp, _ in part.chains] + placeholders)]
    return apply, commit, rollback


def plan(tools: Sequence[Tool], changes: Sequence[PortChange],
         globals_repair: Mapping[str, list[str]] | None = None) -> tuple[Plan, dict[str, PortRecord | None]]:
    """One plan for all ``changes`` (see the docstring). ``globals_repair`` (per tool name, for
    a rebuild): lines making the global chains and hooks right, put first in each ip(6)tables
    apply transaction that needs them, instead of the "ensure" step that changes nothing when
    any of them exists."""
    seen: set[str] = set()
    rendered: list[tuple[PortChange, PortParts | None]] = []
    for ch in changes:
        check_port(ch.port)
        if ch.port in seen:
            raise UnsupportedError(f"port {ch.port!r} appears twice in one change")
        seen.add(ch.port)
        rendered.append((ch, render_port(ch.port, ch.new) if ch.new is not None else None))

    apply = {t.name: Batch(f"*{t.table}") for t in tools}
    commit = {t.name: Batch(f"*{t.table}") for t in tools}
    rollback = {t.name: Batch(f"*{t.table}") for t in tools}
    needs_globals = {t.name for t in tools if t.l3 and any(p and p.tools[t.name].chains for _, p in rendered)}
    if globals_repair is not None:
        for name in needs_globals:
            apply[name].add(globals_repair.get(name, ()))
    records: dict[str, PortRecord | None] = {}
    for ch, parts in rendered:
        for tool in tools:
            lines = _phases(tool, _Old.of(ch.old, tool), parts.tools[tool.name] if parts else ToolPart())
            for batches, text in zip((apply, commit, rollback), lines):
                batches[tool.name].add(text, ch.port)
        records[ch.port] = record_for(parts) if parts else None

    steps: list[Step] = []
    for tool in tools:
        if tool.name in needs_globals and globals_repair is None:
            steps.append(Step(tool.restore, ensure_globals_text(), ignore_errors=True))
        if apply[tool.name]:
            steps.append(apply[tool.name].step(tool.restore, *tool.footer))
    # commit: ip(6)tables first (their links into the global chains go before ebtables' chains)
    commits = [commit[t.name].step(t.restore, *t.footer) for t in sorted(tools, key=lambda t: not t.l3)
               if commit[t.name]]
    rollbacks = [rollback[t.name].step(t.restore, *t.footer, ignore_errors=True) for t in reversed(tools)
                 if rollback[t.name]]
    return Plan(apply=tuple(steps), commit=tuple(commits), rollback=tuple(rollbacks)), records
