"""Kernel digests, surveys and rebuild plans of both backends, on recorded kernel outputs.

A port's digest must be the same in every kernel holding the same rules for it: the service
compares the live kernel with a reference kernel (a throw-away network namespace) into which
``rebuild_plan`` put the recorded rulesets. The texts below were captured from throw-away network
namespaces (nft 1.0.6, ebtables/iptables 1.8.9 nf_tables, Linux 6.x; dates replaced):

* live nftables kernel: ``nft list ruleset`` after two changes (vp1 at generation 1, then 2, mark
  id 1; vp2), with a foreign table that mentions one of our names in a comment;
* nftables reference kernels built by ``rebuild_plan``: vp1 alone (generation 5, mark id 7), and
  vp2 (generation 3) beside a port the live kernel does not have (vp5, mark id 2);
* live ebiptables kernel: the ``*-save`` survey (vp1, vp2, and libvirt-like chains beside ours);
* ebiptables reference kernels built by ``rebuild_plan``: vp1 alone, vp2 alone.

The records are recomputed here: rendering is deterministic. Damage is simulated by editing the
texts the way the kernel would show it.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from golden.nftables import nft_cases
from libvirt_nwfilter.backends import ebiptables as eb
from libvirt_nwfilter.backends import nftables
from libvirt_nwfilter.backends.base import Backend, PortChange, canonical_digest
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.nftables import NftablesBackend, parse_listing
from libvirt_nwfilter.ir import PortRuleset

_spec = importlib.util.spec_from_file_location(
    "ebiptables_cases", Path(__file__).resolve().parents[1] / "golden" / "ebiptables" / "cases.py")
eb_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eb_cases)

# ---------------------------------------------------------------------------------------------
# Recorded kernel outputs: nftables, live kernel

NFT_LIST_1 = """\
table inet foreign {
	chain forwarding {
		type filter hook forward priority filter + 10; policy accept;
		counter packets 0 bytes 0 accept comment "not ours: I-1/vp1"
	}
}
table bridge libvirt_nwfilter {
	map l2_from_vm {
		type ifname : verdict
		elements = { "vp1" : jump I-1/vp1,
			     "vp2" : jump I-1/vp2 }
	}

	map l2_to_vm {
		type ifname : verdict
		elements = { "vp2" : jump O-1/vp2 }
	}

	map mark_out {
		type ifname : verdict
		elements = { "vp1" : jump MO-1/vp1 }
	}

	chain l2-from-vm {
		type filter hook prerouting priority dstnat; policy accept;
		iifname vmap @l2_from_vm
	}

	chain l2-to-vm {
		type filter hook postrouting priority srcnat; policy accept;
		oifname vmap @l2_to_vm
	}

	chain mark-out {
		type filter hook forward priority filter; policy accept;
		oifname vmap @mark_out
	}

	chain I-1/vp1 {
		meta mark set meta mark & 0x001fffff | 0x00100000
		jump I-1/vp1/mac
	}

	chain I-1/vp1/mac {
		ether saddr 52:54:00:00:00:01 return
		drop
		accept
	}

	chain MO-1/vp1 {
		meta mark set meta mark & 0xfff001ff | 0x00000100
	}

	chain I-1/vp2 {
		ether saddr != 52:54:00:00:00:01 drop
		ether type ip accept
		ether type arp counter packets 0 bytes 0
		ether type ip6 return
		drop
	}

	chain O-1/vp2 {
		ether daddr 52:54:00:00:00:01 accept
		drop
	}
}
table inet libvirt_nwfilter {
	map fi {
		type mark : verdict
		elements = { 0x00100000 : jump FI-1/vp1 }
	}

	map fo {
		type mark : verdict
		elements = { 0x00000100 : jump FO-1/vp1 }
	}

	map hi {
		type mark : verdict
		elements = { 0x00100000 : jump HI-1/vp1 }
	}

	map port_ids {
		type mark : ifname
		elements = { 0x00000001 : "vp1" }
	}

	chain l3-fwd {
		type filter hook forward priority filter; policy accept;
		meta mark & 0xfff00000 vmap @fi
		meta mark & 0x000fff00 vmap @fo
	}

	chain l3-input {
		type filter hook input priority filter; policy accept;
		meta mark & 0xfff00000 vmap @hi
	}

	chain FI-1/vp1 {
		meta nfproto ipv4 tcp sport 22 ct state established ct direction reply return
		meta nfproto ipv4 drop
	}

	chain FO-1/vp1 {
		meta nfproto ipv4 tcp dport 22 ct state established,new ct direction original accept
		meta nfproto ipv4 drop
	}

	chain HI-1/vp1 {
		meta nfproto ipv4 tcp sport 22 ct state established ct direction reply return
		meta nfproto ipv4 drop
	}
}
"""


NFT_LIST_2 = """\
table inet foreign {
	chain forwarding {
		type filter hook forward priority filter + 10; policy accept;
		counter packets 0 bytes 0 accept comment "not ours: I-1/vp1"
	}
}
table bridge libvirt_nwfilter {
	map l2_from_vm {
		type ifname : verdict
		elements = { "vp1" : jump I-2/vp1,
			     "vp2" : jump I-1/vp2 }
	}

	map l2_to_vm {
		type ifname : verdict
		elements = { "vp2" : jump O-1/vp2 }
	}

	map mark_out {
		type ifname : verdict
		elements = { "vp1" : jump MO-2/vp1 }
	}

	chain l2-from-vm {
		type filter hook prerouting priority dstnat; policy accept;
		iifname vmap @l2_from_vm
	}

	chain l2-to-vm {
		type filter hook postrouting priority srcnat; policy accept;
		oifname vmap @l2_to_vm
	}

	chain mark-out {
		type filter hook forward priority filter; policy accept;
		oifname vmap @mark_out
	}

	chain I-1/vp2 {
		ether saddr != 52:54:00:00:00:01 drop
		ether type ip accept
		ether type arp counter packets 0 bytes 0
		ether type ip6 return
		drop
	}

	chain O-1/vp2 {
		ether daddr 52:54:00:00:00:01 accept
		drop
	}

	chain I-2/vp1 {
		meta mark set meta mark & 0x001fffff | 0x00100000
		jump I-2/vp1/mac
	}

	chain I-2/vp1/mac {
		ether saddr 52:54:00:00:00:01 return
		drop
		accept
	}

	chain MO-2/vp1 {
		meta mark set meta mark & 0xfff001ff | 0x00000100
	}
}
table inet libvirt_nwfilter {
	map fi {
		type mark : verdict
		elements = { 0x00100000 : jump FI-2/vp1 }
	}

	map fo {
		type mark : verdict
		elements = { 0x00000100 : jump FO-2/vp1 }
	}

	map hi {
		type mark : verdict
		elements = { 0x00100000 : jump HI-2/vp1 }
	}

	map port_ids {
		type mark : ifname
		elements = { 0x00000001 : "vp1" }
	}

	chain l3-fwd {
		type filter hook forward priority filter; policy accept;
		meta mark & 0xfff00000 vmap @fi
		meta mark & 0x000fff00 vmap @fo
	}

	chain l3-input {
		type filter hook input priority filter; policy accept;
		meta mark & 0xfff00000 vmap @hi
	}

	chain FI-2/vp1 {
		meta nfproto ipv4 tcp sport 22 ct state established ct direction reply return
		meta nfproto ipv4 drop
	}

	chain FO-2/vp1 {
		meta nfproto ipv4 tcp dport 22 ct state established,new ct direction original accept
		meta nfproto ipv4 drop
	}

	chain HI-2/vp1 {
		meta nfproto ipv4 tcp sport 22 ct state established ct direction reply return
		meta nfproto ipv4 drop
	}
}
"""


# ---------------------------------------------------------------------------------------------
# nftables, reference kernels

NFT_REF_VP1 = """\
table bridge libvirt_nwfilter {
	map l2_from_vm {
		type ifname : verdict
		elements = { "vp1" : jump I-5/vp1 }
	}

	map l2_to_vm {
		type ifname : verdict
	}

	map mark_out {
		type ifname : verdict
		elements = { "vp1" : jump MO-5/vp1 }
	}

	chain l2-from-vm {
		type filter hook prerouting priority dstnat; policy accept;
		iifname vmap @l2_from_vm
	}

	chain l2-to-vm {
		type filter hook postrouting priority srcnat; policy accept;
		oifname vmap @l2_to_vm
	}

	chain mark-out {
		type filter hook forward priority filter; policy accept;
		oifname vmap @mark_out
	}

	chain I-5/vp1 {
		meta mark set meta mark & 0x007fffff | 0x00700000
		jump I-5/vp1/mac
	}

	chain I-5/vp1/mac {
		ether saddr 52:54:00:00:00:01 return
		drop
		accept
	}

	chain MO-5/vp1 {
		meta mark set meta mark & 0xfff007ff | 0x00000700
	}
}
table inet libvirt_nwfilter {
	map fi {
		type mark : verdict
		elements = { 0x00700000 : jump FI-5/vp1 }
	}

	map fo {
		type mark : verdict
		elements = { 0x00000700 : jump FO-5/vp1 }
	}

	map hi {
		type mark : verdict
		elements = { 0x00700000 : jump HI-5/vp1 }
	}

	map port_ids {
		type mark : ifname
		elements = { 0x00000007 : "vp1" }
	}

	chain l3-fwd {
		type filter hook forward priority filter; policy accept;
		meta mark & 0xfff00000 vmap @fi
		meta mark & 0x000fff00 vmap @fo
	}

	chain l3-input {
		type filter hook input priority filter; policy accept;
		meta mark & 0xfff00000 vmap @hi
	}

	chain FI-5/vp1 {
		meta nfproto ipv4 tcp sport 22 ct state established ct direction reply return
		meta nfproto ipv4 drop
	}

	chain FO-5/vp1 {
		meta nfproto ipv4 tcp dport 22 ct state established,new ct direction original accept
		meta nfproto ipv4 drop
	}

	chain HI-5/vp1 {
		meta nfproto ipv4 tcp sport 22 ct state established ct direction reply return
		meta nfproto ipv4 drop
	}
}
"""


NFT_REF_VP2 = """\
table bridge libvirt_nwfilter {
	map l2_from_vm {
		type ifname : verdict
		elements = { "vp2" : jump I-3/vp2 }
	}

	map l2_to_vm {
		type ifname : verdict
		elements = { "vp2" : jump O-3/vp2 }
	}

	map mark_out {
		type ifname : verdict
		elements = { "vp5" : jump MO-1/vp5 }
	}

	chain l2-from-vm {
		type filter hook prerouting priority dstnat; policy accept;
		iifname vmap @l2_from_vm
	}

	chain l2-to-vm {
		type filter hook postrouting priority srcnat; policy accept;
		oifname vmap @l2_to_vm
	}

	chain mark-out {
		type filter hook forward priority filter; policy accept;
		oifname vmap @mark_out
	}

	chain I-3/vp2 {
		ether saddr != 52:54:00:00:00:01 drop
		ether type ip accept
		ether type arp counter packets 0 bytes 0
		ether type ip6 return
		drop
	}

	chain O-3/vp2 {
		ether daddr 52:54:00:00:00:01 accept
		drop
	}

	chain MO-1/vp5 {
		meta mark set meta mark & 0xfff002ff | 0x00000200
	}
}
table inet libvirt_nwfilter {
	map fi {
		type mark : verdict
	}

	map fo {
		type mark : verdict
		elements = { 0x00000200 : jump FO-1/vp5 }
	}

	map hi {
		type mark : verdict
	}

	map port_ids {
		type mark : ifname
		elements = { 0x00000002 : "vp5" }
	}

	chain l3-fwd {
		type filter hook forward priority filter; policy accept;
		meta mark & 0xfff00000 vmap @fi
		meta mark & 0x000fff00 vmap @fo
	}

	chain l3-input {
		type filter hook input priority filter; policy accept;
		meta mark & 0xfff00000 vmap @hi
	}

	chain FO-1/vp5 {
		meta nfproto ipv4 tcp dport 80 accept
		meta nfproto ipv4 drop
	}
}
"""


# ---------------------------------------------------------------------------------------------
# ebiptables, live kernel

EBT_SAVE = """\
# Generated by ebtables-save v1.8.9 (nf_tables) on <date>
*nat
:PREROUTING ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:libvirt-I-vp9 ACCEPT
:nwf-O-vp1 ACCEPT
-A PREROUTING -i vp9 -j libvirt-I-vp9
-A POSTROUTING -o vp1 -j nwf-O-vp1
-A libvirt-I-vp9 -j DROP
-A nwf-O-vp1 -d 52:54:00:12:34:56 -j ACCEPT
-A nwf-O-vp1 -d Broadcast -j ACCEPT
-A nwf-O-vp1 -j DROP
# Completed on <date>
"""


IPT_SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on <date>
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NFI-vp2 - [0:0]
:NFO-vp2 - [0:0]
:NHI-vp2 - [0:0]
:libvirt-in - [0:0]
:nwf-host-in - [0:0]
:nwf-in - [0:0]
:nwf-in-post - [0:0]
:nwf-out - [0:0]
-A INPUT -j nwf-host-in
-A FORWARD -j nwf-in
-A FORWARD -j nwf-out
-A FORWARD -j nwf-in-post
-A FORWARD -j libvirt-in
-A NFI-vp2 -p tcp -m tcp --sport 22 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j RETURN
-A NFI-vp2 -p icmp -m icmp --icmp-type 8 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN
-A NFI-vp2 -s 10.1.0.2/32 -p udp -m udp --dport 53 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NFI-vp2 -s 10.1.0.3/32 -p udp -m udp --dport 123 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NFI-vp2 -j DROP
-A NFO-vp2 -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j ACCEPT
-A NFO-vp2 -m conntrack --ctstate NEW -m comment --comment "st new" -j ACCEPT
-A NFO-vp2 -d 10.1.0.2/32 -p udp -m udp --sport 53 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j ACCEPT
-A NFO-vp2 -d 10.1.0.3/32 -p udp -m udp --sport 123 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j ACCEPT
-A NFO-vp2 -j DROP
-A NHI-vp2 -p tcp -m tcp --sport 22 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j RETURN
-A NHI-vp2 -p icmp -m icmp --icmp-type 8 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN
-A NHI-vp2 -s 10.1.0.2/32 -p udp -m udp --dport 53 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NHI-vp2 -s 10.1.0.3/32 -p udp -m udp --dport 123 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NHI-vp2 -j DROP
-A libvirt-in -m physdev --physdev-in vp9 -j DROP
-A nwf-host-in -m physdev --physdev-in vp2 -g NHI-vp2
-A nwf-in -m physdev --physdev-in vp2 -g NFI-vp2
-A nwf-in-post -m physdev --physdev-in vp2 -j ACCEPT
-A nwf-out -m physdev --physdev-out vp2 --physdev-is-bridged -g NFO-vp2
COMMIT
# Completed on <date>
"""


IP6T_SAVE = """\
# Generated by ip6tables-save v1.8.9 (nf_tables) on <date>
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NFI-vp2 - [0:0]
:NFO-vp2 - [0:0]
:NHI-vp2 - [0:0]
:nwf-host-in - [0:0]
:nwf-in - [0:0]
:nwf-in-post - [0:0]
:nwf-out - [0:0]
-A INPUT -j nwf-host-in
-A FORWARD -j nwf-in
-A FORWARD -j nwf-out
-A FORWARD -j nwf-in-post
-A NFI-vp2 -p tcp -m tcp ! --dport 80 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NFO-vp2 -p tcp -m tcp ! --sport 80 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j ACCEPT
-A NHI-vp2 -p tcp -m tcp ! --dport 80 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A nwf-host-in -m physdev --physdev-in vp2 -g NHI-vp2
-A nwf-in -m physdev --physdev-in vp2 -g NFI-vp2
-A nwf-in-post -m physdev --physdev-in vp2 -j ACCEPT
-A nwf-out -m physdev --physdev-out vp2 --physdev-is-bridged -g NFO-vp2
COMMIT
# Completed on <date>
"""


# ---------------------------------------------------------------------------------------------
# ebiptables, reference kernels

EBT_EMPTY = """\
# Generated by ebtables-save v1.8.9 (nf_tables) on <date>
*nat
:PREROUTING ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
# Completed on <date>
"""


IPT_EMPTY = """\
# Generated by iptables-save v1.8.9 (nf_tables) on <date>
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
# Completed on <date>
"""


IP6T_EMPTY = """\
# Generated by ip6tables-save v1.8.9 (nf_tables) on <date>
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
# Completed on <date>
"""


EBT_REF_VP1 = """\
# Generated by ebtables-save v1.8.9 (nf_tables) on <date>
*nat
:PREROUTING ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:nwf-O-vp1 ACCEPT
-A POSTROUTING -o vp1 -j nwf-O-vp1
-A nwf-O-vp1 -d 52:54:00:12:34:56 -j ACCEPT
-A nwf-O-vp1 -d Broadcast -j ACCEPT
-A nwf-O-vp1 -j DROP
# Completed on <date>
"""


IPT_REF_VP2 = """\
# Generated by iptables-save v1.8.9 (nf_tables) on <date>
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NFI-vp2 - [0:0]
:NFO-vp2 - [0:0]
:NHI-vp2 - [0:0]
:nwf-host-in - [0:0]
:nwf-in - [0:0]
:nwf-in-post - [0:0]
:nwf-out - [0:0]
-A INPUT -j nwf-host-in
-A FORWARD -j nwf-in
-A FORWARD -j nwf-out
-A FORWARD -j nwf-in-post
-A NFI-vp2 -p tcp -m tcp --sport 22 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j RETURN
-A NFI-vp2 -p icmp -m icmp --icmp-type 8 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN
-A NFI-vp2 -s 10.1.0.2/32 -p udp -m udp --dport 53 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NFI-vp2 -s 10.1.0.3/32 -p udp -m udp --dport 123 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NFI-vp2 -j DROP
-A NFO-vp2 -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j ACCEPT
-A NFO-vp2 -m conntrack --ctstate NEW -m comment --comment "st new" -j ACCEPT
-A NFO-vp2 -d 10.1.0.2/32 -p udp -m udp --sport 53 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j ACCEPT
-A NFO-vp2 -d 10.1.0.3/32 -p udp -m udp --sport 123 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j ACCEPT
-A NFO-vp2 -j DROP
-A NHI-vp2 -p tcp -m tcp --sport 22 -m conntrack --ctstate ESTABLISHED -m conntrack --ctdir REPLY -j RETURN
-A NHI-vp2 -p icmp -m icmp --icmp-type 8 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN
-A NHI-vp2 -s 10.1.0.2/32 -p udp -m udp --dport 53 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NHI-vp2 -s 10.1.0.3/32 -p udp -m udp --dport 123 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j RETURN
-A NHI-vp2 -j DROP
-A nwf-host-in -m physdev --physdev-in vp2 -g NHI-vp2
-A nwf-in -m physdev --physdev-in vp2 -g NFI-vp2
-A nwf-in-post -m physdev --physdev-in vp2 -j ACCEPT
-A nwf-out -m physdev --physdev-out vp2 --physdev-is-bridged -g NFO-vp2
COMMIT
# Completed on <date>
"""


EB_REF_VP1 = [EBT_REF_VP1, IPT_EMPTY, IP6T_EMPTY]
EB_REF_VP2 = [EBT_EMPTY, IPT_REF_VP2, IP6T_SAVE]  # vp2's IPv6 rules: the same listing as live


# ---------------------------------------------------------------------------------------------
# The API of both backends


@pytest.mark.parametrize("backend", [NftablesBackend(), EbiptablesBackend()], ids=["nftables", "ebiptables"])
def test_both_backends_have_the_protocol_methods(backend):
    for name in ("plan", "rebuild_plan", "survey_steps", "kernel_digests"):
        ours = inspect.signature(getattr(backend, name))
        proto = inspect.signature(getattr(Backend, name))
        assert list(ours.parameters)[:len(proto.parameters) - 1] == list(proto.parameters)[1:], name
    # applying a change computes no digest: the reference kernel gives the expected ones
    assert not hasattr(Backend, "applied_digests") and not hasattr(backend, "applied_digests")
    assert all(step.ignore_errors for step in backend.survey_steps())


def test_canonical_digest():
    assert canonical_digest({"b": 1, "a": [1, "x"]}) == canonical_digest({"a": [1, "x"], "b": 1})
    assert len(canonical_digest(None)) == 64


# ---------------------------------------------------------------------------------------------
# nftables

NFT = NftablesBackend()


def nft_records():
    """The records of the live kernel's two changes (rendering is deterministic)."""
    _, first = NFT.plan([PortChange("vp1", None, nft_cases.ssh_to_a()), PortChange("vp2", None, nft_cases.root_only())],
                        others={})
    _, second = NFT.plan([PortChange("vp1", first["vp1"], nft_cases.ssh_to_a())], others={"vp2": first["vp2"]})
    return first, {**first, **second}


def nft_reference_records():
    """The records of the two reference kernels, as ``rebuild_plan`` gave them there."""
    _, ref1 = NFT.rebuild_plan([PortChange("vp1", {"backend": "nftables", "mode": "inet", "gen": 4},
                                           nft_cases.ssh_to_a())], [], ids_in_use=range(1, 7))
    _, ref2 = NFT.rebuild_plan([PortChange("vp2", {"backend": "nftables", "mode": "inet", "gen": 2},
                                           nft_cases.root_only()),
                                PortChange("vp5", None, nft_cases.only_fo())], [], ids_in_use=[1])
    return ref1, ref2


def test_nft_plans_run_plain_nft_f_and_the_survey_lists_the_ruleset():
    # no -e: an echo would make nft load its whole cache (every port's rules) on every change
    plan, _ = NFT.plan([PortChange("vp1", None, nft_cases.ssh_to_a())])
    assert plan.apply[0].argv == (nftables.DEFAULT_NFT, "-f", "-")
    rebuild, _ = NFT.rebuild_plan([PortChange("vp1", None, nft_cases.ssh_to_a())], [])
    assert rebuild.apply[0].argv == (nftables.DEFAULT_NFT, "-f", "-")
    assert NFT.survey_steps() == (nftables.Step((nftables.DEFAULT_NFT, "list", "ruleset"), ignore_errors=True),)
    with pytest.raises(TypeError):
        NftablesBackend(echo=False)


def test_nft_listing_parse():
    view = parse_listing(NFT_LIST_1)
    assert set(view) == {"bridge", "inet"}  # the foreign table is skipped
    assert view["bridge"].maps["l2_from_vm"] == [('"vp1"', "jump I-1/vp1"), ('"vp2"', "jump I-1/vp2")]
    assert view["bridge"].chains["l2-from-vm"].spec == ("type filter hook prerouting priority dstnat", "policy accept")
    assert view["bridge"].chains["l2-from-vm"].rules == ["iifname vmap @l2_from_vm"]
    assert view["bridge"].chains["I-1/vp2"].rules[2] == "ether type arp counter"
    assert view["inet"].maps["port_ids"] == [("0x00000001", '"vp1"')]
    second = parse_listing(NFT_LIST_2)
    assert "I-2/vp1" in second["bridge"].chains and "I-1/vp1" not in second["bridge"].chains


def test_nft_same_port_same_digest_in_a_reference_kernel():
    first, both = nft_records()
    live = NFT.kernel_digests([NFT_LIST_1], first)
    assert set(live) == {"vp1", "vp2"} and None not in live.values() and live["vp1"] != live["vp2"]
    ref1, ref2 = nft_reference_records()
    # another generation, another mark id, the other ports absent or different
    assert (ref1["vp1"]["gen"], ref1["vp1"]["id"]) == (5, 7) and (first["vp1"]["gen"], first["vp1"]["id"]) == (1, 1)
    assert ref2["vp2"]["gen"] == 3 and ref2["vp5"]["id"] == 2
    assert NFT.kernel_digests([NFT_REF_VP1], ref1) == {"vp1": live["vp1"]}
    assert NFT.kernel_digests([NFT_REF_VP2], ref2)["vp2"] == live["vp2"]
    # generation 2 of vp1 in the live kernel: the same digests
    assert both["vp1"]["gen"] == 2
    assert NFT.kernel_digests([NFT_LIST_2], both) == live
    # the outputs list may hold several strings
    assert NFT.kernel_digests([NFT_LIST_2[:100], NFT_LIST_2[100:]], both) == live
    # the id the kernel has must be the record's: vp1 of the live kernel with the reference's record
    assert NFT.kernel_digests([NFT_LIST_1], ref1)["vp1"] not in (None, live["vp1"])


def test_nft_normalisation():
    first, _ = nft_records()
    intact = NFT.kernel_digests([NFT_LIST_1], first)
    counted = NFT_LIST_1.replace("counter packets 0 bytes 0", "counter packets 12 bytes 3456")
    with_handles = re.sub(r"^(\t\t(?!type |elements )\S.*)$", r"\1 # handle 77", NFT_LIST_1, flags=re.M)
    one_line = NFT_LIST_1.replace(',\n\t\t\t     "vp2"', ', "vp2"')
    assert one_line != NFT_LIST_1
    no_foreign = re.sub(r"table inet foreign \{.*?\n\}\n", "", NFT_LIST_1, flags=re.S)
    other_family = NFT_LIST_1 + "table ip libvirt_nwfilter {\n\tchain I-1/vp1 {\n\t\tdrop\n\t}\n}\n"
    # the mark statement as rendered (nft lists "& KEEP | V" as "& (KEEP | V) | V"): the same
    raw_mark = NFT_LIST_1.replace("& 0x001fffff | 0x00100000", "& 0x000fffff | 0x00100000")
    assert raw_mark != NFT_LIST_1
    for text in (counted, with_handles, one_line, no_foreign, other_family, raw_mark):
        assert NFT.kernel_digests([text], first) == intact
    # generation numbers do not matter, the port's chain names are roles
    regen = re.sub(r"\b(I|O|FI|FO|HI|MO)-1/", r"\1-41/", NFT_LIST_1)
    assert NFT.kernel_digests([regen], first) == intact


# vp1's mark id 1 in every form the listing shows it, and the same forms for id 2
_ID1_FORMS = ("& 0x001fffff | 0x00100000", "& 0xfff001ff | 0x00000100", "0x00100000 : jump FI-1/vp1",
              "0x00100000 : jump HI-1/vp1", "0x00000100 : jump FO-1/vp1", '0x00000001 : "vp1"')
_ID2_FORMS = ("& 0x002fffff | 0x00200000", "& 0xfff002ff | 0x00000200", "0x00200000 : jump FI-1/vp1",
              "0x00200000 : jump HI-1/vp1", "0x00000200 : jump FO-1/vp1", '0x00000002 : "vp1"')


def _renumber(text: str, which: range | tuple = range(len(_ID1_FORMS))) -> str:
    for i in which:
        assert text.count(_ID1_FORMS[i]) == 1, _ID1_FORMS[i]
        text = text.replace(_ID1_FORMS[i], _ID2_FORMS[i])
    return text


def test_nft_mark_id_is_a_role_but_must_be_consistent():
    first, _ = nft_records()
    intact = NFT.kernel_digests([NFT_LIST_1], first)
    renumbered = _renumber(NFT_LIST_1)
    # the kernel gave vp1 id 2 everywhere: equal for a record saying 2, drift for one saying 1
    _, as_two = NFT.plan([PortChange("vp1", None, nft_cases.ssh_to_a())], ids_in_use=[1])
    assert as_two["vp1"]["id"] == 2
    assert NFT.kernel_digests([renumbered], as_two)["vp1"] == intact["vp1"]
    assert NFT.kernel_digests([renumbered], first)["vp1"] != intact["vp1"]
    # any single form with another id is drift, also with the record that names it
    for i in range(len(_ID1_FORMS)):
        one = _renumber(NFT_LIST_1, (i,))
        assert NFT.kernel_digests([one], first)["vp1"] != intact["vp1"], _ID1_FORMS[i]
        assert NFT.kernel_digests([one], as_two)["vp1"] != intact["vp1"], _ID1_FORMS[i]
        assert NFT.kernel_digests([one], first)["vp2"] == intact["vp2"]


def _drop_line(text: str, line: str, count: int = 1) -> str:
    assert text.count(line + "\n") >= count, line
    return text.replace(line + "\n", "", count)


NFT_DAMAGE = {
    "rule deleted": (lambda t: _drop_line(t, "\t\tether type ip6 return"), {"vp2"}, set()),
    "sub-chain rule deleted": (lambda t: t.replace("\t\tether saddr 52:54:00:00:00:01 return\n\t\tdrop\n",
                                                   "\t\tether saddr 52:54:00:00:00:01 return\n"), {"vp1"}, set()),
    "rule added": (lambda t: t.replace("\tchain FO-1/vp1 {\n", "\tchain FO-1/vp1 {\n\t\taccept\n"), {"vp1"}, set()),
    "rule changed": (lambda t: t.replace("ether daddr 52:54:00:00:00:01 accept", "ether daddr 52:54:00:00:00:02 accept"),
                     {"vp2"}, set()),
    "to-VM element deleted": (lambda t: t.replace('elements = { "vp2" : jump O-1/vp2 }', ""), {"vp2"}, set()),
    "mark id element deleted": (lambda t: t.replace('elements = { 0x00000001 : "vp1" }', ""), {"vp1"}, set()),
    "mark id element of another id": (lambda t: _renumber(t, (5,)), {"vp1"}, set()),
    "ingress mark of another id": (lambda t: _renumber(t, (0,)), {"vp1"}, set()),
    "egress mark of another id": (lambda t: _renumber(t, (1,)), {"vp1"}, set()),
    "L3 key of another id": (lambda t: _renumber(t, (4,)), {"vp1"}, set()),
    "every id form renumbered": (_renumber, {"vp1"}, set()),  # the record says id 1
    "L3 element points elsewhere": (lambda t: t.replace("0x00000100 : jump FO-1/vp1", "0x00000100 : jump FI-1/vp1"),
                                    {"vp1"}, set()),
    "base chain rule deleted": (lambda t: _drop_line(t, "\t\toifname vmap @l2_to_vm"), {"vp2"}, set()),
    "base chain policy changed": (lambda t: t.replace("hook input priority filter; policy accept;",
                                                      "hook input priority filter; policy drop;"), {"vp1"}, set()),
    "leftover chain of an old generation": (
        lambda t: t.replace("\tchain O-1/vp2 {", "\tchain O-3/vp2 {\n\t}\n\tchain O-1/vp2 {"), {"vp2"}, set()),
    "everything gone": (lambda t: re.sub(r"table (bridge|inet) libvirt_nwfilter \{.*?\n\}\n", "", t, flags=re.S),
                        {"vp1", "vp2"}, {"vp1", "vp2"}),
    "bridge table gone": (lambda t: re.sub(r"table bridge libvirt_nwfilter \{.*?\n\}\n", "", t, flags=re.S),
                          {"vp1", "vp2"}, {"vp2"}),  # vp1 still has its L3 chains
    "survey failed": (lambda t: "", {"vp1", "vp2"}, {"vp1", "vp2"}),
}


@pytest.mark.parametrize("damage", list(NFT_DAMAGE))
def test_nft_damage(damage):
    """Each damage of the live kernel makes exactly the expected ports differ from the
    reference kernels."""
    edit, expect_changed, expect_none = NFT_DAMAGE[damage]
    first, _ = nft_records()
    ref1, ref2 = nft_reference_records()
    reference = {**NFT.kernel_digests([NFT_REF_VP1], ref1), "vp2": NFT.kernel_digests([NFT_REF_VP2], ref2)["vp2"]}
    assert NFT.kernel_digests([NFT_LIST_1], first) == reference
    damaged_text = edit(NFT_LIST_1)
    assert damaged_text != NFT_LIST_1
    after = NFT.kernel_digests([damaged_text], first)
    assert {p for p in reference if after[p] != reference[p]} == expect_changed
    assert {p for p, d in after.items() if d is None} == expect_none


def test_nft_empty_rulesets_and_none_records():
    first, _ = nft_records()
    records = {**first, "vp7": NFT.plan([PortChange("vp7", None, PortRuleset())])[1]["vp7"], "vp8": None}
    kernel = NFT.kernel_digests([NFT_LIST_1], records)
    assert "vp8" not in kernel and kernel["vp7"] == nftables.port_digest(None)
    # an empty ruleset digests alike in every kernel, also one without our tables
    assert NFT.kernel_digests([""], {"vp7": records["vp7"]}) == {"vp7": kernel["vp7"]}
    # a port whose record expects rules and of which nothing is found: None
    vp3 = NFT.plan([PortChange("vp3", None, nft_cases.ssh_to_a())], ids_in_use=[1])[1]["vp3"]
    assert NFT.kernel_digests([NFT_LIST_1], {"vp3": vp3}) == {"vp3": None}
    # a record naming vp1's map keys makes vp1's elements part of vp3's digest (a clash is drift)
    assert NFT.kernel_digests([NFT_LIST_1], {"vp3": first["vp1"]})["vp3"] is not None
    # a malformed id in a record is no id (nothing becomes a role token), never an exception
    for bad in ("x", True, 0, 99999, None):
        assert NFT.kernel_digests([NFT_LIST_1], {"vp1": {**first["vp1"], "id": bad}})["vp1"] != kernel["vp1"]


def test_nft_rebuild_plan():
    first, both = nft_records()
    foreign = {"backend": "ebiptables", "ebtables": {"chains": ["nwf-I-vp3"], "rules": []}}
    changes = [PortChange("vp1", both["vp1"], nft_cases.ssh_to_a()),
               PortChange("vp2", {**both["vp2"]}, nft_cases.ssh_to_a()),
               PortChange("vp3", foreign, nft_cases.only_fo()),
               PortChange("vp4", {**both["vp1"], "id": 1}, nft_cases.only_fo())]  # a corrupt state: id 1 twice
    plan, records = NFT.rebuild_plan(changes, [NFT_LIST_2], ids_in_use=[2])
    text = plan.apply[0].stdin
    assert text.index("delete table inet libvirt_nwfilter") < text.index("add table bridge libvirt_nwfilter\nadd map")
    assert "delete element" not in text and "delete chain" not in text and "nwf-I-vp3" not in text
    assert records["vp1"]["id"] == 1 and records["vp1"]["gen"] == 3
    assert records["vp2"]["id"] == 3  # the lowest id free of ids_in_use and of the kept ones
    assert records["vp3"]["gen"] == 1 and records["vp3"]["id"] == 4 and records["vp4"]["id"] == 5
    # malformed records never make a rebuild fail: only their generation and id are kept
    broken = {**both["vp1"], "elements": [["bridge", "nope", "x"]], "chains": [["ip", "bad name"]]}
    plan2, records2 = NFT.rebuild_plan([PortChange("vp1", broken, nft_cases.ssh_to_a()),
                                        PortChange("vp2", {"backend": "nftables", "gen": "x"}, nft_cases.root_only())],
                                       [])
    assert records2["vp1"]["gen"] == 3 and records2["vp1"]["id"] == 1 and records2["vp2"]["gen"] == 1
    # the survey is not needed: the same plan without it
    assert NFT.rebuild_plan(changes, [], ids_in_use=[2]) == (plan, records)


# ---------------------------------------------------------------------------------------------
# ebiptables

EB = EbiptablesBackend()
SURVEY = [EBT_SAVE, IPT_SAVE, IP6T_SAVE]


def eb_records():
    _, records = EB.plan([PortChange("vp1", None, eb_cases.to_vm_only()),
                          PortChange("vp2", None, eb_cases.l3_example())])
    return records


def eb_reference() -> dict[str, str | None]:
    """Each port's digest in its reference kernel (alone there, built by ``rebuild_plan``)."""
    out = {}
    for port, build, survey in (("vp1", eb_cases.to_vm_only, EB_REF_VP1), ("vp2", eb_cases.l3_example, EB_REF_VP2)):
        _, records = EB.rebuild_plan([PortChange(port, None, build())], [EBT_EMPTY, IPT_EMPTY, IP6T_EMPTY])
        out.update(EB.kernel_digests(survey, records))
    return out


def test_eb_survey_steps_and_plans_without_survey():
    assert [s.argv for s in EB.survey_steps()] == [eb.SAVE_ARGV[t] for t in eb.TOOLS]
    plan, records = EB.plan([PortChange("vp1", None, eb_cases.mixed())])
    removal, _ = EB.plan([PortChange("vp1", records["vp1"], None)])
    rebuild, _ = EB.rebuild_plan([PortChange("vp1", None, eb_cases.mixed())], SURVEY)
    for each in (plan, removal, rebuild):
        steps = each.apply + each.commit + each.rollback
        assert steps and all(s.argv[0].endswith("-restore") for s in steps)  # no survey in a change
    custom = EbiptablesBackend(save_argv={"iptables": ("/opt/iptables-save", "-t", "filter")})
    assert custom.survey_steps()[1].argv == ("/opt/iptables-save", "-t", "filter")


def test_eb_same_port_same_digest_in_a_reference_kernel():
    records = eb_records()
    live = EB.kernel_digests(SURVEY, records)
    assert set(live) == {"vp1", "vp2"} and None not in live.values() and live["vp1"] != live["vp2"]
    # each port alone in a kernel of its own, without libvirt's chains: the same digest
    assert eb_reference() == live
    # an empty ruleset digests alike everywhere
    _, empty = EB.plan([PortChange("vp7", None, PortRuleset())])
    assert EB.kernel_digests(SURVEY, empty) == EB.kernel_digests(["", "", ""], empty) == {"vp7": eb.port_digest(None)}
    # libvirt's own chains for vp9 are not ours
    assert EB.kernel_digests(SURVEY, {"vp9": records["vp2"]}) == {"vp9": None}
    structure = eb.port_structure({t: eb._parse_save_full(x, eb._table(t)) for t, x in zip(eb.TOOLS, SURVEY)}, "vp2")
    assert ["iptables", "-A nwf-in -m physdev --physdev-in vp2 -g <FI>"] in structure["dispatch"]
    assert structure["hooks"]["iptables"] == ["-A INPUT -j nwf-host-in", "-A FORWARD -j nwf-in",
                                              "-A FORWARD -j nwf-out", "-A FORWARD -j nwf-in-post"]
    assert "ebtables" not in structure["hooks"]


def test_eb_normalisation():
    records = eb_records()
    intact = EB.kernel_digests(SURVEY, records)
    counted = [re.sub(r"^(-A .*)$", r"[3:180] \1", IPT_SAVE, flags=re.M).replace("[0:0]", "[7:99]"),
               IP6T_SAVE]
    ebt_counted = re.sub(r"^(-A .*)$", r"\1 -c 3 180", EBT_SAVE, flags=re.M)
    assert EB.kernel_digests([ebt_counted] + counted, records) == intact
    assert EB.kernel_digests({"ebtables": EBT_SAVE, "iptables": IPT_SAVE, "ip6tables": IP6T_SAVE}, records) == intact


EB_DAMAGE = {
    "L2 rule deleted": (0, lambda t: _drop_line(t, "-A nwf-O-vp1 -d Broadcast -j ACCEPT"), {"vp1"}, set()),
    "L2 dispatch deleted": (0, lambda t: _drop_line(t, "-A POSTROUTING -o vp1 -j nwf-O-vp1"), {"vp1"}, set()),
    "temporary chain left": (0, lambda t: t.replace(":nwf-O-vp1 ACCEPT\n", ":nwf-O-vp1 ACCEPT\n:nwf-P-vp1 ACCEPT\n"),
                             {"vp1"}, set()),
    "policy changed": (0, lambda t: t.replace(":nwf-O-vp1 ACCEPT", ":nwf-O-vp1 DROP"), {"vp1"}, set()),
    "L3 rule deleted": (1, lambda t: _drop_line(t, "-A NFI-vp2 -j DROP"), {"vp2"}, set()),
    "L3 rule added": (2, lambda t: t.replace("-A nwf-host-in", "-A NHI-vp2 -j ACCEPT\n-A nwf-host-in", 1),
                      {"vp2"}, set()),
    "in-post deleted": (1, lambda t: _drop_line(t, "-A nwf-in-post -m physdev --physdev-in vp2 -j ACCEPT"),
                        {"vp2"}, set()),
    "global hook deleted": (2, lambda t: _drop_line(t, "-A FORWARD -j nwf-out"), {"vp2"}, set()),
    "L2 chains flushed": (0, lambda t: re.sub(r"^-A (?!PREROUTING|POSTROUTING).*\n", "", t, flags=re.M), {"vp1"}, set()),
    "ebtables lost": (0, lambda t: "", {"vp1"}, {"vp1"}),
    "everything lost": (None, lambda t: "", {"vp1", "vp2"}, {"vp1", "vp2"}),
}


@pytest.mark.parametrize("damage", list(EB_DAMAGE))
def test_eb_damage(damage):
    """Each damage of the live kernel makes exactly the expected ports differ from the
    reference kernels."""
    which, edit, expect_changed, expect_none = EB_DAMAGE[damage]
    records = eb_records()
    reference = eb_reference()
    assert EB.kernel_digests(SURVEY, records) == reference
    damaged = [edit(t) if which in (None, i) else t for i, t in enumerate(SURVEY)]
    assert damaged != SURVEY
    after = EB.kernel_digests(damaged, records)
    assert {p for p in reference if after[p] != reference[p]} == expect_changed
    assert {p for p, d in after.items() if d is None} == expect_none


def _steps(plan, phase, tool):
    return [s for s in getattr(plan, phase) if s.argv[0] == f"{tool}-restore"]


def test_eb_rebuild_plan_from_the_survey():
    records = eb_records()
    stale = {**records["vp2"], "iptables": {"chains": ["NFI-gone"], "rules": ["-A nwf-in -j NFI-gone"]}}
    # vp1 has no binding any more; vp2's record is stale; vp5 is new
    plan, new = EB.rebuild_plan([PortChange("vp2", stale, eb_cases.l3_example()),
                                 PortChange("vp5", None, eb_cases.to_vm_only())], SURVEY)
    assert set(new) == {"vp1", "vp2", "vp5"} and new["vp1"] is None
    assert "gone" not in "".join(s.stdin for s in plan.apply + plan.commit + plan.rollback)
    # no ensure step: apply repairs the global chains' hooks in the same transaction
    assert not any(s.ignore_errors for s in plan.apply)
    (ipt_apply,) = _steps(plan, "apply", "iptables")
    lines = ipt_apply.stdin.splitlines()
    assert lines[1:9] == ["-D INPUT -j nwf-host-in", "-D FORWARD -j nwf-in", "-D FORWARD -j nwf-out",
                          "-D FORWARD -j nwf-in-post", "-I FORWARD 1 -j nwf-in", "-I FORWARD 2 -j nwf-out",
                          "-I FORWARD 3 -j nwf-in-post", "-I INPUT 1 -j nwf-host-in"]
    assert "-A nwf-in-post" not in ipt_apply.stdin  # vp2's in-post rule is there already
    # commit: vp2's old chains (seen in the survey) go, the temporary ones are renamed; vp1 goes
    (ipt_commit,) = _steps(plan, "commit", "iptables")
    assert "-D nwf-in -m physdev --physdev-in vp2 -g NFI-vp2\n" in ipt_commit.stdin
    assert "-E NFJ-vp2 NFI-vp2\n" in ipt_commit.stdin
    (ebt_commit,) = _steps(plan, "commit", "ebtables")
    assert "-D POSTROUTING -o vp1 -j nwf-O-vp1\n" in ebt_commit.stdin and "-X nwf-O-vp1\n" in ebt_commit.stdin
    assert "-E nwf-P-vp5 nwf-O-vp5\n" in ebt_commit.stdin
    assert "libvirt" not in "".join(s.stdin for s in plan.apply + plan.commit)
    assert not any(s.argv in eb.SAVE_ARGV.values() for s in plan.apply + plan.commit + plan.rollback)


def test_eb_rebuild_plan_after_globals_and_chains_were_deleted():
    bare = [EBT_SAVE.split(":libvirt-I-vp9")[0], "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", ""]
    plan, _ = EB.rebuild_plan([PortChange("vp2", eb_records()["vp2"], eb_cases.l3_example())], bare)
    for tool in ("iptables", "ip6tables"):
        (apply,) = _steps(plan, "apply", tool)
        lines = apply.stdin.splitlines()
        assert lines[1:5] == [f"-N {c}" for c in eb.GLOBAL_CHAINS] and lines[5] == "-I FORWARD 1 -j nwf-in"
        assert "-A nwf-in-post -m physdev --physdev-in vp2 -j ACCEPT" in lines
        (commit,) = _steps(plan, "commit", tool)
        assert "-D " not in commit.stdin  # nothing old to unlink


def test_eb_rebuild_removes_leftover_temporaries_first():
    survey = [EBT_SAVE.replace(":nwf-O-vp1 ACCEPT\n", ":nwf-O-vp1 ACCEPT\n:nwf-P-vp1 ACCEPT\n")
              .replace("-A POSTROUTING -o vp1 -j nwf-O-vp1\n",
                       "-A POSTROUTING -o vp1 -j nwf-O-vp1\n-A POSTROUTING -o vp1 -j nwf-P-vp1\n"),
              IPT_SAVE, IP6T_SAVE]
    plan, _ = EB.rebuild_plan([PortChange("vp1", None, eb_cases.to_vm_only())], survey)
    (apply,) = _steps(plan, "apply", "ebtables")
    lines = apply.stdin.splitlines()
    assert lines[1:4] == ["-D POSTROUTING -o vp1 -j nwf-P-vp1", ":nwf-P-vp1 ACCEPT", "-X nwf-P-vp1"]
    # vp2 has no binding: removed at commit, and its globals are left alone (teardown removes them)
    (ipt_commit,) = _steps(plan, "commit", "iptables")
    assert "-X NFI-vp2\n" in ipt_commit.stdin and "-X nwf-in\n" not in ipt_commit.stdin


def test_eb_rebuild_leaves_chains_we_cannot_have_made():
    survey = [EBT_SAVE.replace(":nwf-O-vp1 ACCEPT\n", ":nwf-O-vp1 ACCEPT\n:nwf-I-x+y ACCEPT\n"), IPT_SAVE, IP6T_SAVE]
    plan, records = EB.rebuild_plan([PortChange("vp1", None, eb_cases.to_vm_only()),
                                     PortChange("vp2", None, eb_cases.l3_example())], survey)
    assert set(records) == {"vp1", "vp2"}
    assert "x+y" not in "".join(s.stdin for s in plan.apply + plan.commit)
