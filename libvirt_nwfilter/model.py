"""The parsed filter language: frozen dataclasses shared by every layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, Union

from .schema import PROTOCOLS, ProtocolSpec


class FastHashEnum(enum.Enum):
    """An enum hashed by identity (members are singletons and compare by identity): rules and
    their compiled forms are cache keys, and ``Enum.__hash__`` is Python code."""

    __hash__ = object.__hash__


class Action(FastHashEnum):
    DROP = "drop"
    ACCEPT = "accept"
    REJECT = "reject"
    RETURN = "return"
    CONTINUE = "continue"


class Direction(FastHashEnum):
    IN = "in"
    OUT = "out"
    INOUT = "inout"


# Chain prefixes in the order libvirt tests them, with libvirt's default priorities.
# stp has no libvirt default (0); we order it at -810 but never print it (filter-language §2.2).
CHAIN_PREFIXES = ("mac", "vlan", "stp", "arp", "rarp", "ipv4", "ipv6")
LIBVIRT_CHAIN_DEFAULTS = {"root": 0, "mac": -800, "vlan": -750, "stp": 0, "arp": -500,
                          "rarp": -400, "ipv4": -700, "ipv6": -600}
STP_ORDER_PRIORITY = -810
DEFAULT_RULE_PRIORITY = 500


def chain_prefix(chain: str) -> str:
    """The family of a (valid) chain name: ``root`` or one of :data:`CHAIN_PREFIXES`."""
    if chain == "root":
        return "root"
    return next(prefix for prefix in CHAIN_PREFIXES if chain.startswith(prefix))


@dataclass(frozen=True)
class VarRef:
    """A variable reference: ``$NAME``, ``$NAME[N]`` (index) or ``$NAME[@ID]`` (iterator)."""

    name: str
    index: int | None = None
    iterator: int = 0

    def __str__(self) -> str:
        if self.index is not None:
            return f"${self.name}[{self.index}]"
        if self.iterator:
            return f"${self.name}[@{self.iterator}]"
        return f"${self.name}"

    @property
    def access(self) -> str:
        """How a missing access is reported: ``IP``, ``A[3]``, ``B[@2]``."""
        return str(self)[1:]


Value = Union[str, VarRef]


@dataclass(frozen=True)
class Attr:
    """One attribute of a protocol match; ``value`` is canonical text or a variable."""

    name: str
    value: Value
    negated: bool = False


@dataclass(frozen=True)
class Match:
    """The merged protocol elements of one rule, attributes in canonical order."""

    protocol: str
    attrs: tuple[Attr, ...] = ()

    @property
    def spec(self) -> ProtocolSpec:
        return PROTOCOLS[self.protocol]

    def get(self, name: str) -> Attr | None:
        return next((attr for attr in self.attrs if attr.name == name), None)

    def value(self, name: str) -> Value | None:
        attr = self.get(name)
        return attr.value if attr else None

    def variables(self) -> Iterator[VarRef]:
        return (a.value for a in self.attrs if isinstance(a.value, VarRef))


@dataclass(frozen=True)
class Rule:
    action: Action
    direction: Direction
    priority: int = DEFAULT_RULE_PRIORITY
    statematch: bool = True
    match: Match | None = None


Params = tuple[tuple[str, tuple[str, ...]], ...]


def make_params(pairs: dict[str, tuple[str, ...] | list[str]]) -> Params:
    """Parameters in their canonical form: names sorted (byte order), values in given order."""
    return tuple((name, tuple(values)) for name, values in sorted(pairs.items()))


@dataclass(frozen=True)
class FilterRef:
    filter: str
    params: Params = ()

    def param_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.params)


Entry = Union[Rule, FilterRef]


@dataclass(frozen=True)
class Filter:
    """A ``<filter>`` document.

    ``priority`` is the explicitly written chain priority, kept only when ``chain`` was written
    (libvirt ignores it otherwise); :attr:`effective_priority` is what ordering uses.
    """

    name: str
    chain: str = "root"
    priority: int | None = None
    uuid: str | None = None
    entries: tuple[Entry, ...] = ()

    @property
    def effective_priority(self) -> int:
        prefix = chain_prefix(self.chain)
        if prefix == "root":
            return 0
        if self.priority is not None:
            return self.priority
        return STP_ORDER_PRIORITY if prefix == "stp" else LIBVIRT_CHAIN_DEFAULTS[prefix]

    @property
    def printed_priority(self) -> int:
        """The chain priority libvirt would hold for this filter (0 = not printed)."""
        if self.priority is not None:
            return self.priority
        return LIBVIRT_CHAIN_DEFAULTS[chain_prefix(self.chain)]

    def references(self) -> tuple[str, ...]:
        return tuple(e.filter for e in self.entries if isinstance(e, FilterRef))


@dataclass(frozen=True)
class Lease:
    """An address learned on a port: ``expires`` in seconds since the epoch (UTC), None for
    never (learned by ``any``, or a DHCP lease of infinite time)."""

    address: str  # canonical text
    expires: int | None = None


@dataclass(frozen=True)
class Learning:
    """How a binding whose filter needs ``IP`` without a value learns it (semantics.md §10):
    ``mode`` is ``any`` or ``dhcp`` (``CTRL_IP_LEARNING``), ``leases`` the addresses learned
    so far, sorted by address."""

    mode: str
    leases: tuple[Lease, ...] = ()
    variables: tuple[str, ...] = ("IP",)  # the variables learned: IP, IPV6 or both (issue 15)

    @property
    def state(self) -> str:
        """``learning`` (no address yet, or no IPv4 address while ``IP`` is learned: the
        learning-time rules), ``learned`` (any) or ``leased`` (dhcp: at least one lease)."""
        if not self.leases or ("IP" in self.variables and all(":" in lease.address for lease in self.leases)):
            return "learning"
        return "learned" if self.mode == "any" else "leased"


@dataclass(frozen=True)
class Binding:
    """One filter instantiated on one port (libvirt's ``<filterbinding>``); ``learning`` is set
    when the port learns its address (part of the record, never of a user's input)."""

    owner_name: str
    owner_uuid: str
    portdev: str
    mac: str
    filterref: FilterRef
    linkdev: str | None = None
    learning: Learning | None = None
