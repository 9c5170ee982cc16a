"""The ``simulate`` verb: which port, which packets, and how to report.

Registered into ``libvirt-nwfilter`` by :func:`register`. The engine is imported when the verb
runs, so other verbs do not pay for it at start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import NwfilterError
from ..model import Binding

if TYPE_CHECKING:
    from ..service import Service
    from .packet import Addresses

EXIT_OK, EXIT_USAGE = 0, 2
FLAGS = ("--json", "--kernel")

SUMMARY = "Would these packets pass a port's rules? (offline, or --kernel)"
DESCRIPTION = """\
TARGET is the port of a binding ('vnet3', as binding-list shows), a <filterbinding> file
(as binding-create takes; '-' reads standard input), or, with --domain and --mac, a guest's
interface as its libvirt-nwfilter metadata describes it (the guest need not run).

Each PACKET is "DIRECTION PROTOCOL [name=value ...] [--to-host | --from-host]", written
like a rule's match. DIRECTION is out (sent by the guest) or in (delivered to the guest).
PROTOCOL is a protocol element's name: mac, vlan, stp, arp, rarp, ip, ipv6, tcp, udp, udplite,
esp, ah, sctp, icmp, igmp, tcp-ipv6, udp-ipv6, udplite-ipv6, esp-ipv6, ah-ipv6, sctp-ipv6,
icmpv6. The fields use nwfilter's attribute names for the header fields the packet has:
srcmacaddr, dstmacaddr, protocolid, vlanid, encap-protocol, hwtype, protocoltype, opcode,
arpsrcmacaddr, arpdstmacaddr, arpsrcipaddr, arpdstipaddr, gratuitous=true, srcipaddr,
dstipaddr, protocol, dscp, srcportstart, dstportstart, type, code, flags=SYN,ACK (the flags
set), option=2,3 (the TCP options present), the stp element's fields, and for icmpv6
neighbour solicitations and advertisements (type=135, 136) our nwf:nd-target=ADDRESS and
nwf:nd-lladdr=MAC (one link-layer address option) or none (no option); state=NEW,
ESTABLISHED, RELATED, INVALID or UNTRACKED and ctdir=original or reply (default reply for
ESTABLISHED and RELATED) say what the connection tracker thinks of it. --to-host makes an out
packet one for the host itself (HI rules instead of FI); --from-host makes an in packet one the
host sends (no L3 rule applies, as with libvirt).

Fields left out get defaults: the guest's MAC and first IP/IPV6 parameter (else 192.0.2.2 and
2001:db8::2), a remote peer 52:54:00:ff:ff:01 192.0.2.1 2001:db8::1, the host
52:54:00:ff:ff:fe 192.0.2.254 2001:db8::fe, broadcast or multicast MACs for such addresses,
port 40000 to 80 (UDP 53), TCP SYN (ACK with state=ESTABLISHED), ICMP echo requests, ARP
requests, RARP as QEMU's announce-self. An ip/ipv6 packet without protocol= carries protocol
253 and no transport header.

Several packets form one conversation: a new packet starts at every 'in'/'out' word (quote a
packet per argument or not), and the connection state of each follows from the packets before
it (an answered connection is ESTABLISHED) unless state= is given. --file reads packets from a
file, one per line ('#' starts a comment).

For each packet, each stage it crosses (L2 from the guest, L3 forwarded or to the host, L3
forwarded to the guest, L2 to the guest) is shown with its verdict and the rule that decided it
(filter, rule number, chain, priority, action, the rule as XML), the rules passed over and why,
and the packet's verdict. --json prints one JSON object per packet instead, with at least
"verdict": "pass" or "drop" and "stages".

The offline engine evaluates the compiled rules: no root and no kernel needed. --kernel also
builds the port's rules with the configured backend in a throw-away network namespace (a
bridge and veths, deleted afterwards), sends the real frames and reports what the kernel did,
naming the rules from the kernel's own trace (nft monitor trace); it needs root.

Exit status: 0 when every packet was simulated (whatever the verdicts), 1 for a packet
description or a target that is not valid (one line naming the word), 2 for wrong usage."""


def _split_flags(words: list[str], args: argparse.Namespace) -> list[str]:
    """Options written after the target or the packets (REMAINDER keeps them in ``words``)."""
    rest = []
    for word in words:
        if word in FLAGS:
            setattr(args, word[2:], True)
        elif word.startswith("--") and word not in ("--to-host", "--from-host"):
            raise _UsageError(f"unknown option '{word}'")
        else:
            rest.append(word)
    return rest


class _UsageError(Exception):
    pass


def _binding(service: "Service", args: argparse.Namespace, target: str | None) -> Binding:
    if args.domain:
        return _domain_binding(args)
    if target is None:
        raise _UsageError("a TARGET (port or binding file) or --domain and --mac is needed")
    if target == "-" or "/" in target or target.endswith(".xml") or Path(target).is_file():
        from ..cli import _read_input
        from ..bindingxml import parse_binding

        return parse_binding(_read_input(target), target)
    return service.binding(target).binding


def _domain_binding(args: argparse.Namespace) -> Binding:
    from ..cli_libvirt import _parse_mac
    from ..domain import parse_domain
    from ..libvirt_client import LibvirtClient

    if not args.mac:
        raise _UsageError("--domain needs --mac (the guest's interface)")
    mac = _parse_mac(args.mac)
    with LibvirtClient(args.connect) as client:
        dom = client.domain(args.domain)
        domain = parse_domain(client.xml(dom, inactive=not client.is_active(dom)), f"domain '{dom.name}'")
    found = [i for i in domain.interfaces if i.mac == mac]
    if not found:
        raise NwfilterError(f"domain '{domain.name}' has no filterable interface with MAC {mac}")
    if found[0].filterref is None:
        raise NwfilterError(f"interface {mac} of domain '{domain.name}' has no libvirt-nwfilter filter "
                            "(see attach-filter)")
    return Binding(domain.name, domain.uuid, found[0].target or "vnet0", mac, found[0].filterref)


def addresses_for(binding: Binding) -> "Addresses":
    from .packet import Addresses

    params = binding.filterref.param_dict()
    mac = (params.get("MAC") or (binding.mac,))[0]
    defaults = Addresses(mac)
    return Addresses(mac, guest_ipv4=(params.get("IP") or (defaults.guest_ipv4,))[0],
                     guest_ipv6=(params.get("IPV6") or (defaults.guest_ipv6,))[0])


def _packet_words(args: argparse.Namespace, words: list[str]) -> list[str]:
    if args.file:
        from ..cli import _read_input

        text = _read_input(args.file).decode("utf-8", "replace")
        words = words + [line.split("#", 1)[0] for line in text.splitlines()]
    if not any(word.strip() for word in words):
        raise _UsageError("no PACKET given (e.g. 'out tcp dstportstart=22')")
    return words


def cmd_simulate(service: "Service", args: argparse.Namespace) -> int:
    try:
        words = _split_flags(list(args.words), args)
        target = None if args.domain else (words.pop(0) if words else None)
        binding = _binding(service, args, target)
        packet_words = _packet_words(args, words)
    except _UsageError as error:
        print(f"libvirt-nwfilter simulate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from .evaluate import SimulationError, Simulator
    from .explain import json_report, text_report
    from .packet import parse_packets

    addresses = addresses_for(binding)
    packets = parse_packets(packet_words, addresses)
    ruleset = service.ruleset(binding)
    try:
        results = Simulator(ruleset).run(packets)
    except SimulationError as error:
        raise NwfilterError(f"cannot simulate: {error}") from None
    kernel = None
    if args.kernel:
        from .kernel import kernel_results

        kernel = kernel_results(service.backend, binding.portdev or "vnet0", ruleset, packets, addresses)
    for number, result in enumerate(results, 1):
        if args.json:
            report = json_report(result)
            if kernel is not None:
                report["kernel"] = kernel[number - 1].as_json()
            print(json.dumps(report, sort_keys=False))
        else:
            text = text_report(number, result)
            if kernel is not None:
                text += kernel[number - 1].as_text(result)
            sys.stdout.write(text + ("\n" if number < len(results) else ""))
    return EXIT_OK


def register(sub, verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb(sub, "simulate", cmd_simulate, SUMMARY, DESCRIPTION)
    p.usage = ("libvirt-nwfilter simulate [--json] [--kernel] [--file FILE] "
               "{TARGET | --domain GUEST --mac MAC} PACKET...")
    p.add_argument("--json", action="store_true", help="one JSON object per packet")
    p.add_argument("--kernel", action="store_true",
                   help="also run the packets through the real rules in a throw-away network namespace")
    p.add_argument("--file", metavar="FILE", help="read packets from FILE, one per line ('-': standard input)")
    p.add_argument("--domain", metavar="GUEST", help="a libvirt guest (name, UUID or id); needs --mac")
    p.add_argument("--mac", metavar="MAC", help="the guest interface's MAC address")
    p.add_argument("-c", "--connect", metavar="URI", default="qemu:///system",
                   help="libvirt connection URI for --domain (default qemu:///system)")
    p.add_argument("words", metavar="TARGET PACKET", nargs=argparse.REMAINDER,
                   help="the port or binding file, then the packets")
