"""Which bindings learn their addresses, how, and the parameters learned (pure).

A binding learns when its filter tree needs ``IP`` and/or ``IPV6``, these are the only variables
missing, and its ``CTRL_IP_LEARNING`` is ``any`` (the default) or ``dhcp`` (semantics.md §10;
IPv6: issue 15). The learned addresses become the values of their family's variable. While
``IP`` is learned and no IPv4 address is known, the port holds the learning-time rules; once it
is (or when only ``IPV6`` is learned), the full filter applies, with :data:`IPV6_UNLEARNED` as
``IPV6`` until a first IPv6 address is learned.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Callable, Iterable

from ..errors import MissingVariablesError, ValidationError
from ..ir import PortRuleset
from ..model import Binding, FilterRef, Learning, Lease, make_params
from ..resolve import learning_mode
from .rules import learning_ruleset

MODES = ("any", "dhcp")
SERVER_VARIABLE, SERVER_VARIABLE_V6 = "DHCPSERVER", "DHCPSERVERV6"
VARIABLE_OF_FAMILY = {4: "IP", 6: "IPV6"}
LEARNED = ("IP", "IPV6")
#: checks that the full filter instantiates once addresses are known
STAND_INS = {"IP": Lease("192.0.2.1"), "IPV6": Lease("2001:db8::1")}
#: IPV6 until an IPv6 address is learned: loopback, a source no neighbour accepts, so that
#: only what the filter allows without an address (link-local, ND and MLD from ::) passes
IPV6_UNLEARNED = Lease("::1")


def mode_needed(binding: Binding, error: MissingVariablesError) -> str | None:
    """The learning mode of ``binding`` when ``error`` is only its ``IP``/``IPV6`` missing and
    its mode learns (None: the error stands)."""
    if not error.missing or not set(missing_variables(error)) <= set(LEARNED):
        return None
    mode = learning_mode(binding.filterref.param_dict())
    return mode if mode in MODES else None


def missing_variables(error: MissingVariablesError) -> tuple[str, ...]:
    """The variables behind the missing accesses (``IPV6[@1]`` is ``IPV6``)."""
    return tuple(dict.fromkeys(access.split("[", 1)[0] for access in error.missing))


def family_variable(lease: Lease) -> str:
    return VARIABLE_OF_FAMILY[ipaddress.ip_address(lease.address).version]


def with_addresses(ref: FilterRef, leases: Iterable[Lease]) -> FilterRef:
    """``ref`` with the learned addresses as values of their variables."""
    values: dict[str, list[str]] = {}
    for lease in leases:
        values.setdefault(family_variable(lease), []).append(lease.address)
    params = {**ref.param_dict(), **{name: tuple(found) for name, found in values.items()}}
    return FilterRef(ref.filter, make_params(params))


def servers(binding: Binding, variable: str = SERVER_VARIABLE) -> tuple[str, ...]:
    """The trusted DHCP servers (``DHCPSERVER``, or ``DHCPSERVERV6``: the source addresses of
    their replies; empty: any server), ValidationError when a value is not of its family."""
    family, name = (ipaddress.IPv4Address, "IPv4") if variable == SERVER_VARIABLE else (ipaddress.IPv6Address, "IPv6")
    found = []
    for value in binding.filterref.param_dict().get(variable, ()):
        try:
            found.append(str(family(value)))
        except ValueError:
            raise ValidationError([f"{variable} value '{value}' is not an {name} address"]) from None
    return tuple(dict.fromkeys(found))


def compiled(binding: Binding, compile_ref: Callable[[FilterRef], PortRuleset]) -> tuple[PortRuleset, Learning | None]:
    """The ruleset of ``binding`` and its learning state (None: it does not learn), given
    ``compile_ref`` (a filter reference on the binding's port -> its ruleset).

    A binding that learns gets the full filter with the addresses learned so far (kept from
    ``binding.learning`` when its mode and variables are still the same), or the learning-time
    rules while ``IP`` is learned and no IPv4 address is known; the full filter is compiled with
    stand-in addresses first, so that one that could never be instantiated is refused now
    rather than once an address is learned."""
    try:
        return compile_ref(binding.filterref), None
    except MissingVariablesError as error:
        mode = mode_needed(binding, error)
        if mode is None:
            raise
        variables = tuple(name for name in LEARNED if name in missing_variables(error))
    learning = binding.learning
    kept = learning is not None and (learning.mode, learning.variables) == (mode, variables)
    leases = tuple(lease for lease in learning.leases if family_variable(lease) in variables) if kept else ()
    learned = {family_variable(lease) for lease in leases}
    if "IP" in variables and "IP" not in learned:
        compile_ref(with_addresses(binding.filterref, [STAND_INS[name] for name in variables]))
        ruleset = learning_ruleset(mode, binding.mac, servers(binding))
    else:
        unlearned = [IPV6_UNLEARNED] if "IPV6" in variables and "IPV6" not in learned else []
        ruleset = compile_ref(with_addresses(binding.filterref, [*leases, *unlearned]))
    servers(binding, SERVER_VARIABLE_V6)  # checked now
    return ruleset, Learning(mode, leases, variables)


def same_learning(recorded: Binding, binding: Binding) -> bool:
    """Whether two bindings are the same learning binding, their learned addresses aside."""
    if recorded.learning is None or binding.learning is None:
        return False
    return replace(recorded, learning=replace(recorded.learning, leases=())) == \
        replace(binding, learning=replace(binding.learning, leases=()))
