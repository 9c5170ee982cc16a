"""The throw-away network namespace of ``simulate --kernel``: what it holds (pure text and
argument lists; :mod:`kernel` has them run by the executor).

::

    sim-guest ==veth== PORT ─┐                 PORT: the binding's port, with its rules
    sim-remote ==veth== sim-rport ─┤ br0 (host)  sim-rport: an unfiltered remote peer
    sim-marker ==veth== sim-mport ─┘             sim-mport: where separator frames enter

``br0`` has the host's MAC and the addresses ``--to-host`` packets are sent to. Learning is off
on every port (a forged source MAC cannot teach the bridge where a peer is), unknown unicast is
flooded, IPv6 is off on every interface but ``br0`` (no stray neighbour discovery), the
bridge-netfilter calls are on (L3 rules see bridged packets) and the connection tracker does not
check TCP windows (our packets carry no real sequence numbers).

Our table ``libvirt_nwfilter_sim`` (bridge, inet, netdev) switches tracing on for every frame
that enters from a port or that the injector sends from the host (marked ``HOST_MARK``; the
host's own traffic is not traced), drops separator frames after tracing them, and ends each path
with a chain of the highest priority whose trace entry proves that the packet got through:
``seen-fwd`` (bridge postrouting, towards a port), ``seen-l2in`` (bridge input, frames for the
host) and ``seen-host`` (inet input, packets for the host's stack). The host takes nothing
further: ``seen-host`` and ``seen-l2in`` drop what they saw, and the guest's and the remote
peer's ends of the veths drop every frame at ingress (after the injector's capture saw it), so
the host's own stack never answers a test frame, which would open or answer connections.
"""

from __future__ import annotations

from typing import Iterable

from ..backends.base import Step

BRIDGE = "br0"
GUEST, REMOTE, REMOTE_PORT = "sim-guest", "sim-remote", "sim-rport"
MARKER, MARKER_PORT = "sim-marker", "sim-mport"
TABLE = "libvirt_nwfilter_sim"
LAST = 2147483647  # the highest hook priority: after every other chain
MARKER_MAC_PREFIX = 0x020000000000
HOST_MARK = 0x4E  # the mark of frames the injector sends from the host (bits 0-7: not ours)
SYSCTLS_BEFORE_LINKS = ("net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.conf.default.rp_filter=0",
                        "net.ipv4.conf.all.rp_filter=0")
SYSCTLS = ("net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1",
           "net.bridge.bridge-nf-call-arptables=0")
SYSCTL_TCP_LIBERAL = "net.netfilter.nf_conntrack_tcp_be_liberal=1"


def link_commands(port: str, host_mac: str) -> str:
    """``ip -batch`` input building the bridge and the veths."""
    lines = [f"link add {BRIDGE} address {host_mac} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
             f"link add {port} type veth peer name {GUEST}",
             f"link add {REMOTE_PORT} type veth peer name {REMOTE}",
             f"link add {MARKER_PORT} type veth peer name {MARKER}"]
    for link in (port, REMOTE_PORT, MARKER_PORT):
        lines.append(f"link set {link} master {BRIDGE}")
    for link in ("lo", BRIDGE, port, GUEST, REMOTE_PORT, REMOTE, MARKER_PORT, MARKER):
        lines.append(f"link set {link} up")
    return "\n".join(lines) + "\n"


def address_commands(ipv4: Iterable[str], ipv6: Iterable[str]) -> str:
    """``ip -batch`` input giving the host (``br0``) the addresses packets are sent to."""
    lines = [f"address add {address}/32 dev {BRIDGE}" for address in ipv4]
    lines += [f"address add {address}/128 dev {BRIDGE} nodad" for address in ipv6]
    return "".join(line + "\n" for line in lines)


def bridge_commands(port: str) -> str:
    """``bridge -batch`` input: no learning, unknown unicast flooded to the port and the remote
    peer, nothing to the marker port (which only sends)."""
    lines = [f"link set dev {link} learning off flood on\n" for link in (port, REMOTE_PORT)]
    lines.append(f"link set dev {MARKER_PORT} learning off flood off mcast_flood off bcast_flood off\n")
    return "".join(lines)


def tracer_ruleset(port: str) -> str:
    """``nft -f`` input for our tracing and observing table."""
    return f"""table bridge {TABLE} {{
  chain trace-in {{
    type filter hook prerouting priority -1000; policy accept;
    iifname "{MARKER_PORT}" meta nftrace set 1 drop
    iifname {{ "{port}", "{REMOTE_PORT}" }} meta nftrace set 1
  }}
  chain trace-out {{
    type filter hook output priority -1000; policy accept;
    meta mark {HOST_MARK:#x} meta nftrace set 1
  }}
  chain seen-fwd {{
    type filter hook postrouting priority {LAST}; policy accept;
    oifname {{ "{port}", "{REMOTE_PORT}" }} counter
  }}
  chain seen-l2in {{
    type filter hook input priority {LAST}; policy accept;
    ether type {{ ip, ip6 }} accept
    drop
  }}
}}
table inet {TABLE} {{
  chain seen-host {{
    type filter hook input priority {LAST}; policy drop;
  }}
}}
table netdev {TABLE} {{
  chain keep-guest {{
    type filter hook ingress device "{GUEST}" priority 0; policy drop;
  }}
  chain keep-remote {{
    type filter hook ingress device "{REMOTE}" priority 0; policy drop;
  }}
}}
"""


def setup_steps(port: str, host_mac: str, ipv4: Iterable[str], ipv6: Iterable[str], ns: str,
                ipv6_on_bridge: bool) -> list[Step]:
    """Everything but the port's rules, in order (``ns``: the namespace, for ``ip -n``)."""
    sysctls = SYSCTLS + ((f"net.ipv6.conf.{BRIDGE}.disable_ipv6=0",) if ipv6_on_bridge else ())
    return [Step(("sysctl", "-q", "-w", *SYSCTLS_BEFORE_LINKS)),
            Step(("ip", "-n", ns, "-batch", "-"), link_commands(port, host_mac)),
            Step(("bridge", "-n", ns, "-batch", "-"), bridge_commands(port)),
            Step(("sysctl", "-q", "-w", *sysctls)),
            Step(("ip", "-n", ns, "-batch", "-"), address_commands(ipv4, ipv6))]


def marker_frame(number: int) -> bytes:
    """A separator frame: broadcast, source MAC 02:00:xx:xx:xx:xx carrying ``number``."""
    source = (MARKER_MAC_PREFIX | number).to_bytes(6, "big")
    return b"\xff" * 6 + source + b"\x88\xb5" + bytes(46)


def marker_mac(number: int) -> str:
    value = MARKER_MAC_PREFIX | number
    return ":".join(f"{(value >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))
