"""A packet through a port's compiled ruleset (the IR) -> verdicts per stage (pure).

The stages a packet crosses (semantics.md §1.2), in order:

=========  =====================================  =========================================
stage      rules                                  packets
=========  =====================================  =========================================
``l2-out`` L2 from the guest (libvirt-I)          every ``out`` packet
``l3-fi``  L3 forwarded from the guest (FI)       ``out`` IP packets (not VLAN-tagged)
``l3-hi``  L3 from the guest to the host (HI)     ``out`` IP packets ``--to-host``
``l3-fo``  L3 forwarded to the guest (FO)         ``in`` IP packets, except ``--from-host``
``l2-in``  L2 to the guest (libvirt-O)            every ``in`` packet
=========  =====================================  =========================================

L2 chains: a matching rule's verdict applies; a jump enters the sub-chain, whose ``return``
goes back to the root chain after the jump and whose end accepts the frame (libvirt's chains
have policy ACCEPT); ``return`` or the end of the root chain lets the frame continue. L3 chains:
``accept`` (RETURN in FI/HI), ``return`` and the end let the packet continue; ``drop`` and
``reject`` stop it; ``continue`` goes on with the next rule. A packet passes when every stage
lets it through. The connection tracker sees ``out`` packets after the L2 from-VM stage and
``in`` packets before any rule of the port.

Before any rule, a Linux bridge drops a frame entering from a port whose source MAC is not a
unicast address (multicast, broadcast or all zeros): the pseudo-stage ``bridge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..ir import Field, Jump, L3Rule, PortRuleset, Side, Verdict
from .conds import Predicate, Unsupported, compile_cond
from .conntrack import Tracker
from .conntrack import Verdict as CtVerdict
from .packet import Packet

STAGES = {
    "bridge": "the bridge",
    "l2-out": "L2 from the guest",
    "l3-fi": "L3 forwarded from the guest",
    "l3-hi": "L3 from the guest to the host",
    "l3-fo": "L3 forwarded to the guest",
    "l2-in": "L2 to the guest",
}
_PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "udplite": 136, "esp": 50, "ah": 51, "sctp": 132, "icmp": 1,
                     "igmp": 2, "icmpv6": 58}

# How a stage ended (``Stage.how``)
RULE = "rule"  # a rule's accept/drop/reject (or L3 return) decided
ROOT_RETURN = "root-return"  # an L2 root-chain rule returned: the frame continues
SUB_END = "sub-end"  # the frame fell off an L2 sub-chain: accepted (policy ACCEPT)
END = "end"  # no rule decided: the packet continues
NO_RULES = "no-rules"  # the port has no rules for this stage
BAD_SOURCE = "bad-source"  # the bridge drops frames whose source MAC is not unicast


class SimulationError(Exception):
    """The rules hold something whose outcome cannot be computed (e.g. a kernel ipset)."""


class CompiledRule:
    __slots__ = ("rule", "preds", "verdict", "chain", "index", "sub", "key")

    def __init__(self, rule, preds: tuple[Predicate, ...], chain: str, index: int, sub: "Chain | None" = None):
        self.rule, self.preds, self.chain, self.index, self.sub = rule, preds, chain, index, sub
        self.verdict = None if isinstance(rule, Jump) else rule.verdict
        self.key = _index_key(rule)

    def matches(self, p: Packet) -> bool:
        return _matches(self, p)


def _index_key(rule) -> int | None:
    """The one value of the packet's index field (ethertype at L2, protocol at L3) this rule can
    match, or None when it may match any."""
    if isinstance(rule, L3Rule):
        return None if rule.protocol == "all" else _PROTOCOL_NUMBERS[rule.protocol]
    return next((c.value for c in rule.conds if c.field is Field.ETHER_TYPE and not c.negated), None)


@dataclass
class Chain:
    """A chain's rules in order, and per value of the index field (ethertype or protocol) the
    rules that can match it: most rules test the ethertype first, so a packet only looks at
    its own ones (a cache filled as packets come)."""

    name: str  # "root", a sub-chain name, or "FI"/"FO"/"HI"
    rules: list[CompiledRule]
    problem: str | None = None  # why this chain cannot be evaluated (SimulationError when reached)
    indexed: dict[int | None, list[CompiledRule]] = field(default_factory=dict)

    def candidates(self, value: int | None) -> list[CompiledRule]:
        found = self.indexed.get(value)
        if found is None:
            found = self.indexed[value] = [r for r in self.rules if r.key is None or r.key == value]
        return found


@dataclass(slots=True)
class Stage:
    """How one stage treated the packet."""

    key: str
    passed: bool
    how: str
    rule: CompiledRule | None = None  # the deciding rule (RULE, ROOT_RETURN), or the jump (SUB_END)
    visited: list[tuple[Chain, int]] = field(default_factory=list)  # chains entered, last index looked at
    chain: Chain | None = None  # the stage's top chain

    @property
    def name(self) -> str:
        return STAGES[self.key]


@dataclass(slots=True)
class Result:
    packet: Packet
    passed: bool
    stages: list[Stage]
    conntrack: CtVerdict | None = None
    unreached: list[str] = field(default_factory=list)  # stages after the one that dropped it

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "drop"


class Simulator:
    """A port's ruleset, compiled once, and the connection tracker of one run."""

    def __init__(self, ruleset: PortRuleset):
        self.ruleset = ruleset
        self.tracker = Tracker()
        self.l2 = {Side.FROM_VM: self._l2_chain(ruleset.l2(Side.FROM_VM)),
                   Side.TO_VM: self._l2_chain(ruleset.l2(Side.TO_VM))}
        self.l3 = {(copy, family): self._l3_chain(copy.upper(), [r for r in rules if r.family == family])
                   for copy, rules in (("fi", ruleset.fi), ("fo", ruleset.fo), ("hi", ruleset.hi))
                   for family in (4, 6)}
        # stage key (and family) -> (runner, chain): one dictionary lookup per stage
        self._stages = {"l2-out": (_run_l2, self.l2[Side.FROM_VM]), "l2-in": (_run_l2, self.l2[Side.TO_VM])}
        self._stages.update({(f"l3-{copy}", family): (_run_l3, chain) for (copy, family), chain in self.l3.items()})

    # -- compiling ---------------------------------------------------------------------------
    def _preds(self, conds, family: int | None, key: tuple) -> tuple[Predicate, ...]:
        def count(p: Packet, _limit: int) -> int:
            return self.tracker.connlimit(key, p, p.ct_key)
        return tuple(compile_cond(c, family, count) for c in conds)

    def _compile(self, chain: Chain, rules: Iterable, family: int | None, subs: dict[str, Chain]) -> None:
        try:
            for index, rule in enumerate(rules):
                sub = subs.get(rule.chain) if isinstance(rule, Jump) else None
                preds = self._preds(rule.conds, family, (chain.name, family, index))
                if isinstance(rule, L3Rule) and rule.protocol != "all":
                    number = _PROTOCOL_NUMBERS[rule.protocol]
                    preds = (lambda p, n=number: p.ip_proto == n,) + preds
                chain.rules.append(CompiledRule(rule, preds, chain.name, index, sub))
        except Unsupported as error:
            chain.problem = str(error)

    def _l2_chain(self, side) -> Chain:
        subs = {}
        for sub in side.subchains:
            subs[sub.name] = Chain(sub.name, [])
            self._compile(subs[sub.name], sub.rules, None, {})
        root = Chain("root", [])
        self._compile(root, side.root, None, subs)
        return root

    def _l3_chain(self, name: str, rules: Sequence[L3Rule]) -> Chain:
        chain = Chain(name, [])
        self._compile(chain, rules, rules[0].family if rules else None, {})
        return chain

    # -- running ------------------------------------------------------------------------------
    def run(self, packets: Iterable[Packet]) -> list[Result]:
        return [self.evaluate(p) for p in packets]

    def evaluate(self, p: Packet) -> Result:
        """One packet (its connection state follows from the packets evaluated before)."""
        stages: list[Stage] = []
        keys = _stage_keys(p)
        ct: CtVerdict | None = None
        host_sent = p.direction == "in" and p.host
        if not host_sent and (p.src_mac >> 40 & 1 or p.src_mac == 0):
            return Result(p, False, [Stage("bridge", False, BAD_SOURCE)], None, list(keys))
        if p.direction == "in" and p.family is not None:
            ct = self._track(p)
            if host_sent:  # the host's own stack tracked and confirmed it before the bridge
                self.tracker.confirm(ct)
        for position, key in enumerate(keys):
            if key.startswith("l3") and ct is None:
                ct = self._track(p)
            stage = self._stage(key, p)
            stages.append(stage)
            if not stage.passed:
                return Result(p, False, stages, ct, list(keys[position + 1:]))
        if ct is not None and not host_sent:
            self.tracker.confirm(ct)
        return Result(p, True, stages, ct)

    def _track(self, p: Packet) -> CtVerdict:
        ct = self.tracker.classify(p)
        p.ct_state, p.ct_dir, p.ct_key = ct.state, ct.direction, ct
        return ct

    def _stage(self, key: str, p: Packet) -> Stage:
        runner, chain = self._stages[key if key[1] == "2" else (key, p.family)]
        return runner(key, chain, p)


_STAGE_KEYS = {  # (direction, host, reaches L3) -> stages
    ("out", False, False): ("l2-out",), ("out", True, False): ("l2-out",),
    ("out", False, True): ("l2-out", "l3-fi"), ("out", True, True): ("l2-out", "l3-hi"),
    ("in", False, False): ("l2-in",), ("in", True, False): ("l2-in",), ("in", False, True): ("l3-fo", "l2-in"),
}


def _stage_keys(p: Packet) -> tuple[str, ...]:
    return _STAGE_KEYS[(p.direction, p.host, p.family is not None and not (p.direction == "in" and p.host))]


def _check(chain: Chain) -> None:
    if chain.problem:
        raise SimulationError(chain.problem)


def _matches(rule: CompiledRule, p: Packet) -> bool:
    for pred in rule.preds:
        if not pred(p):
            return False
    return True


def _run_l2(key: str, root: Chain, p: Packet) -> Stage:
    if not root.rules:
        return Stage(key, True, NO_RULES, chain=root)
    _check(root)
    visited: list[tuple[Chain, int]] = []
    for rule in root.candidates(p.ethertype):
        if not _matches(rule, p):
            continue
        sub = rule.sub
        if sub is not None:
            _check(sub)
            outcome = _run_sub(key, root, rule, sub, p, visited)
            if outcome is not None:
                return outcome
            continue
        verdict = rule.verdict
        if verdict is Verdict.CONTINUE:
            continue
        visited.append((root, rule.index))
        if verdict is Verdict.RETURN:
            return Stage(key, True, ROOT_RETURN, rule, visited, root)
        return Stage(key, verdict is Verdict.ACCEPT, RULE, rule, visited, root)
    visited.append((root, len(root.rules) - 1))
    return Stage(key, True, END, None, visited, root)


def _run_sub(key: str, root: Chain, jump: CompiledRule, sub: Chain, p: Packet,
             visited: list[tuple[Chain, int]]) -> Stage | None:
    """The sub-chain's decision, or None when it returned to the root chain."""
    for rule in sub.candidates(p.ethertype):
        if not _matches(rule, p):
            continue
        verdict = rule.verdict
        if verdict is Verdict.CONTINUE:
            continue
        visited.append((sub, rule.index))
        if verdict is Verdict.RETURN:
            return None
        visited.insert(0, (root, jump.index))
        return Stage(key, verdict is Verdict.ACCEPT, RULE, rule, visited, root)
    visited.append((sub, len(sub.rules) - 1))
    visited.insert(0, (root, jump.index))
    return Stage(key, True, SUB_END, jump, visited, root)


def _run_l3(key: str, chain: Chain, p: Packet) -> Stage:
    if not chain.rules:
        return Stage(key, True, NO_RULES, chain=chain)
    _check(chain)
    for rule in chain.candidates(p.ip_proto):
        if rule.verdict is not Verdict.CONTINUE and _matches(rule, p):
            passed = rule.verdict in (Verdict.ACCEPT, Verdict.RETURN)
            return Stage(key, passed, RULE, rule, [(chain, rule.index)], chain)
    return Stage(key, True, END, None, [(chain, len(chain.rules) - 1)], chain)
