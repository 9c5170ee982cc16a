"""Offline engine vs kernel, packet by packet (the ``simulate`` differential tests and
``bench/simulate_differential``).

:func:`compare` runs one conversation of packets through the offline engine and through the
kernel on each given backend (one throw-away namespace per backend) and lists every
disagreement: the verdict, and for every stage the decision (the same IR rule decided, or no
rule did in both). Each line names the packet, so a report reads like ``simulate`` output.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.compiler import compile_port
from libvirt_nwfilter.ir import PortRuleset
from libvirt_nwfilter.model import FilterRef, make_params
from libvirt_nwfilter.resolve import resolve
from libvirt_nwfilter.simulate.evaluate import END, NO_RULES, SUB_END, Result, Simulator, Stage
from libvirt_nwfilter.simulate.kernel import KernelResult, KernelStage, kernel_results
from libvirt_nwfilter.simulate.packet import Packet, parse_packets
from libvirt_nwfilter.store import FilterStore
from libvirt_nwfilter.xml import parse_filter

from simgen import ADDRESSES

PORT = "vnet0"
BACKENDS = {"nftables": lambda: NftablesBackend(conntrack="inet"), "ebiptables": EbiptablesBackend}

# The 24 reference filters with parameters for every variable they use.
_V4 = {"IP": ("10.0.0.1", "10.0.0.3")}
BUILTIN_PARAMS: dict[str, dict] = {
    "clean-traffic": _V4, "clean-traffic-gateway": {**_V4, "GATEWAY_MAC": ("52:54:00:00:00:02",)},
    "no-ip-spoofing": _V4, "no-arp-spoofing": _V4, "no-arp-ip-spoofing": _V4,
    "allow-dhcp-server": {"DHCPSERVER": ("10.0.0.2",)}, "allow-dhcpv6-server": {"DHCPSERVER": ("fd00::2",)},
    "no-ipv6-spoofing": {"IPV6": ("fd00::1",)},
}
BUILTINS = ("allow-arp", "allow-dhcp", "allow-dhcp-server", "allow-dhcpv6", "allow-dhcpv6-server",
            "allow-incoming-ipv4", "allow-incoming-ipv6", "allow-ipv4", "allow-ipv6", "clean-traffic",
            "clean-traffic-gateway", "no-arp-ip-spoofing", "no-arp-mac-spoofing", "no-arp-spoofing",
            "no-ip-multicast", "no-ip-spoofing", "no-ipv6-multicast", "no-ipv6-spoofing", "no-mac-broadcast",
            "no-mac-spoofing", "no-other-l2-traffic", "no-other-rarp-traffic", "qemu-announce-self",
            "qemu-announce-self-rarp")


def ruleset_of(filter_name: str, params: Mapping[str, Sequence[str]], filters: Mapping[str, str] = {}) -> PortRuleset:
    """The compiled ruleset of ``filter_name`` on the port (``filters``: extra XML by name)."""
    store = FilterStore(Path(tempfile.mkdtemp(prefix="nwft-simdiff-")))
    parsed = {name: parse_filter(xml, name) for name, xml in filters.items()}
    lookup = lambda name: parsed.get(name) or store.source(name)  # noqa: E731
    ref = FilterRef(filter_name, make_params(dict(params)))
    return compile_port(resolve(ref, ADDRESSES.guest_mac, lookup))


def _same_decision(offline: Stage, kernel: KernelStage) -> bool:
    if offline.how in (END, NO_RULES):  # ebtables chains end with a rule for their policy
        return kernel.event is None or kernel.note.startswith("the end of the chain")
    if offline.how == SUB_END:
        return kernel.rule is None and kernel.note.startswith("the end of the chain")
    return kernel.rule is not None and (kernel.rule.chain, kernel.rule.index) == (offline.rule.chain, offline.rule.index)


def disagreements(offline: Sequence[Result], kernel: Sequence[KernelResult]) -> list[str]:
    out = []
    for number, (mine, theirs) in enumerate(zip(offline, kernel), 1):
        head = f"packet {number} ({mine.packet.text}) on {theirs.backend}"
        if mine.passed != theirs.passed:
            out.append(f"{head}: offline {mine.verdict}, kernel {theirs.verdict} {theirs.note}".rstrip())
            continue
        if mine.stages and mine.stages[0].key == "bridge":
            continue
        for stage, kstage in zip(mine.stages, theirs.stages):
            if stage.passed != kstage.passed or not _same_decision(stage, kstage):
                out.append(f"{head}: stage {stage.key}: offline {'pass' if stage.passed else 'drop'} "
                           f"({stage.how} {stage.rule.chain if stage.rule else ''}#"
                           f"{stage.rule.index if stage.rule else ''}), kernel {kstage.describe()}")
    return out


def compare(ruleset: PortRuleset, words: Sequence[str], backends: Sequence[str] = tuple(BACKENDS)
            ) -> tuple[list[Packet], list[str]]:
    """Run the conversation offline and on each backend; the packets and every disagreement."""
    packets = parse_packets(words, ADDRESSES)
    offline = Simulator(ruleset).run(packets)
    problems = []
    for name in backends:
        kernel = kernel_results(BACKENDS[name](), PORT, ruleset, parse_packets(words, ADDRESSES), ADDRESSES)
        problems += disagreements(offline, kernel)
    return packets, problems
