"""The kernel's own account of a packet: ``nft -a monitor trace`` lines -> stages (pure).

Both backends end up as nftables rules (the nftables backend natively; ebtables, iptables and
ip6tables on Debian 12 are their nf_tables variants), so one trace covers both. Every rule a
packet meets *and matches* prints a line ``trace id ID FAMILY TABLE CHAIN rule TEXT # handle N
(verdict V)``; entering a base chain prints ``... packet: DUMP``, leaving it by its policy
``... policy accept``. The frames of one run are separated by marker frames (see ``lab``) and
processed in order, so the lines between two markers belong to one packet (clones of a flooded
frame carry other trace ids but stay in the same window).

A chain of ours is recognised by its name (``role``): which stage it serves and which of the
IR's chains it holds. The stage's decision is the last rule line in its chains with a final
verdict for the stage (``accept``, ``drop``, a ``return`` out of a root chain or an L3 copy);
without one the packet went through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE_RE = re.compile(r"^trace id (\S+) (\S+) (\S+) (\S+) (packet|rule|policy|verdict|unknown)\b:? ?(.*)$")
_RULE_RE = re.compile(r"^(.*?)(?: # handle (\d+))? \(verdict ([^)]*)\)\s*$")


@dataclass(frozen=True)
class Event:
    trace: str
    family: str
    table: str
    chain: str
    kind: str  # packet | rule | policy | verdict
    text: str  # rule text, packet dump or policy
    handle: int | None = None
    verdict: str | None = None  # accept, drop, return, continue, jump X, goto X


def parse_line(line: str) -> Event | None:
    found = _LINE_RE.match(line.strip())
    if not found:
        return None
    trace, family, table, chain, kind, rest = found.groups()
    if kind != "rule":
        verdict = rest.split()[0] if kind in ("policy", "verdict") and rest else None
        return Event(trace, family, table, chain, kind, rest, None, verdict)
    rule = _RULE_RE.match(rest)
    if not rule:
        return Event(trace, family, table, chain, kind, rest)
    text, handle, verdict = rule.groups()
    return Event(trace, family, table, chain, kind, text.strip(), int(handle) if handle else None, verdict)


@dataclass(frozen=True)
class Role:
    """What one of our kernel chains is: its stage and which IR chain it holds (``None``: the
    root chain of an L2 side, or the L3 copy)."""

    stage: str
    sub: str | None = None


@dataclass
class StageTrace:
    """The kernel's decision for one stage: its deciding rule line, if any."""

    key: str
    passed: bool
    event: Event | None = None  # the deciding rule line (None: no rule of ours decided)
    events: list[Event] = field(default_factory=list)  # every line of the stage, in order


def split_windows(lines: list[str], marker_number) -> dict[int, list[Event]]:
    """Packet number -> its events: the lines after marker N-1 and before marker N belong to
    packet N. ``marker_number(dump)`` is the number a ``packet:`` line's marker frame carries,
    or None for other frames (a marker's other lines are left out with it)."""
    windows: dict[int, list[Event]] = {}
    marker_traces: set[str] = set()
    current = 1
    for line in lines:
        event = parse_line(line)
        if event is None:
            continue
        number = marker_number(event.text) if event.kind == "packet" else None
        if number is not None:
            marker_traces.add(event.trace)
            current = number + 1
            continue
        if event.trace not in marker_traces:
            windows.setdefault(current, []).append(event)
    return windows


_FINAL = ("accept", "drop")


def stage_decision(key: str, events: list[Event], role_of) -> StageTrace:
    """The decision of stage ``key`` from a packet's events; ``role_of(event)`` gives the
    :class:`Role` of the event's chain (None: not ours)."""
    mine = [e for e in events if e.kind == "rule" and (role := role_of(e)) is not None and role.stage == key]
    for event in mine:
        verdict = (event.verdict or "").split()[0] if event.verdict else ""
        role = role_of(event)
        ends_l2_root = verdict == "return" and role.sub is None
        if verdict in _FINAL or ends_l2_root:
            return StageTrace(key, verdict != "drop", event, mine)
    return StageTrace(key, True, None, mine)
