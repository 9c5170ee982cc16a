"""Short constructors for hand-built IR rulesets (the backends' golden cases and tests)."""

from __future__ import annotations

from libvirt_nwfilter.ir import Cond, Field, IpNet, L2Rule, L3Rule, Verdict

ORIGIN = "filter 'test' rule 1"


def c(field: Field, value: object, negated: bool = False) -> Cond:
    return Cond(field, value, negated)


def ethertype(value: int) -> Cond:
    return c(Field.ETHER_TYPE, value)


def l2(verdict: Verdict, *conds: Cond, origin: str = ORIGIN) -> L2Rule:
    return L2Rule(tuple(conds), verdict, origin)


def l3(family: int, protocol: str, verdict: Verdict, *conds: Cond, comment: str | None = None,
       origin: str = ORIGIN) -> L3Rule:
    return L3Rule(family, protocol, tuple(conds), verdict, origin, comment)


def net4(address: str, prefix: int = 32) -> IpNet:
    return IpNet(address, prefix, 4)


def net6(address: str, prefix: int = 128) -> IpNet:
    return IpNet(address, prefix, 6)
