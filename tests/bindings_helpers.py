"""Shared helpers for the real-port binding tests (tests/kernel/test_bindings_*.py) and the
libvirt oracle comparison (tests/libvirt/test_oracle_*.py).

Standard library only (no scapy): frames are built with :mod:`struct`, so the suite runs with
the machine's ``python3`` as well as with ``.venv/bin/python``.

* :class:`Cli` runs ``python3 -m libvirt_nwfilter`` *inside* a lab's host namespace
  (``ip netns exec``), with per-test configuration and state directories and the chosen
  backend, so the rules land in that namespace only.
* Frame builders (:func:`ether`, :func:`ipv4`, :func:`udp`, :func:`tcp`, :func:`icmp_echo`,
  :func:`arp`, :func:`rarp`, :func:`ipv6_udp`, ...) return bytes.
* :func:`kernel_snapshot` captures the firewall state of a namespace (nft ruleset, ebtables,
  iptables, ip6tables) with counters removed, for "nothing changed" assertions;
  :func:`port_items` everything of one port, handles included ("nothing re-created");
  :func:`dispatch_entries` lists the ports our backend dispatches.
* Traffic checks (frames, connections; every "dropped" with its positive twin) are in
  tests/traffic.py.
* Fixtures ``backend`` (both backends), ``cli`` and ``pair`` (VMs a and b): import them.

Others import this module too (tests/kernel/test_live_update.py): keep the names and signatures
stable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence
from xml.sax.saxutils import quoteattr

import libvirtd
import netlab
from libvirt_nwfilter.simulate.frames import checksum
from libvirt_nwfilter.backends.nftables.names import shard_of

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("nftables", "ebiptables")
BCAST = "ff:ff:ff:ff:ff:ff"

ETH_IPV4, ETH_ARP, ETH_RARP, ETH_IPV6 = 0x0800, 0x0806, 0x8035, 0x86DD
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58


# ----------------------------------------------------------------------------------------------
# The CLI, inside the lab's host namespace


@dataclass
class Cli:
    """``python3 -m libvirt_nwfilter`` in namespace ``ns`` with its own confdir/rundir."""

    ns: str
    workdir: Path
    backend: str
    python: str = sys.executable
    timeout: float = 120.0
    calls: list = field(default_factory=list)

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.confdir = self.workdir / "conf"
        self.rundir = self.workdir / "run"
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.rundir.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(LIBVIRT_NWFILTER_CONFDIR=str(self.confdir),
                   LIBVIRT_NWFILTER_RUNDIR=str(self.rundir),
                   LIBVIRT_NWFILTER_BACKEND=self.backend,
                   PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
        return env

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, self.python, "-m", "libvirt_nwfilter", *map(str, args)]

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the CLI; with ``check`` a non-zero exit fails with the output in the message."""
        argv = self.argv(*args)
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, cwd=REPO,
                              env=self.env(), timeout=self.timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
        self.calls.append((args, proc.returncode))
        if check and proc.returncode != 0:
            raise AssertionError(f"libvirt_nwfilter {' '.join(map(str, args))} exited {proc.returncode}:\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        """Start the CLI without waiting (for concurrency tests)."""
        return subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=self.env())

    def _file(self, stem: str, text: str) -> Path:
        self._n += 1
        path = self.workdir / f"{self._n:03d}-{stem}.xml"
        path.write_text(text)
        return path

    def define(self, filter_xml: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("define", self._file("filter", filter_xml), check=check)

    def binding_file(self, port: str, mac: str, filter: str,
                     params: Mapping[str, str | Sequence[str]] | None = None) -> Path:
        return self._file(f"binding-{port}", binding_xml(port, mac, filter, params))

    def binding_create(self, port: str, mac: str, filter: str,
                       params: Mapping[str, str | Sequence[str]] | None = None,
                       check: bool = True) -> subprocess.CompletedProcess:
        return self.run("binding-create", self.binding_file(port, mac, filter, params), check=check)

    def binding_delete(self, port: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("binding-delete", port, check=check)

    def binding_ports(self) -> list[str]:
        """Ports listed by ``binding-list -q`` (first column)."""
        out = self.run("-q", "binding-list").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]


def binding_xml(port: str, mac: str, filter: str,
                params: Mapping[str, str | Sequence[str]] | None = None,
                owner: str = "nwft-bindings", owner_uuid: str | None = None) -> str:
    """A libvirt ``<filterbinding>`` owned by ``owner`` (see :func:`libvirtd.binding_xml`)."""
    return libvirtd.binding_xml(port, mac, filter, params, owner, owner_uuid)


# ----------------------------------------------------------------------------------------------
# Kernel state snapshots

_COUNTERS = [
    (re.compile(r"counter packets \d+ bytes \d+"), "counter"),
    (re.compile(r"^(:\S+ \S+) \[\d+:\d+\]$", re.M), r"\1"),
    (re.compile(r"^# .*\n", re.M), ""),
    (re.compile(r" -c \d+ \d+"), ""),
]


def _strip(text: str) -> str:
    for pattern, repl in _COUNTERS:
        text = pattern.sub(repl, text)
    return text


def kernel_snapshot(ns: str) -> dict[str, str]:
    """The namespace's firewall (counters and comment lines removed): ``nft list ruleset``,
    ``ebtables-save`` (nat and filter), ``iptables-save``, ``ip6tables-save``."""
    snap = {"nft": _strip(netlab.run_in(ns, ["nft", "list", "ruleset"]).stdout)}
    for key, argv in (("ebtables", ["ebtables-save"]), ("iptables", ["iptables-save"]),
                      ("ip6tables", ["ip6tables-save"])):
        proc = netlab.run_in(ns, argv, check=False)
        snap[key] = _strip(proc.stdout) if proc.returncode == 0 else f"<{argv[0]} failed: {proc.stderr}>"
    return snap


def nft_json(ns: str) -> list[dict]:
    return json.loads(netlab.run_in(ns, ["nft", "-j", "list", "ruleset"]).stdout)["nftables"]


_ITEM_KINDS = ("chain", "rule", "set", "map")


def port_items(ns: str, port: str) -> list[str]:
    """Everything of ``port`` in the namespace's ruleset (ebtables and iptables-nft live there
    too), handles included and counters without numbers: chains and sets named after it, rules
    that name it (its chains' rules, the jumps to them, its interface), map elements that name
    it. Equal lists: nothing of the port was removed, changed or created anew."""
    mention = re.compile(rf"(?<![\w.-]){re.escape(port)}(?![\w.-])")
    found = []
    for item in json.loads(netlab.run_in(ns, ["nft", "-a", "-j", "list", "ruleset"]).stdout)["nftables"]:
        (kind, body), = item.items()
        if kind not in _ITEM_KINDS or not isinstance(body, dict):
            continue
        if kind in ("chain", "set", "map") and mention.search(body["name"]):
            found.append(json.dumps(item, sort_keys=True))
        elif kind == "rule" and mention.search(json.dumps(body)):
            found.append(re.sub(r'"counter": \{[^}]*\}', '"counter": {}', json.dumps(item, sort_keys=True)))
        elif kind == "map":
            found += [json.dumps([body["family"], body["table"], body["name"], pair], sort_keys=True)
                      for pair in body.get("elem", ()) if mention.search(json.dumps(pair))]
    return sorted(found)


def dispatch_entries(ns: str, backend: str) -> set[str]:
    """Ports that have a from-VM dispatch entry in the kernel: nftables: elements of the verdict
    map ``l2_from_vm`` of their shard's bridge table; ebiptables: ``-i PORT`` jumps in ebtables
    ``nat PREROUTING`` to our ``nwf-I-``/``nwf-J-`` roots."""
    ports: set[str] = set()
    if backend == "nftables":
        for item in nft_json(ns):
            m = item.get("map")
            if m and m.get("family") == "bridge" and m.get("name") == "l2_from_vm":
                ports.update(elem[0] for elem in m.get("elem", []) if m.get("table") == shard_of(elem[0]))
        return ports
    out = netlab.run_in(ns, ["ebtables", "-t", "nat", "-S", "PREROUTING"], check=False).stdout
    if not out:
        out = netlab.run_in(ns, ["ebtables-save", "-t", "nat"]).stdout
    for line in out.splitlines():
        m = re.match(r"-A PREROUTING -i (\S+) -j nwf-[IJ]-\S+", line)
        if m:
            ports.add(m.group(1))
    return ports


# ----------------------------------------------------------------------------------------------
# Frames (stdlib only)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def ether(dst: str, src: str, ethertype: int, payload: bytes = b"") -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


_csum = checksum  # the Internet checksum (RFC 1071)


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int | None = None, ttl: int = 64,
         tos: int = 0) -> bytes:
    """An IPv4 header (no options) + payload; ``ident`` random unless given, so frames differ."""
    ident = secrets.randbits(16) if ident is None else ident
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, 0, ttl, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + payload


def _l4_csum(src: str, dst: str, proto: int, segment: bytes) -> int:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(segment))
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", len(segment), proto)
    return _csum(pseudo + segment) or 0xFFFF


def udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"nwft") -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    c = _l4_csum(src, dst, PROTO_UDP, seg)
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = 0x02, seq: int | None = None) -> bytes:
    seq = secrets.randbits(32) if seq is None else seq
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0)
    c = _l4_csum(src, dst, PROTO_TCP, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def icmp_echo(ident: int | None = None, seq: int = 1, data: bytes = b"nwft-probe") -> bytes:
    ident = secrets.randbits(16) if ident is None else ident
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]


def ip_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, kind: str = "icmp",
             sport: int = 40000, dport: int = 7, tos: int = 0) -> bytes:
    """Ethernet + IPv4 + ``kind`` (``icmp`` echo request, ``udp``, ``tcp`` SYN)."""
    if kind == "icmp":
        l4, proto = icmp_echo(), PROTO_ICMP
    elif kind == "udp":
        l4, proto = udp(src_ip, dst_ip, sport, dport), PROTO_UDP
    elif kind == "tcp":
        l4, proto = tcp(src_ip, dst_ip, sport, dport), PROTO_TCP
    else:
        raise ValueError(kind)
    return ether(dst_mac, src_mac, ETH_IPV4, ipv4(src_ip, dst_ip, proto, l4, tos=tos))


def dhcp_discover(src_mac: str) -> bytes:
    """A DHCPDISCOVER as a client sends it: 0.0.0.0:68 -> 255.255.255.255:67, broadcast."""
    xid = secrets.randbits(32)
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4),
                        bytes(4), bytes(4), mac_bytes(src_mac) + bytes(10), b"", b"")
    bootp += b"\x63\x82\x53\x63" + bytes([53, 1, 1, 255])
    payload = udp("0.0.0.0", "255.255.255.255", 68, 67, bootp)
    return ether(BCAST, src_mac, ETH_IPV4, ipv4("0.0.0.0", "255.255.255.255", PROTO_UDP, payload))


def dhcp_offer(server_mac: str, server_ip: str, client_mac: str, yiaddr: str, dst_mac: str | None = None) -> bytes:
    """A DHCPOFFER from ``server_ip``:67 to 255.255.255.255:68 (to ``dst_mac``, default broadcast)."""
    xid = secrets.randbits(32)
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        ipaddress.IPv4Address(yiaddr).packed, ipaddress.IPv4Address(server_ip).packed,
                        bytes(4), mac_bytes(client_mac) + bytes(10), b"", b"")
    bootp += b"\x63\x82\x53\x63" + bytes([53, 1, 2, 255])
    payload = udp(server_ip, "255.255.255.255", 67, 68, bootp)
    return ether(dst_mac or BCAST, server_mac, ETH_IPV4,
                 ipv4(server_ip, "255.255.255.255", PROTO_UDP, payload))


def arp(src_mac: str, dst_mac: str, op: int, sha: str, spa: str, tha: str, tpa: str,
        ethertype: int = ETH_ARP) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac_bytes(sha),
                       ipaddress.IPv4Address(spa).packed, mac_bytes(tha), ipaddress.IPv4Address(tpa).packed)
    return ether(dst_mac, src_mac, ethertype, body)


def arp_request(src_mac: str, spa: str, tpa: str, sha: str | None = None, dst_mac: str = BCAST) -> bytes:
    return arp(src_mac, dst_mac, 1, sha or src_mac, spa, "00:00:00:00:00:00", tpa)


def arp_reply(src_mac: str, dst_mac: str, spa: str, tpa: str, sha: str | None = None) -> bytes:
    return arp(src_mac, dst_mac, 2, sha or src_mac, spa, dst_mac, tpa)


def rarp(src_mac: str, sha: str, tha: str, dst_mac: str = BCAST, op: int = 3,
         spa: str = "0.0.0.0", tpa: str = "0.0.0.0") -> bytes:
    """A RARP frame; the defaults are QEMU's announce-self (Request_Reverse, IPs 0.0.0.0)."""
    return arp(src_mac, dst_mac, op, sha, spa, tha, tpa, ethertype=ETH_RARP)


def ipv6_packet(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    flow = secrets.randbits(20)
    return struct.pack("!IHBB16s16s", (6 << 28) | flow, len(payload), next_header, hop_limit,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def ipv6_udp(src_mac: str, dst_mac: str, src: str, dst: str, sport: int = 40000, dport: int = 7) -> bytes:
    return ether(dst_mac, src_mac, ETH_IPV6, ipv6_packet(src, dst, PROTO_UDP, udp(src, dst, sport, dport)))


def ipv6_echo(src_mac: str, dst_mac: str, src: str, dst: str) -> bytes:
    msg = struct.pack("!BBHHH", 128, 0, 0, secrets.randbits(16), 1) + b"nwft-probe"
    c = _l4_csum(src, dst, PROTO_ICMPV6, msg)
    msg = msg[:2] + struct.pack("!H", c) + msg[4:]
    return ether(dst_mac, src_mac, ETH_IPV6, ipv6_packet(src, dst, PROTO_ICMPV6, msg))


def vlan_tagged(src_mac: str, dst_mac: str, vid: int, ethertype: int, payload: bytes) -> bytes:
    """An 802.1Q-tagged frame (priority 0)."""
    return ether(dst_mac, src_mac, 0x8100, struct.pack("!HH", vid & 0xFFF, ethertype) + payload)


def untagged(frame: bytes) -> bytes:
    """``frame`` without its 802.1Q tag (how a receiver's packet socket sees it)."""
    assert frame[12:14] == b"\x81\x00", "not a tagged frame"
    return frame[:12] + frame[16:]


def raw(src_mac: str, dst_mac: str, ethertype: int, tag: bytes | None = None) -> bytes:
    """A frame of an arbitrary ethertype with a random 46-byte body."""
    return ether(dst_mac, src_mac, ethertype, (tag or b"") + secrets.token_bytes(46))


# ----------------------------------------------------------------------------------------------
# Filters and waiting


def run_directory_files(rundir: Path) -> dict[str, str]:
    """The state in a run directory, by relative path: bindings, ids, journal, reports — not
    the lock, the kernel probe cache, temporary (dot) files or the link through which our nft
    runs are told apart."""
    return {str(path.relative_to(rundir)): path.read_text() for path in sorted(rundir.rglob("*"))
            if path.is_file() and not path.is_symlink() and path.name not in ("lock", "probe.json")
            and not path.name.startswith(".")}


def wait_until(predicate, timeout: float = 3.0, interval: float = 0.05) -> bool:
    """True as soon as ``predicate()`` is; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def filter_xml(name: str, body: str, chain: str | None = "root", priority: int | None = None) -> str:
    """A ``<filter>`` document around ``body``."""
    attrs = f" name={quoteattr(name)}"
    if chain is not None:
        attrs += f" chain={quoteattr(chain)}"
    if priority is not None:
        attrs += f" priority='{priority}'"
    return f"<filter{attrs}>\n{body}\n</filter>\n"


# ----------------------------------------------------------------------------------------------
# Fixtures (import them into a test module: ``from bindings_helpers import backend, cli``)

import pytest  # noqa: E402  (after the stdlib helpers on purpose: they work without pytest)

MAC_A = "52:54:00:00:00:01"
MAC_B = "52:54:00:00:00:02"
MAC_G = "52:54:00:00:00:fe"
SPOOF_MAC = "52:54:00:99:99:99"
IP_A, IP_A2, IP_B, IP_G, IP_HOST = "10.0.0.1", "10.0.0.3", "10.0.0.2", "10.0.0.254", "10.0.0.250"
IP6_A, IP6_A2, IP6_B = "fd00::1", "fd00::3", "fd00::2"
LL_A, LL_B = "fe80::5054:ff:fe00:1", "fe80::5054:ff:fe00:2"


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Both backends, one test each."""
    return request.param


@pytest.fixture
def cli(lab, backend, tmp_path) -> Cli:
    """Our CLI in the lab's host namespace, with per-test confdir/rundir."""
    return Cli(lab.host_ns, tmp_path, backend)


@pytest.fixture
def pair(lab):
    """VM ``a`` (port vp1, 10.0.0.1, fd00::1) and VM ``b`` (vp2, 10.0.0.2, fd00::2)."""
    a = lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24", ipv6=f"{IP6_A}/64")
    b = lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24", ipv6=f"{IP6_B}/64")
    return a, b
