"""Filter tree + parameters -> the ordered flat list of concrete rules of one port (pure).

Implements semantics.md §2, §3 step 1 and §8, and filter-language.md §9: depth-first expansion,
parameter precedence (the caller's variables win), missing-variable collection over the whole
tree, list variables and iterators, type-checking of substituted values, libvirt's stable sort.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from .errors import ExpansionLimitError, MissingVariablesError, UnknownFilterError, ValidationError
from .model import Attr, Filter, FilterRef, Match, Rule, VarRef
from .schema import PROTOCOLS, parse_literal
from .syntax import match_problems

Variables = Mapping[str, tuple[str, ...]]
Lookup = Callable[[str], "Filter | None"]
LEARNING_VALUES = ("any", "dhcp", "none")
# Our reserved variable: the guest's IPv6 link-local address(es); by default the one its kernel
# derives from each MAC (modified EUI-64, RFC 4291 appendix A), docs/filter-language-extensions.md.
LINK_LOCAL = "IPV6_LINKLOCAL"


@dataclass(frozen=True)
class RuleInstance:
    """One concrete rule of a port: every value literal, with the filter it came from."""

    filter: str
    chain: str
    chain_priority: int
    rule_number: int  # 1-based position among the filter's rules
    rule: Rule
    position: int  # index in the flattening order (before sorting)

    @property
    def origin(self) -> str:
        return f"filter '{self.filter}' rule {self.rule_number}"

    @property
    def in_root(self) -> bool:
        return self.chain == "root"


@dataclass(frozen=True)
class _Pending:
    """A rule met while walking the tree, with the variables in force there."""

    flt: Filter
    rule_number: int
    rule: Rule
    variables: Variables
    position: int

    @property
    def where(self) -> str:
        return f"filter '{self.flt.name}' rule {self.rule_number}"


def port_variables(params: Variables, mac: str) -> dict[str, tuple[str, ...]]:
    """The top-level variables of a port: its parameters plus ``MAC`` unless given."""
    variables = dict(params)
    variables.setdefault("MAC", (mac,))
    return variables


def eui64_link_local(mac: str) -> str:
    """The link-local address a kernel forms from ``mac`` (fe80::/64 + modified EUI-64)."""
    octets = bytes.fromhex(parse_literal(PROTOCOLS["mac"].attr("srcmacaddr"), mac).replace(":", ""))
    interface_id = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + interface_id))


def _link_locals(macs: tuple[str, ...]) -> tuple[str, ...]:
    """The EUI-64 link-locals of the MACs that are valid (others are refused where used)."""
    found = []
    for mac in macs:
        try:
            address = eui64_link_local(mac)
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return tuple(found)


def resolve(ref: FilterRef, mac: str, lookup: Lookup, max_rules: int | None = None) -> list[RuleInstance]:
    """Expand ``ref`` (a binding's filter reference) into the port's ordered concrete rules;
    with ``max_rules``, a tree that would expand to more rules is refused BEFORE expanding
    (ExpansionLimitError naming the filter, rule and list variables)."""
    variables = port_variables(ref.param_dict(), mac)
    if LINK_LOCAL not in variables and _link_locals(variables["MAC"]):
        variables[LINK_LOCAL] = _link_locals(variables["MAC"])
    _check_learning(variables)
    tree = _tree(ref.filter, lookup)
    pending = {entry.position: _Pending(entry.flt, entry.rule_number, entry.rule, {**entry.defaults, **variables},
                                        entry.position) for entry in tree if entry.shared is None}
    _check_missing(ref.filter, [pending[position] for position in sorted(pending)], learning_mode(variables))
    planned = [(entry, []) if entry.shared is not None else
               (pending[entry.position], _wheels(entry.rule.match, pending[entry.position].variables, entry.where))
               for entry in tree]
    if max_rules is not None:
        _check_size(ref.filter, planned, max_rules)
    instances = []
    for item, wheels in planned:
        if isinstance(item, _TreeRule):
            instances.append(item.shared)
        else:
            instances += _expand(item, wheels)
    return instances


@dataclass(frozen=True)
class _TreeRule:
    """One rule of a filter tree, in the order of the port's rules: what every port that uses
    the tree shares. ``defaults``: the parameters of the filter references on the way to it
    (the port's own variables override them); ``shared``: its instance when it has no
    variables (the same for every port)."""

    flt: Filter
    rule_number: int
    rule: Rule
    defaults: Variables
    position: int
    shared: RuleInstance | None

    @property
    def where(self) -> str:
        return f"filter '{self.flt.name}' rule {self.rule_number}"


# Filter trees walked and sorted, by top filter: (the filters the walk looked up, the rules).
# An entry is used only while the lookup gives back those very filter objects.
_TREES: dict[str, tuple[tuple[tuple[str, Filter], ...], tuple[_TreeRule, ...]]] = {}
_MAX_TREES = 256


def _tree(top: str, lookup: Lookup) -> tuple[_TreeRule, ...]:
    """The rules of the tree under ``top``, in the port's order (cached while its filters stay
    the same objects)."""
    cached = _TREES.get(top)
    if cached is not None and all(lookup(name) is flt for name, flt in cached[0]):
        return cached[1]
    used: dict[str, Filter] = {}

    def recording(name: str) -> Filter | None:
        flt = used[name] = lookup(name)
        return flt

    walked: list[_Pending] = []
    _walk(top, {}, recording, walked, ())
    walked.sort(key=lambda p: (p.flt.chain != "root", p.rule.priority))
    tree = tuple(_TreeRule(p.flt, p.rule_number, p.rule, p.variables, p.position,
                           None if _has_variables(p.rule) else
                           RuleInstance(p.flt.name, p.flt.chain, p.flt.effective_priority, p.rule_number, p.rule,
                                        p.position)) for p in walked)
    if len(_TREES) >= _MAX_TREES:
        _TREES.clear()
    _TREES[top] = (tuple(used.items()), tree)
    return tree


def tree_filters(top: str, lookup: Lookup) -> tuple[Filter, ...]:
    """The filters the tree under ``top`` is made of (the same objects while none of them
    changed); UnknownFilterError and the like as :func:`resolve`."""
    _tree(top, lookup)
    return tuple(flt for _, flt in _TREES[top][0])


def _has_variables(rule: Rule) -> bool:
    return rule.match is not None and any(True for _ in rule.match.variables())


def _size(wheels: list[_Wheel]) -> int:
    return math.prod(len(steps) for _, steps in wheels)


def _check_size(top: str, planned: list[tuple[_Pending | _TreeRule, list[_Wheel]]], max_rules: int) -> None:
    """ExpansionLimitError when the rules would number more than ``max_rules`` (counted, not made)."""
    sizes = [(_size(wheels), item, wheels) for item, wheels in planned]
    total = sum(size for size, _, _ in sizes)
    if total <= max_rules:
        return
    size, item, wheels = max(sizes, key=lambda entry: entry[0])
    lists = ", ".join(f"{'/'.join(ref.access for ref in refs)} ({len(steps)} values)"
                      for refs, steps in sorted(wheels, key=lambda wheel: wheel[0][0].iterator if wheel[0] else 0)
                      if len(steps) > 1)
    raise ExpansionLimitError(
        f"filter '{top}' would expand to {_count_text(total)} rules, more than the {max_rules} one binding may "
        f"have (max-rules-per-binding): {item.where} alone gives {_count_text(size)}"
        + (f" from the list variables {lists}" if lists else ""))


def _count_text(number: int) -> str:
    if number < 10 ** 15:
        return str(number)
    return f"about 10^{int(number.bit_length() * math.log10(2))}"


def _walk(name: str, variables: Variables, lookup: Lookup, out: list[_Pending], path: tuple[str, ...]) -> None:
    flt = lookup(name)
    if flt is None:
        where = f" (referenced by '{path[-1]}')" if path else ""
        raise UnknownFilterError(f"referenced filter '{name}' is missing{where}")
    if name in path:
        raise UnknownFilterError(f"filter '{name}' references itself through " + " -> ".join(path))
    number = 0
    for entry in flt.entries:
        if isinstance(entry, Rule):
            number += 1
            out.append(_Pending(flt, number, entry, variables, len(out)))
        else:
            child = {**entry.param_dict(), **variables}
            _walk(entry.filter, child, lookup, out, path + (name,))


def _check_learning(variables: Variables) -> None:
    values = variables.get("CTRL_IP_LEARNING")
    if values and values[0].lower() not in LEARNING_VALUES:
        raise ValidationError([f"CTRL_IP_LEARNING value '{values[0]}' is invalid (expected any, dhcp or none)"])


def learning_mode(variables: Variables) -> str:
    """How a missing ``IP`` is learned: the first value of ``CTRL_IP_LEARNING`` (lower case),
    ``any`` when it is not given (semantics.md §10)."""
    values = variables.get("CTRL_IP_LEARNING")
    return values[0].lower() if values else "any"


def _check_missing(top: str, pending: list[_Pending], mode: str) -> None:
    needed: dict[str, list[str]] = {}
    for item in pending:
        for ref in item.rule.match.variables() if item.rule.match else ():
            values = item.variables.get(ref.name)
            if values is None or (ref.index is not None and ref.index >= len(values)):
                users = needed.setdefault(ref.access, [])
                if item.flt.name not in users:
                    users.append(item.flt.name)
    if not needed:
        return
    listed = ", ".join(f"{access} (needed by {', '.join(users)})" for access, users in needed.items())
    message = f"cannot instantiate filter '{top}': missing variables: {listed}"
    if "IP" in needed:
        message += "; " + _learning_note(mode, len(needed))
    raise MissingVariablesError(message, tuple(needed))


def _learning_note(mode: str, missing: int) -> str:
    if missing > 1:
        return "IP is learned only when it is the only variable missing"
    if mode == "none":
        return "IP must be given as a parameter: CTRL_IP_LEARNING is 'none'"
    return f"IP is to be learned (CTRL_IP_LEARNING '{mode}')"


_Wheel = tuple[list[VarRef], list[dict[VarRef, str]]]


def _wheels(match: Match, variables: Variables, where: str) -> list[_Wheel]:
    """One wheel per iterator (iterator 0 first): its references and the list of steps binding
    them (distinct value combinations only)."""
    groups: dict[int, list[VarRef]] = {0: []}
    for ref in match.variables():
        if ref.index is None and ref not in groups.setdefault(ref.iterator, []):
            groups[ref.iterator].append(ref)
    wheels = []
    for iterator, refs in groups.items():
        lengths = {len(variables[ref.name]) for ref in refs}
        if len(lengths) > 1:
            names = ", ".join(ref.access for ref in refs)
            raise ValidationError([f"{where}: list variables {names} iterate together but have different "
                                   "numbers of values"])
        steps, seen = [], set()
        for i in range(lengths.pop() if lengths else 1):
            values = tuple(variables[ref.name][i] for ref in refs)
            if values not in seen:
                seen.add(values)
                steps.append(dict(zip(refs, values)))
        wheels.append((refs, steps))
    return wheels


def _expand(item: _Pending, wheels: list[_Wheel]) -> list[RuleInstance]:
    rule, flt = item.rule, item.flt
    make = lambda r: RuleInstance(flt.name, flt.chain, flt.effective_priority, item.rule_number, r, item.position)  # noqa: E731
    instances = []
    for combination in itertools.product(*(steps for _, steps in reversed(wheels))):
        binding: dict[VarRef, str] = {}
        for step in combination:
            binding.update(step)
        instances.append(make(_substitute(item, binding)))
    return instances


def _substitute(item: _Pending, binding: dict[VarRef, str]) -> Rule:
    match = item.rule.match
    attrs, problems = [], []
    where = item.where
    for attr in match.attrs:
        value = attr.value
        if isinstance(value, VarRef):
            text = binding[value] if value in binding else item.variables[value.name][value.index]
            try:
                value = parse_literal(match.spec.attr(attr.name), text)
            except ValueError as error:
                problems.append(f"{where}: variable {value} = '{text}' is not valid for "
                                f"<{match.protocol}> attribute '{attr.name}': {error}")
                continue
        attrs.append(Attr(attr.name, value, attr.negated))
    concrete = Match(match.protocol, tuple(attrs))
    if not problems:
        problems = [f"{where}: {p}" for p in match_problems(concrete, item.rule.direction)]
    if problems:
        raise ValidationError(problems)
    rule = item.rule
    return Rule(rule.action, rule.direction, rule.priority, rule.statematch, concrete)
