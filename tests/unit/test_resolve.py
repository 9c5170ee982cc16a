"""Filter tree + parameters -> ordered concrete rules (semantics.md §2, §3, §8; filter-language §9)."""

from __future__ import annotations

import pytest

from libvirt_nwfilter.errors import MissingVariablesError, UnknownFilterError, ValidationError
from libvirt_nwfilter.model import FilterRef, VarRef, make_params
from libvirt_nwfilter.resolve import RuleInstance, resolve
from libvirt_nwfilter.xml import parse_filter

MAC = "52:54:00:00:00:01"


def tree(*docs: str):
    filters = {}
    for xml in docs:
        flt = parse_filter(xml, "test")
        filters[flt.name] = flt
    return filters.get


def run(lookup, top: str = "top", mac: str = MAC, **params) -> list[RuleInstance]:
    values = {name: tuple(v) if isinstance(v, (list, tuple)) else (v,) for name, v in params.items()}
    return resolve(FilterRef(top, make_params(values)), mac, lookup)


def values(instances: list[RuleInstance], *names: str) -> list[tuple]:
    return [tuple(i.rule.match.value(n) for n in names) for i in instances]


def rule(children: str = "", direction: str = "out", priority: int = 500, action: str = "accept") -> str:
    end = f">{children}</rule>" if children else "/>"
    return f"<rule action='{action}' direction='{direction}' priority='{priority}'{end}"


def flt(name: str, *entries: str, chain: str | None = None, priority: int | None = None) -> str:
    head = f"<filter name='{name}'"
    head += f" chain='{chain}'" if chain else ""
    head += f" priority='{priority}'" if priority is not None else ""
    return head + ">" + "".join(entries) + "</filter>"


def ref(name: str, **params) -> str:
    inner = "".join(f"<parameter name='{k}' value='{v}'/>" for k, vs in params.items()
                    for v in (vs if isinstance(vs, (list, tuple)) else [vs]))
    return f"<filterref filter='{name}'>{inner}</filterref>"


# --------------------------------------------------------------------------------------------
# Parameters: precedence and MAC


def test_outer_caller_wins():
    lookup = tree(flt("top", ref("inner", X="1.1.1.1")), flt("inner", rule("<ip srcipaddr='$X'/>")))
    assert values(run(lookup, X="2.2.2.2"), "srcipaddr") == [("2.2.2.2",)]
    assert values(run(lookup), "srcipaddr") == [("1.1.1.1",)]


def test_outer_caller_wins_at_every_level():
    lookup = tree(
        flt("top", ref("mid", X="1.1.1.1", Y="3.3.3.3")),
        flt("mid", ref("leaf", X="9.9.9.9", Z="5.5.5.5")),
        flt("leaf", rule("<ip srcipaddr='$X' dstipaddr='$Y'/>"), rule("<ip srcipaddr='$Z'/>")),
    )
    instances = run(lookup)
    assert values(instances, "srcipaddr", "dstipaddr") == [("1.1.1.1", "3.3.3.3"), ("5.5.5.5", None)]


def test_inner_list_replaced_whole_by_outer_value():
    lookup = tree(flt("top", ref("inner", X=["1.1.1.1", "1.1.1.2"])), flt("inner", rule("<ip srcipaddr='$X'/>")))
    assert values(run(lookup, X="2.2.2.2"), "srcipaddr") == [("2.2.2.2",)]


def test_mac_default_and_override():
    lookup = tree(flt("top", rule("<mac srcmacaddr='$MAC'/>")))
    assert values(run(lookup), "srcmacaddr") == [(MAC,)]
    assert values(run(lookup, MAC="52:54:00:AA:BB:CC"), "srcmacaddr") == [("52:54:00:aa:bb:cc",)]
    assert values(run(lookup, mac="52:54:00:0A:0B:0C"), "srcmacaddr") == [("52:54:00:0a:0b:0c",)]


def test_filter_included_twice_expands_twice():
    lookup = tree(flt("top", ref("x", P="1"), ref("x", P="2")), flt("x", rule("<tcp dstportstart='$P'/>")))
    instances = run(lookup)
    assert values(instances, "dstportstart") == [("1",), ("2",)]
    assert [i.position for i in instances] == [0, 1]


# --------------------------------------------------------------------------------------------
# Lists and iterators (§9.3)


def test_same_iterator_zips():
    lookup = tree(flt("top", rule("<udp srcipaddr='$A' dstportstart='$B'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2"], B=["53", "123"]), "srcipaddr", "dstportstart")
    assert got == [("1.1.1.1", "53"), ("2.2.2.2", "123")]


def test_same_named_iterator_zips():
    lookup = tree(flt("top", rule("<udp srcipaddr='$A[@1]' dstportstart='$C[@1]'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2"], C=["1", "2"]), "srcipaddr", "dstportstart")
    assert got == [("1.1.1.1", "1"), ("2.2.2.2", "2")]


def test_different_iterators_odometer_first_wheel_fastest():
    lookup = tree(flt("top", rule("<udp srcipaddr='$A[@1]' srcportstart='$B[@2]'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2", "3.3.3.3"], B=["10", "20"]), "srcipaddr", "srcportstart")
    assert got == [("1.1.1.1", "10"), ("2.2.2.2", "10"), ("3.3.3.3", "10"),
                   ("1.1.1.1", "20"), ("2.2.2.2", "20"), ("3.3.3.3", "20")]


def test_iterator_zero_is_always_the_first_wheel():
    # $B (iterator 0) comes after $A[@1] in canonical order, yet it is the fastest wheel
    lookup = tree(flt("top", rule("<udp srcipaddr='$A[@1]' dstportstart='$B'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2"], B=["1", "2"]), "srcipaddr", "dstportstart")
    assert got == [("1.1.1.1", "1"), ("1.1.1.1", "2"), ("2.2.2.2", "1"), ("2.2.2.2", "2")]


def test_wheel_order_follows_canonical_attribute_order():
    # iterators 5 (srcipaddr) and 2 (dstportstart): 5 is met first, so it turns faster
    lookup = tree(flt("top", rule("<udp dstportstart='$B[@2]' srcipaddr='$A[@5]'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2"], B=["1", "2"]), "srcipaddr", "dstportstart")
    assert got == [("1.1.1.1", "1"), ("2.2.2.2", "1"), ("1.1.1.1", "2"), ("2.2.2.2", "2")]


def test_constant_index():
    lookup = tree(flt("top", rule("<udp srcipaddr='$A' dstipaddr='$A[1]' dstportstart='$P[0]'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2"], P=["7", "8"]), "srcipaddr", "dstipaddr", "dstportstart")
    assert got == [("1.1.1.1", "2.2.2.2", "7"), ("2.2.2.2", "2.2.2.2", "7")]


def test_same_reference_twice_is_one_reference():
    lookup = tree(flt("top", rule("<udp srcipaddr='$A' dstipaddr='$A'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2"]), "srcipaddr", "dstipaddr")
    assert got == [("1.1.1.1", "1.1.1.1"), ("2.2.2.2", "2.2.2.2")]


def test_duplicate_combinations_dropped():
    # the §9.3 example
    lookup = tree(flt("top", rule("<tcp srcipaddr='$A' srcportstart='$B'/>")))
    got = values(run(lookup, A=["1.1.1.1", "2.2.2.2", "3.3.3.3", "3.3.3.3"], B=["80", "90", "80", "80"]),
                 "srcipaddr", "srcportstart")
    assert got == [("1.1.1.1", "80"), ("2.2.2.2", "90"), ("3.3.3.3", "80")]


def test_duplicates_within_each_iterator_then_product():
    lookup = tree(flt("top", rule("<tcp srcipaddr='$A[@1]' srcportstart='$B[@2]'/>")))
    got = values(run(lookup, A=["1.1.1.1", "1.1.1.1"], B=["1", "2", "1"]), "srcipaddr", "srcportstart")
    assert got == [("1.1.1.1", "1"), ("1.1.1.1", "2")]


def test_cardinality_mismatch():
    lookup = tree(flt("top", rule("<udp srcipaddr='$A' dstportstart='$B'/>")))
    with pytest.raises(ValidationError) as info:
        run(lookup, A=["1.1.1.1", "2.2.2.2"], B=["53"])
    message = str(info.value)
    assert "A" in message and "B" in message and "filter 'top' rule 1" in message


def test_rule_without_variables_is_one_instance():
    lookup = tree(flt("top", rule("<tcp dstportstart='22'/>"), rule()))
    instances = run(lookup, A=["1", "2"])
    assert len(instances) == 2 and instances[1].rule.match is None


# --------------------------------------------------------------------------------------------
# Missing variables and filters (semantics.md §8)


def test_missing_variables_listed_at_once():
    lookup = tree(
        flt("top", rule("<udp srcipaddr='$A' dstportstart='$C[3]'/>"), ref("other"), ref("other")),
        flt("other", rule("<udp srcipaddr='$B[@2]' dstipaddr='$A'/>")),
    )
    with pytest.raises(MissingVariablesError) as info:
        run(lookup, C=["1", "2", "3"])
    message = str(info.value)
    assert "filter 'top'" in message
    assert "A (needed by top, other)" in message
    assert "C[3] (needed by top)" in message
    assert "B[@2] (needed by other)" in message
    assert message.count("B[@2]") == 1
    assert "IP must be given" not in message


def test_index_in_range_is_not_missing():
    lookup = tree(flt("top", rule("<udp dstportstart='$C[2]'/>")))
    assert values(run(lookup, C=["1", "2", "3"]), "dstportstart") == [("3",)]


@pytest.mark.parametrize("params, note", [
    ({}, "IP is to be learned (CTRL_IP_LEARNING 'any')"),
    ({"CTRL_IP_LEARNING": ["DHCP"]}, "IP is to be learned (CTRL_IP_LEARNING 'dhcp')"),
    ({"CTRL_IP_LEARNING": ["None"]}, "IP must be given as a parameter: CTRL_IP_LEARNING is 'none'"),
])
def test_missing_ip_says_how_it_is_learned(params, note):
    lookup = tree(flt("top", ref("clean")), flt("clean", rule("<ip srcipaddr='$IP'/>")))
    with pytest.raises(MissingVariablesError) as info:
        run(lookup, **params)
    assert str(info.value) == f"cannot instantiate filter 'top': missing variables: IP (needed by clean); {note}"
    assert info.value.missing == ("IP",)


def test_missing_ip_with_other_variables_is_not_learned():
    lookup = tree(flt("top", rule("<ip srcipaddr='$IP' dstipaddr='$GW'/>")))
    with pytest.raises(MissingVariablesError) as info:
        run(lookup)
    assert str(info.value).endswith("; IP is learned only when it is the only variable missing")
    assert info.value.missing == ("IP", "GW")


def test_missing_variables_on_builtin_clean_traffic(tmp_path):
    from libvirt_nwfilter.store import FilterStore
    store = FilterStore(tmp_path)
    with pytest.raises(MissingVariablesError, match=r"IP \(needed by no-ip-spoofing, no-arp-ip-spoofing\)"):
        resolve(FilterRef("clean-traffic"), MAC, store.lookup)
    instances = resolve(FilterRef("clean-traffic", make_params({"IP": ("10.0.0.1", "10.0.0.2")})), MAC, store.lookup)
    # semantics.md §3.1: root rules -650, -500, 500, 1000 first, then the sub-chain rules
    assert [(i.filter, i.rule.priority) for i in instances[:4]] == [
        ("clean-traffic", -650), ("clean-traffic", -500), ("qemu-announce-self", 500), ("no-other-l2-traffic", 1000)]
    assert all(not i.in_root for i in instances[4:])
    spoof = [i.rule.match.value("srcipaddr") for i in instances if i.filter == "no-ip-spoofing" and i.rule_number == 2]
    assert spoof == ["10.0.0.1", "10.0.0.2"]
    assert all(isinstance(a.value, str) for i in instances if i.rule.match for a in i.rule.match.attrs)


def test_unknown_referenced_filter():
    lookup = tree(flt("top", ref("mid")), flt("mid", ref("ghost")))
    with pytest.raises(UnknownFilterError, match=r"referenced filter 'ghost' is missing \(referenced by 'mid'\)"):
        run(lookup)


def test_unknown_top_filter():
    with pytest.raises(UnknownFilterError, match="'nothing'"):
        run(tree(), "nothing")


def test_missing_filter_reported_before_missing_variables():
    lookup = tree(flt("top", rule("<ip srcipaddr='$X'/>"), ref("ghost")))
    with pytest.raises(UnknownFilterError):
        run(lookup)


# --------------------------------------------------------------------------------------------
# Type-checking substituted values


def test_substituted_value_type_checked():
    lookup = tree(flt("top", rule("<ip srcipaddr='$IP'/>"), rule("<ip srcipaddr='$IP'/>")))
    with pytest.raises(ValidationError) as info:
        run(lookup, IP="x")
    message = str(info.value)
    for word in ("$IP", "'x'", "srcipaddr", "filter 'top' rule 1", "<ip>"):
        assert word in message, word


@pytest.mark.parametrize("attr, value", [("srcipaddr", "10.1"), ("dstportstart", "65536"),
                                         ("srcipmask", "255.0.255.0"), ("dscp", "64")])
def test_substituted_values_are_strict(attr, value):
    extra = " srcipaddr='1.1.1.1'" if attr == "srcipmask" else ""
    extra += " protocol='tcp'" if attr == "dstportstart" else ""
    lookup = tree(flt("top", rule(f"<ip {attr}='$V'{extra}/>")))
    with pytest.raises(ValidationError, match=attr):
        run(lookup, V=value)


def test_substituted_values_canonicalised_with_name_maps():
    lookup = tree(flt("top", rule("<mac protocolid='$P' srcmacaddr='$M'/>"), rule("<arp opcode='$O'/>")))
    instances = run(lookup, P="2054", M="52:54:00:0A:0B:0C", O="0x1")
    assert instances[0].rule.match.value("protocolid") == "arp"
    assert instances[0].rule.match.value("srcmacaddr") == "52:54:00:0a:0b:0c"
    assert instances[1].rule.match.value("opcode") == "Request"


def test_negation_survives_substitution():
    lookup = tree(flt("top", rule("<tcp match='no' srcipaddr='$A'/><tcp dstportstart='$P'/>")))
    instance = run(lookup, A="1.1.1.1", P="22")[0]
    assert instance.rule.match.get("srcipaddr").negated
    assert not instance.rule.match.get("dstportstart").negated


@pytest.mark.parametrize("protocol, ok", [("tcp", True), ("6", True), ("udp", True), ("sctp", True),
                                          ("33", True), ("icmp", False), ("1", False), ("esp", False)])
def test_protocol_variable_checked_after_substitution(protocol, ok):
    lookup = tree(flt("top", rule("<ip protocol='$P' dstportstart='80'/>")))
    if ok:
        assert len(run(lookup, P=protocol)) == 1
    else:
        with pytest.raises(ValidationError, match="protocol"):
            run(lookup, P=protocol)


def test_ipv6_icmp_group_protocol_variable_checked_after_substitution():
    lookup = tree(flt("top", rule("<ipv6 protocol='$P' type='1'/>")))
    assert run(lookup, P="58")[0].rule.match.value("protocol") == "icmpv6"
    with pytest.raises(ValidationError, match="icmpv6"):
        run(lookup, P="udp")


def test_variables_in_literal_only_attributes_cannot_occur():
    # 'comment' stays literal even with a $ (it is not a reference)
    lookup = tree(flt("top", rule("<tcp comment='$X'/>")))
    instance = run(lookup)[0]
    assert instance.rule.match.value("comment") == "$X"
    assert not isinstance(instance.rule.match.value("comment"), VarRef)


# --------------------------------------------------------------------------------------------
# Ordering (semantics.md §3 step 1) and chain priorities


def test_stable_sort_root_chain_filters_first():
    lookup = tree(
        flt("top", rule(priority=900), ref("sub"), rule(priority=-5), ref("sub2"), rule(priority=900),
            ref("rootchild")),
        flt("sub", rule(priority=-1000), rule(priority=100), chain="mac"),
        flt("sub2", rule(priority=100), chain="arp", priority=-900),
        flt("rootchild", rule(priority=900), rule(priority=1000), chain="root"),
    )
    order = [(i.filter, i.rule_number, i.rule.priority) for i in run(lookup)]
    assert order == [
        ("top", 2, -5), ("top", 1, 900), ("top", 3, 900), ("rootchild", 1, 900), ("rootchild", 2, 1000),
        ("sub", 1, -1000), ("sub", 2, 100), ("sub2", 1, 100),
    ]


def test_l3_rule_in_root_before_everything_in_subchains():
    lookup = tree(flt("top", ref("ipv4f"), rule("<tcp/>", priority=1000)),
                  flt("ipv4f", rule("<ip/>", priority=-1000), chain="ipv4"))
    assert [i.filter for i in run(lookup)] == ["top", "ipv4f"]


def test_chain_priorities_on_instances():
    lookup = tree(
        flt("top", ref("a"), ref("b"), ref("c"), ref("d"), rule()),
        flt("a", rule(), chain="arp"),
        flt("b", rule(), chain="stp-x"),
        flt("c", rule(), chain="ipv4-ip", priority=-710),
        flt("d", rule(), priority=300),  # no chain: priority ignored
    )
    got = {i.filter: (i.chain, i.chain_priority, i.in_root) for i in run(lookup)}
    assert got == {"top": ("root", 0, True), "a": ("arp", -500, False), "b": ("stp-x", -810, False),
                   "c": ("ipv4-ip", -710, False), "d": ("root", 0, True)}


def test_rule_numbers_and_origin():
    lookup = tree(flt("top", ref("x"), rule(priority=1), ref("x"), rule(priority=2)), flt("x", rule(priority=0)))
    got = [(i.filter, i.rule_number, i.position) for i in run(lookup)]
    assert got == [("x", 1, 0), ("x", 1, 2), ("top", 1, 1), ("top", 2, 3)]
    assert run(lookup)[2].origin == "filter 'top' rule 1"


# --------------------------------------------------------------------------------------------
# CTRL_IP_LEARNING


@pytest.mark.parametrize("value", ["any", "dhcp", "none", "ANY", "Dhcp"])
def test_learning_values(value):
    lookup = tree(flt("top", rule()))
    assert len(run(lookup, CTRL_IP_LEARNING=value)) == 1


@pytest.mark.parametrize("value", ["bogus", "yes", "0"])
def test_learning_invalid(value):
    lookup = tree(flt("top", rule()))
    with pytest.raises(ValidationError, match=f"CTRL_IP_LEARNING value '{value}'"):
        run(lookup, CTRL_IP_LEARNING=value)


def test_learning_checked_even_when_ip_given():
    lookup = tree(flt("top", rule("<ip srcipaddr='$IP'/>")))
    with pytest.raises(ValidationError):
        run(lookup, IP="10.0.0.1", CTRL_IP_LEARNING="sometimes")


def test_tree_walk_reused_only_while_the_filters_are_the_same_objects():
    """The walk of a filter tree is kept between ports; a changed filter (another object under
    the same name) is walked anew, as is a tree whose reference stopped resolving."""
    child_v1 = flt("child", rule("<mac srcmacaddr='$MAC'/>"))
    child_v2 = flt("child", rule("<mac srcmacaddr='$MAC'/>"), rule("<ip srcipaddr='$IP'/>", priority=600))
    top = flt("top", "<filterref filter='child'/>")
    first = tree(top, child_v1)
    assert values(run(first, MAC="52:54:00:00:00:02"), "srcmacaddr") == [("52:54:00:00:00:02",)]
    assert values(run(first, MAC="52:54:00:00:00:03"), "srcmacaddr") == [("52:54:00:00:00:03",)]
    changed = run(tree(top, child_v2), IP="10.0.0.9")
    assert [i.rule.match.protocol for i in changed] == ["mac", "ip"]
    assert values(changed, "srcipaddr") == [(None,), ("10.0.0.9",)]
    with pytest.raises(UnknownFilterError, match="referenced filter 'child' is missing"):
        run(tree(top))


def test_rules_without_variables_are_one_instance_for_every_port():
    lookup = tree(flt("top", rule("<mac protocolid='ipv4'/>"), rule("<mac srcmacaddr='$MAC'/>", priority=600)))
    a, b = run(lookup, mac="52:54:00:00:00:0a"), run(lookup, mac="52:54:00:00:00:0b")
    assert a[0] is b[0]
    assert a[1].rule.match.value("srcmacaddr") == "52:54:00:00:00:0a"
    assert b[1].rule.match.value("srcmacaddr") == "52:54:00:00:00:0b"
