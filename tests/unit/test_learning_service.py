"""IP learning in the service layer, without a kernel: which bindings learn, their
learning-time rules, the full filter with the learned addresses, the learned state in records
(XML, index, journal), the service requirement and the learner's record-only updates."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest

from libvirt_nwfilter.config import Config
from libvirt_nwfilter.errors import MissingVariablesError, NwfilterError, ValidationError
from libvirt_nwfilter.ir import Cond, Field, IpNet, MacMatch, Verdict
from libvirt_nwfilter.journal import Intent, Journal, PortIntent
from libvirt_nwfilter.learning.record import format_time, parse_time
from libvirt_nwfilter.learning.rules import learning_ruleset
from libvirt_nwfilter.model import Binding, FilterRef, Learning, Lease, make_params
from libvirt_nwfilter.service import Service
from libvirt_nwfilter.state import AppliedBinding, RecordError, State
from libvirt_nwfilter.bindingxml import format_binding, parse_binding

UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC = "52:54:00:00:00:01"
SERVER = "10.0.0.254"
EXPIRES = 1_714_564_800  # 2024-05-01T12:00:00Z


def binding(filter: str = "clean-traffic", port: str = "vnet0", learning: Learning | None = None, **params) -> Binding:
    values = {name: tuple(v) if isinstance(v, (list, tuple)) else (v,) for name, v in params.items()}
    return Binding("guest", UUID, port, MAC, FilterRef(filter, make_params(values)), learning=learning)


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(Config.load({}, confdir=str(tmp_path / "conf"), rundir=str(tmp_path / "run"),
                               backend="nftables"))


# ----------------------------------------------------------------------------------------------
# Which bindings learn, and their rules


def test_any_is_the_default_and_gets_the_basic_rules(service):
    learned, ruleset = service.prepared(binding())
    assert learned.learning == Learning("any") and learned.learning.state == "learning"
    assert ruleset == learning_ruleset("any", MAC)
    rules = ruleset.from_vm.root
    assert [(r.conds, r.verdict) for r in rules] == [
        ((Cond(Field.ETHER_SRC, MacMatch(MAC), negated=True),), Verdict.DROP),
        ((Cond(Field.ETHER_TYPE, 0x0800),), Verdict.ACCEPT), ((Cond(Field.ETHER_TYPE, 0x0806),), Verdict.ACCEPT),
        ((), Verdict.DROP)]
    assert ruleset.to_vm.empty and not ruleset.fi


def test_dhcp_gets_dhcp_only_rules_with_the_trusted_servers(service):
    learned, ruleset = service.prepared(binding(CTRL_IP_LEARNING="DHCP", DHCPSERVER=[SERVER, "10.0.0.253"]))
    assert learned.learning == Learning("dhcp")
    replies = [r for r in ruleset.to_vm.root if r.verdict is Verdict.ACCEPT]
    assert [(next(c.value for c in r.conds if c.field is Field.IP_SRC), next(c.value for c in r.conds
                                                                           if c.field is Field.ETHER_DST))
            for r in replies] == [(IpNet(s, 32, 4), MacMatch(d)) for s in (SERVER, "10.0.0.253")
                                  for d in (MAC, "ff:ff:ff:ff:ff:ff")]
    assert ruleset.to_vm.root[-1].conds == () and ruleset.to_vm.root[-1].verdict is Verdict.DROP
    assert [r.verdict for r in ruleset.from_vm.root] == [Verdict.ACCEPT, Verdict.DROP]
    _, anyone = service.prepared(binding(CTRL_IP_LEARNING="dhcp"))
    assert all(c.field is not Field.IP_SRC for r in anyone.to_vm.root for c in r.conds)


def test_none_and_other_missing_variables_keep_the_error(service):
    with pytest.raises(MissingVariablesError, match="CTRL_IP_LEARNING is 'none'"):
        service.prepared(binding(CTRL_IP_LEARNING="none"))
    with pytest.raises(MissingVariablesError, match="only when it is the only variable missing"):
        service.prepared(binding("clean-traffic-gateway"))  # needs GATEWAY_MAC too
    with pytest.raises(ValidationError, match="CTRL_IP_LEARNING value 'sometimes' is invalid"):
        service.prepared(binding(CTRL_IP_LEARNING="sometimes"))
    with pytest.raises(ValidationError, match="DHCPSERVER value 'dhcp.example' is not an IPv4 address"):
        service.prepared(binding(CTRL_IP_LEARNING="dhcp", DHCPSERVER="dhcp.example"))


def test_a_filter_that_needs_no_ip_does_not_learn(service):
    learned, _ = service.prepared(binding("no-mac-spoofing", learning=Learning("any", (Lease("10.0.0.5"),))))
    assert learned.learning is None
    assert service.prepared(binding(IP="10.0.0.5"))[0].learning is None


def test_learned_addresses_give_the_full_filter(service):
    leases = (Lease("10.0.0.5", EXPIRES), Lease("10.0.0.6", None))
    learned, ruleset = service.prepared(binding(CTRL_IP_LEARNING="dhcp", learning=Learning("dhcp", leases)))
    assert learned.learning == Learning("dhcp", leases) and learned.learning.state == "leased"
    assert ruleset == service.ruleset(binding(CTRL_IP_LEARNING="dhcp", IP=["10.0.0.5", "10.0.0.6"]))
    # addresses learned in another mode are not kept
    assert service.prepared(binding(learning=Learning("dhcp", leases)))[0].learning == Learning("any")


def test_a_filter_that_could_never_take_the_learned_address_is_refused_now(service, tmp_path):
    (tmp_path / "conf" / "filters").mkdir(parents=True)
    (tmp_path / "conf" / "filters" / "v6.xml").write_text(
        "<filter name='v6' chain='root'><rule action='accept' direction='out'>"
        "<ipv6 srcipaddr='$IP'/></rule></filter>")
    service.store = type(service.store)(tmp_path / "conf")
    with pytest.raises(ValidationError, match="IP = '192.0.2.1'"):
        service.prepared(binding("v6"))


# ----------------------------------------------------------------------------------------------
# The learned state in records, the index and the journal


def test_learning_round_trips_through_records_and_the_journal(tmp_path):
    learned = replace(binding(CTRL_IP_LEARNING="dhcp"),
                      learning=Learning("dhcp", (Lease("10.0.0.5", EXPIRES), Lease("10.0.0.6"))))
    text = format_binding(learned)
    assert "<nwf:learning xmlns:nwf='http://libvirt-nwfilter.org/xmlns/nwfilter/1.0' mode='dhcp' state='leased'>" \
        in text and "<nwf:address ip='10.0.0.5' expires='2024-05-01T12:00:00Z'/>" in text
    assert parse_binding(text, stored=True) == learned
    state = State(tmp_path)
    state.write([AppliedBinding(learned, "nftables", {"id": 3}, "0" * 16)])
    assert state.get("vnet0").binding == learned
    assert state.learning_ports() == {"vnet0": "dhcp"}
    journal = Journal(tmp_path)
    journal.write(Intent("IP learning on vnet0", {"vnet0": PortIntent(None, learned)}))
    assert journal.read().ports["vnet0"].new == learned


def test_a_users_input_never_brings_learned_addresses(caplog):
    learned = replace(binding(), learning=Learning("any", (Lease("10.0.0.5"),)))
    with caplog.at_level(logging.WARNING):
        parsed = parse_binding(format_binding(learned), "vnet0.xml")
    assert parsed.learning is None
    assert "vnet0.xml: the learned addresses it lists are left out" in caplog.text


@pytest.mark.parametrize("element, problem", [
    ("<nwf:learning xmlns:nwf='{ns}' mode='sometimes'/>", "is not any or dhcp"),
    ("<nwf:learning xmlns:nwf='{ns}' mode='any' state='learned'/>", "contradicts the addresses (learning)"),
    ("<nwf:learning xmlns:nwf='{ns}' mode='dhcp'><nwf:address ip='10.0.0.300'/></nwf:learning>",
     "is not an IPv4 address"),
    ("<nwf:learning xmlns:nwf='{ns}' mode='dhcp'><nwf:address ip='10.0.0.5' expires='tomorrow'/></nwf:learning>",
     "is not a time"),
    ("<nwf:learning xmlns:nwf='{ns}' mode='dhcp'><nwf:address ip='10.0.0.5'/><nwf:address ip='10.0.0.5'/>"
     "</nwf:learning>", "listed twice"),
    ("<nwf:learning xmlns:nwf='{ns}' mode='dhcp'><nwf:lease ip='10.0.0.5'/></nwf:learning>", "unknown element"),
])
def test_a_damaged_learning_element_makes_the_record_unusable(tmp_path, element, problem):
    text = format_binding(binding()).replace("</filterbinding>", element.format(
        ns="http://libvirt-nwfilter.org/xmlns/nwfilter/1.0") + "</filterbinding>")
    (tmp_path / "bindings").mkdir()
    (tmp_path / "bindings" / "vnet0.json").write_text(
        '{"binding": %s, "backend": "nftables", "record": {}, "hash": "0"}' % json.dumps(text))
    with pytest.raises(RecordError, match=re.escape(problem)):
        State(tmp_path).get("vnet0")


def test_times_are_utc():
    assert format_time(EXPIRES) == "2024-05-01T12:00:00Z" and parse_time("2024-05-01T12:00:00Z") == EXPIRES


# ----------------------------------------------------------------------------------------------
# The service requirement and the learner's updates


def test_a_new_learning_binding_needs_the_service(service):
    with pytest.raises(NwfilterError, match=r"^port vnet0: its IP address is to be learned \(CTRL_IP_LEARNING "
                                            r"'any'\), which needs the resident service libvirt-nwfilterd, and it "
                                            r"is not running: start it, or give IP as a parameter$"):
        service.create_binding(binding())
    assert service.state.all() == []


def _record(service: Service, learned: Binding) -> AppliedBinding:
    full, ruleset = service.prepared(learned)
    from libvirt_nwfilter.commit import with_mac_parameter
    from libvirt_nwfilter.rulesets import ruleset_hash

    applied = AppliedBinding(with_mac_parameter(full), "nftables", {"id": 1}, ruleset_hash(ruleset))
    service.state.write([applied])
    return applied


def test_a_renewal_is_only_recorded(service, monkeypatch):
    recorded = _record(service, binding(CTRL_IP_LEARNING="dhcp",
                                        learning=Learning("dhcp", (Lease("10.0.0.5", EXPIRES),))))
    monkeypatch.setattr(type(service), "committer", property(lambda self: pytest.fail("the kernel was touched")))
    renewed = service.update_learned("vnet0", recorded.binding, (Lease("10.0.0.5", EXPIRES + 600),))
    assert renewed.binding.learning.leases == (Lease("10.0.0.5", EXPIRES + 600),)
    assert service.state.get("vnet0") == renewed


def test_what_was_learned_for_a_binding_that_changed_is_dropped(service):
    recorded = _record(service, binding(CTRL_IP_LEARNING="dhcp", learning=Learning("dhcp")))
    other = replace(recorded.binding, mac="52:54:00:00:00:02")
    assert service.update_learned("vnet0", other, (Lease("10.0.0.5", EXPIRES),)) is None
    assert service.update_learned("vnet9", recorded.binding, (Lease("10.0.0.5", EXPIRES),)) is None
    assert service.state.get("vnet0") == recorded


# ----------------------------------------------------------------------------------------------
# IPv6 learning (issue 15): IPV6 missing, alone or with IP

V6 = "2001:db8::5"


def test_ipv6_alone_learns_with_the_full_filter_from_the_start(service):
    learned, ruleset = service.prepared(binding("clean-traffic-dualstack", IP="10.0.0.5"))
    assert learned.learning == Learning("any", (), ("IPV6",)) and learned.learning.state == "learning"
    assert ruleset == service.ruleset(binding("clean-traffic-dualstack", IP="10.0.0.5", IPV6="::1"))
    leases = (Lease(V6),)
    learned, ruleset = service.prepared(binding("clean-traffic-dualstack", IP="10.0.0.5",
                                                learning=Learning("any", leases, ("IPV6",))))
    assert learned.learning == Learning("any", leases, ("IPV6",)) and learned.learning.state == "learned"
    assert ruleset == service.ruleset(binding("clean-traffic-dualstack", IP="10.0.0.5", IPV6=V6))


def test_both_families_hold_the_learning_time_rules_until_ipv4_is_known(service):
    only6 = Learning("dhcp", (Lease(V6),), ("IP", "IPV6"))
    learned, ruleset = service.prepared(binding("clean-traffic-dualstack", CTRL_IP_LEARNING="dhcp", learning=only6))
    assert learned.learning == only6 and learned.learning.state == "learning"
    assert ruleset == learning_ruleset("dhcp", MAC)
    both = Learning("dhcp", (Lease("10.0.0.5", EXPIRES), Lease(V6)), ("IP", "IPV6"))
    learned, ruleset = service.prepared(binding("clean-traffic-dualstack", CTRL_IP_LEARNING="dhcp", learning=both))
    assert learned.learning.state == "leased"
    assert ruleset == service.ruleset(binding("clean-traffic-dualstack", CTRL_IP_LEARNING="dhcp", IP="10.0.0.5",
                                              IPV6=V6))
    # addresses of a variable the binding gives itself are never applied
    given = binding("clean-traffic-dualstack", IP="10.0.0.9", learning=Learning("any", (Lease(V6),), ("IP", "IPV6")))
    assert service.prepared(given)[0].learning == Learning("any", (), ("IPV6",))


def test_ipv6_learning_state_round_trips_and_is_checked(tmp_path):
    learning = Learning("dhcp", (Lease("10.0.0.5", EXPIRES), Lease(V6)), ("IP", "IPV6"))
    recorded = binding("clean-traffic-dualstack", learning=learning)
    text = format_binding(recorded)
    assert "learn='IP IPV6'" in text and f"<nwf:address ip='{V6}'/>" in text
    assert parse_binding(text, stored=True) == recorded
    assert "learn=" not in format_binding(binding(learning=Learning("any", (Lease("10.0.0.5"),))))
    with pytest.raises(NwfilterError, match="is not an IPv4 address"):
        parse_binding(format_binding(binding(learning=Learning("any", (Lease(V6),)))), stored=True)


def test_dhcpserverv6_is_checked(service):
    with pytest.raises(ValidationError, match="DHCPSERVERV6 value '10.0.0.1' is not an IPv6 address"):
        service.prepared(binding("clean-traffic-dualstack", IP="10.0.0.5", DHCPSERVERV6="10.0.0.1"))


def test_the_ipv6_limit_is_configured(tmp_path):
    (tmp_path / "libvirt-nwfilter.conf").write_text("ipv6-learning-limit = 4\n")
    assert Config.load({}, confdir=str(tmp_path)).ipv6_learning_limit == 4
    (tmp_path / "libvirt-nwfilter.conf").write_text("ipv6-learning-limit = 5000\n")
    with pytest.raises(NwfilterError, match="is not a number of addresses \\(1 to 1024\\)"):
        Config.load({}, confdir=str(tmp_path))
