"""Which bindings learn their address, how, and the parameters learned (pure).

A binding learns when its filter tree needs ``IP``, ``IP`` is the only variable missing and its
``CTRL_IP_LEARNING`` is ``any`` (the default) or ``dhcp`` (semantics.md §10). The learned
addresses become the values of ``IP``; the addresses are grouped by family so that IPv6
learning (``IPV6``) can join without changing the callers.
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
SERVER_VARIABLE = "DHCPSERVER"
VARIABLE_OF_FAMILY = {4: "IP"}  # IPv6 learning adds 6: "IPV6"
STAND_IN = Lease("192.0.2.1")  # checks that the full filter instantiates once an address is known


def mode_needed(binding: Binding, error: MissingVariablesError) -> str | None:
    """The learning mode of ``binding`` when ``error`` is only its ``IP`` missing and its mode
    learns (None: the error stands)."""
    if tuple(error.missing) != ("IP",):
        return None
    mode = learning_mode(binding.filterref.param_dict())
    return mode if mode in MODES else None


def with_addresses(ref: FilterRef, leases: Iterable[Lease]) -> FilterRef:
    """``ref`` with the learned addresses as values of their variables."""
    values: dict[str, list[str]] = {}
    for lease in leases:
        variable = VARIABLE_OF_FAMILY[ipaddress.ip_address(lease.address).version]
        values.setdefault(variable, []).append(lease.address)
    params = {**ref.param_dict(), **{name: tuple(found) for name, found in values.items()}}
    return FilterRef(ref.filter, make_params(params))


def servers(binding: Binding) -> tuple[str, ...]:
    """The trusted DHCP servers (``DHCPSERVER``; empty: any server), ValidationError when a
    value is not an IPv4 address."""
    found = []
    for value in binding.filterref.param_dict().get(SERVER_VARIABLE, ()):
        try:
            found.append(str(ipaddress.IPv4Address(value)))
        except ValueError:
            raise ValidationError([f"{SERVER_VARIABLE} value '{value}' is not an IPv4 address"]) from None
    return tuple(dict.fromkeys(found))


def compiled(binding: Binding, compile_ref: Callable[[FilterRef], PortRuleset]) -> tuple[PortRuleset, Learning | None]:
    """The ruleset of ``binding`` and its learning state (None: it does not learn), given
    ``compile_ref`` (a filter reference on the binding's port -> its ruleset).

    A binding that learns gets the full filter with the addresses learned so far (kept from
    ``binding.learning`` when its mode is still the same), or, with none, the learning-time
    rules; the full filter is compiled with a stand-in address first, so that one that could
    never be instantiated is refused now rather than once an address is learned."""
    try:
        return compile_ref(binding.filterref), None
    except MissingVariablesError as error:
        mode = mode_needed(binding, error)
        if mode is None:
            raise
    learning = binding.learning
    leases = learning.leases if learning is not None and learning.mode == mode else ()
    if leases:
        return compile_ref(with_addresses(binding.filterref, leases)), Learning(mode, leases)
    compile_ref(with_addresses(binding.filterref, [STAND_IN]))
    return learning_ruleset(mode, binding.mac, servers(binding)), Learning(mode)


def same_learning(recorded: Binding, binding: Binding) -> bool:
    """Whether two bindings are the same learning binding, their learned addresses aside."""
    if recorded.learning is None or binding.learning is None:
        return False
    return replace(recorded, learning=Learning(recorded.learning.mode)) == \
        replace(binding, learning=Learning(binding.learning.mode))
