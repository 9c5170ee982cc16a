"""IPv6 pieces for lab tests: a real router (Debian's radvd), a real DHCPv6 server (dnsmasq) and
client (ISC dhclient) in lab namespaces, a guest whose kernel does real DAD and SLAAC, and
Neighbour Discovery / DHCPv6 frames built with scapy.

Every daemon runs inside a lab namespace: :meth:`netlab.Lab.close` kills it with the namespace.
Files (configurations, leases, pid files) live in the test's temporary directory.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import time
from pathlib import Path

from scapy.layers.dhcp6 import DHCP6_Advertise, DHCP6_Reply, DHCP6_Solicit, DHCP6OptClientId, DHCP6OptServerId
from scapy.layers.dhcp6 import DUID_LL
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (ICMPv6MLDMultAddrRec, ICMPv6MLReport2, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA,
                                ICMPv6ND_Redirect, ICMPv6ND_RS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptPrefixInfo,
                                ICMPv6NDOptSrcLLAddr, ICMPv6NDOptUnknown, ICMPv6EchoRequest, IPv6,
                                IPv6ExtHdrHopByHop, RouterAlert)
from scapy.layers.l2 import Ether

import netlab

ALL_NODES_MAC = "33:33:00:00:00:01"
MLDV2_MAC = "33:33:00:00:00:16"
DHCP6_MAC = "33:33:00:01:00:02"
PREFIX = "fd00::"  # the real router's prefix (/64)
ROGUE_PREFIX = "fd99::"


def eui64(prefix: str, mac: str) -> str:
    """The SLAAC address (modified EUI-64, the kernel's addr_gen_mode 0) of ``mac`` in ``prefix``/64."""
    octets = bytes(int(x, 16) for x in mac.split(":"))
    interface_id = bytes([octets[0] ^ 2]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(ipaddress.IPv6Address(prefix).packed[:8] + interface_id))


def link_local(mac: str) -> str:
    return eui64("fe80::", mac)


def solicited_node_mac(address: str) -> str:
    tail = ipaddress.IPv6Address(address).packed[-3:]
    return "33:33:ff:" + ":".join(f"{b:02x}" for b in tail)


def solicited_node(address: str) -> str:
    tail = ipaddress.IPv6Address(address).packed[-3:]
    return str(ipaddress.IPv6Address(bytes.fromhex("ff02" + "00" * 8 + "0001ff") + tail))


# ----------------------------------------------------------------------------------------------
# Frames (bytes; a random flow label makes every frame unique)


def _ip6(src_mac: str, dst_mac: str, src: str, dst: str, hlim: int = 255):
    return Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=dst, hlim=hlim, fl=secrets.randbits(20))


def neighbour_advert(src_mac: str, src: str, target: str, tll: str | None = None, dst: str = "ff02::1",
                     dst_mac: str = ALL_NODES_MAC, options_before: tuple = (), options_after: tuple = ()) -> bytes:
    """An NA (override flag set) for ``target``; ``tll`` the target link-layer address option;
    other options (scapy layers) may come before or after it."""
    options = (*options_before, *((ICMPv6NDOptDstLLAddr(lladdr=tll),) if tll else ()), *options_after)
    return bytes(_stack(_ip6(src_mac, dst_mac, src, dst) / ICMPv6ND_NA(tgt=target, R=0, S=0, O=1), options))


def neighbour_solicit(src_mac: str, src: str, target: str, sll: str | None = None,
                      extra_options: tuple = ()) -> bytes:
    """An NS for ``target``, to its solicited-node group."""
    options = (*((ICMPv6NDOptSrcLLAddr(lladdr=sll),) if sll else ()), *extra_options)
    pkt = _ip6(src_mac, solicited_node_mac(target), src, solicited_node(target)) / ICMPv6ND_NS(tgt=target)
    return bytes(_stack(pkt, options))


def nonce_option():
    """RFC 7527's Nonce option (type 14), as Linux puts it in its DAD solicitations."""
    return ICMPv6NDOptUnknown(type=14, len=1, data=secrets.token_bytes(6))


def _stack(pkt, layers: tuple):
    for layer in layers:
        pkt = pkt / layer
    return pkt


def router_advert(src_mac: str, src: str, prefix: str = ROGUE_PREFIX) -> bytes:
    return bytes(_ip6(src_mac, ALL_NODES_MAC, src, "ff02::1") / ICMPv6ND_RA()
                 / ICMPv6NDOptSrcLLAddr(lladdr=src_mac) / ICMPv6NDOptPrefixInfo(prefix=prefix, prefixlen=64))


def router_solicit(src_mac: str, src: str) -> bytes:
    return bytes(_ip6(src_mac, "33:33:00:00:00:02", src, "ff02::2") / ICMPv6ND_RS()
                 / ICMPv6NDOptSrcLLAddr(lladdr=src_mac))


def redirect(src_mac: str, src: str, dst_mac: str, dst: str, target: str, destination: str) -> bytes:
    return bytes(_ip6(src_mac, dst_mac, src, dst) / ICMPv6ND_Redirect(tgt=target, dst=destination))


def mld_report(src_mac: str, src: str, group: str) -> bytes:
    """An MLDv2 report joining ``group`` (hop-by-hop router alert, as kernels send it)."""
    return bytes(_ip6(src_mac, MLDV2_MAC, src, "ff02::16", hlim=1)
                 / IPv6ExtHdrHopByHop(options=[RouterAlert()])
                 / ICMPv6MLReport2(records=[ICMPv6MLDMultAddrRec(rtype=4, dst=group)]))


def echo(src_mac: str, dst_mac: str, src: str, dst: str) -> bytes:
    return bytes(_ip6(src_mac, dst_mac, src, dst, hlim=64) / ICMPv6EchoRequest(id=secrets.randbits(16)))


def udp6(src_mac: str, dst_mac: str, src: str, dst: str, sport: int = 40000, dport: int = 7) -> bytes:
    return bytes(_ip6(src_mac, dst_mac, src, dst, hlim=64) / UDP(sport=sport, dport=dport) / b"nwft")


def dhcp6_solicit(src_mac: str, src: str) -> bytes:
    return bytes(_ip6(src_mac, DHCP6_MAC, src, "ff02::1:2", hlim=1) / UDP(sport=546, dport=547)
                 / DHCP6_Solicit(trid=secrets.randbits(24)) / DHCP6OptClientId(duid=DUID_LL(lladdr=src_mac)))


def dhcp6_server_message(kind: str, src_mac: str, src: str, client_mac: str, client: str) -> bytes:
    """A DHCPv6 Advertise or Reply from a server (UDP 547 -> 546) to ``client``."""
    message = {"advertise": DHCP6_Advertise, "reply": DHCP6_Reply}[kind]
    return bytes(_ip6(src_mac, client_mac, src, client, hlim=64) / UDP(sport=547, dport=546)
                 / message(trid=secrets.randbits(24)) / DHCP6OptClientId(duid=DUID_LL(lladdr=client_mac))
                 / DHCP6OptServerId(duid=DUID_LL(lladdr=src_mac)))


def icmpv6_type(frame: bytes) -> int | None:
    """The ICMPv6 type of a captured frame (after extension headers), or None."""
    pkt = Ether(frame)
    layer = pkt[IPv6].payload if IPv6 in pkt else None
    while layer is not None and layer.name not in ("Raw", "NoPayload") and not hasattr(layer, "type"):
        layer = layer.payload
    return getattr(layer, "type", None) if layer is not None and pkt[IPv6].nh in (0, 58) else None


def ipv6_source(frame: bytes) -> str:
    return Ether(frame)[IPv6].src


def nd_target(frame: bytes) -> str | None:
    pkt = Ether(frame)
    for layer in (ICMPv6ND_NS, ICMPv6ND_NA):
        if layer in pkt:
            return pkt[layer].tgt
    return None


# ----------------------------------------------------------------------------------------------
# Addresses of a namespace's interface


def addresses(vm: netlab.VM) -> dict[str, set[str]]:
    """``{address: flags}`` of ``vm``'s eth0 IPv6 addresses (flags such as tentative, dadfailed)."""
    out = vm.run(["ip", "-j", "-6", "addr", "show", "dev", vm.iface]).stdout
    found: dict[str, set[str]] = {}
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            flags = {key for key, value in info.items() if value is True}
            found[info["local"]] = flags
    return found


def wait_for_address(vm: netlab.VM, address: str, timeout: float = 30.0) -> bool:
    """True once ``address`` is on ``vm``'s eth0 and has passed duplicate address detection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flags = addresses(vm).get(address)
        if flags is not None and not flags & {"tentative", "dadfailed"}:
            return True
        time.sleep(0.1)
    return False


def enable_autoconfiguration(vm: netlab.VM) -> None:
    """Let ``vm``'s kernel do what a guest does when its link comes up: duplicate address
    detection (with RFC 7527 nonces), router solicitations, SLAAC with the EUI-64 address,
    no privacy addresses; then bring eth0 down and up so it starts from scratch."""
    iface = vm.iface
    netlab.sysctl_in(vm.ns, {f"net.ipv6.conf.{iface}.{key}": value for key, value in {
        "accept_dad": 1, "dad_transmits": 1, "enhanced_dad": 1, "router_solicitations": 3,
        "router_solicitation_interval": 1, "accept_ra": 1, "autoconf": 1, "use_tempaddr": 0,
        "addr_gen_mode": 0, "forwarding": 0}.items()})
    vm.run(["ip", "link", "set", iface, "down"])
    vm.run(["ip", "link", "set", iface, "up"])


# ----------------------------------------------------------------------------------------------
# Daemons


def _spawn(ns: str, argv: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("wb")
    return subprocess.Popen(netlab.ns_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=handle,
                            stderr=subprocess.STDOUT)


def start_radvd(vm: netlab.VM, workdir: Path, prefix: str = PREFIX, managed: bool = False) -> subprocess.Popen:
    """Debian's radvd on ``vm``'s eth0, advertising ``prefix``/64 for SLAAC every 3-4 s (and at
    once to a solicitation); ``managed`` sets the M flag (addresses from DHCPv6 as well)."""
    netlab.sysctl_in(vm.ns, {"net.ipv6.conf.all.forwarding": 1})
    conf = workdir / f"radvd-{vm.name}.conf"
    conf.write_text(
        f"interface {vm.iface} {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n"
        f"  AdvManagedFlag {'on' if managed else 'off'};\n"
        f"  prefix {prefix}/64 {{ AdvOnLink on; AdvAutonomous on; }};\n}};\n")
    return _spawn(vm.ns, ["radvd", "--nodaemon", "--config", str(conf), "--pidfile",
                          str(workdir / f"radvd-{vm.name}.pid"), "--logmethod", "stderr"],
                  workdir / f"radvd-{vm.name}.log")


def start_dhcpv6_server(vm: netlab.VM, workdir: Path, first: str, last: str) -> subprocess.Popen:
    """Debian's dnsmasq as a DHCPv6 server only (no DNS, no RA) on ``vm``'s eth0, leasing
    addresses ``first``..``last`` of ``vm``'s own /64."""
    return _spawn(vm.ns, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root",
                          f"--interface={vm.iface}", "--bind-interfaces", f"--dhcp-range={first},{last},64,1h",
                          f"--dhcp-leasefile={workdir / f'dnsmasq-{vm.name}.leases'}",
                          f"--pid-file={workdir / f'dnsmasq-{vm.name}.pid'}", "--log-dhcp"],
                  workdir / f"dnsmasq-{vm.name}.log")


_CLIENT_SCRIPT = """#!/bin/sh
# dhclient's script for the tests: only add the leased address (never touch resolv.conf).
case "$reason" in
BOUND6|RENEW6|REBIND6|REBOOT6)
    [ -n "$new_ip6_address" ] && exec ip -6 addr replace "$new_ip6_address/${new_ip6_prefixlen:-128}" dev "$interface" ;;
esac
exit 0
"""


def dhcpv6_lease(vm: netlab.VM, workdir: Path, timeout: int = 20) -> subprocess.CompletedProcess:
    """Run ISC dhclient -6 once on ``vm``'s eth0 (Solicit, Advertise, Request, Reply); exit 0
    once an address is leased and configured, 2 after ``timeout`` seconds without one."""
    script = workdir / "dhclient-script"
    script.write_text(_CLIENT_SCRIPT)
    script.chmod(0o755)
    conf = workdir / f"dhclient-{vm.name}.conf"
    conf.write_text(f"timeout {timeout};\n")
    return vm.run(["dhclient", "-6", "-1", "-v", "-cf", str(conf), "-sf", str(script),
                   "-lf", str(workdir / f"dhclient-{vm.name}.leases"),
                   "-pf", str(workdir / f"dhclient-{vm.name}.pid"), vm.iface],
                  check=False, timeout=timeout + 30)
