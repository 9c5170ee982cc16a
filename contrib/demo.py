"""A throwaway lab that shows libvirt-nwfilter at work (run by ``scripts/demo``, as root).

1. Network namespaces with a bridge and two veth "guests": ``web`` (filtered) and ``peer``.
   The qemu hook is run the way libvirtd runs it (bare environment, domain XML on stdin, through
   the wrapper ``install-hook`` writes) for ``web``, whose domain metadata asks for the shipped
   ``clean-traffic`` filter. Clean traffic passes; spoofed MAC, IP, ARP and IPv6 are dropped;
   after ``stopped`` everything passes again.
2. A private libvirtd in the lab (unless ``--no-libvirt``) with the hook installed: a disk-less
   guest with the same metadata starts and its tap is filtered; a guest whose metadata lacks
   ``IP`` (its address would be learned, and no libvirt-nwfilterd runs here) does not start and
   ``virsh`` shows why; destroying the guest removes its rules.

Everything is created in namespaces and temporary directories and removed at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import bindings_helpers as frames  # noqa: E402  (frame builders shared with the tests)
import netlab  # noqa: E402

from libvirt_nwfilter.install import HookSettings, wrapper_text  # noqa: E402

GUEST_UUID = "6c1d3d2e-8f0a-4c1b-9a3e-2f6d5b7c8e90"
WEB_MAC, PEER_MAC = "52:54:00:d0:00:01", "52:54:00:d0:00:02"
WEB_IP, PEER_IP = "10.77.0.10", "10.77.0.20"
NS_URI = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"


def metadata(mac: str, params: dict[str, str]) -> str:
    values = "".join(f"<nwf:parameter name='{k}' value='{v}'/>" for k, v in params.items())
    return (f"<nwf:nwfilter xmlns:nwf='{NS_URI}'><nwf:interface mac='{mac}'>"
            f"<nwf:filterref filter='clean-traffic'>{values}</nwf:filterref></nwf:interface></nwf:nwfilter>")


def domain_xml(name: str, mac: str, port: str, params: dict[str, str]) -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>{GUEST_UUID}</uuid>"
            f"<metadata>{metadata(mac, params)}</metadata><devices>"
            f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
            f"<target dev='{port}'/></interface></devices></domain>")


def say(text: str) -> None:
    print(text, flush=True)


def verdict(seen: bool, expected: bool, words: tuple[str, str]) -> str:
    mark = "ok" if seen == expected else "UNEXPECTED"
    return f"{words[0] if seen else words[1]:<8} [{mark}]"


class Demo:
    def __init__(self, workdir: Path):
        self.confdir, self.rundir = workdir / "conf", workdir / "run"
        self.hook = workdir / "qemu-hook"
        settings = HookSettings(sys.executable, str(self.confdir), str(self.rundir), None, str(workdir / "hook.log"))
        self.hook.write_text(wrapper_text(settings))
        self.hook.chmod(0o755)
        self.failures = 0

    def run_hook(self, lab: netlab.Lab, op: str, subop: str, xml: str) -> subprocess.CompletedProcess:
        """Run the hook as libvirtd does: bare environment, domain XML on stdin."""
        argv = ["env", "-i", "LC_ALL=C", "PATH=/usr/bin:/bin", str(self.hook), "web", op, subop, "-"]
        return netlab.run_in(lab.host_ns, argv, input=xml, check=False)

    def check(self, label: str, seen: bool, expected: bool, words: tuple[str, str] = ("yes", "no")) -> None:
        self.failures += seen != expected
        say(f"  {label:<58} {verdict(seen, expected, words)}")

    def traffic(self, label: str, passed: bool, expected: bool) -> None:
        self.check(label, passed, expected, ("passes", "dropped"))

    def probes(self, lab: netlab.Lab, web: netlab.VM, peer: netlab.VM, filtered: bool) -> None:
        self.traffic("web pings peer with its own addresses", lab.ping(web, PEER_IP), True)
        spoof_mac = frames.ip_frame("52:54:00:66:66:66", PEER_MAC, WEB_IP, PEER_IP)
        self.traffic("web sends IPv4 with a forged source MAC", lab.frame_delivered(web, spoof_mac, peer), not filtered)
        spoof_ip = frames.ip_frame(WEB_MAC, PEER_MAC, "10.77.0.99", PEER_IP)
        self.traffic("web sends IPv4 with a forged source IP", lab.frame_delivered(web, spoof_ip, peer), not filtered)
        arp_lie = frames.arp_reply(WEB_MAC, PEER_MAC, "10.77.0.1", PEER_IP)
        self.traffic("web claims the gateway's IP in an ARP reply", lab.frame_delivered(web, arp_lie, peer),
                   not filtered)
        v6 = frames.ipv6_udp(WEB_MAC, PEER_MAC, "fd00::10", "fd00::20")
        self.traffic("web sends IPv6 (clean-traffic allows IPv4 only)", lab.frame_delivered(web, v6, peer),
                   not filtered)

    def hook_part(self) -> None:
        say("\n== 1. The hook on a veth guest: clean-traffic with IP=" + WEB_IP)
        with netlab.Lab() as lab:
            web = lab.add_vm("web", WEB_MAC, ipv4=f"{WEB_IP}/24")
            peer = lab.add_vm("peer", PEER_MAC, ipv4=f"{PEER_IP}/24")
            say("  without any filter:")
            self.probes(lab, web, peer, filtered=False)
            xml = domain_xml("web", WEB_MAC, web.port, {"IP": WEB_IP})
            for op in ("prepare", "start"):
                result = self.run_hook(lab, op, "begin", xml)
                self.check(f"hook '{op} begin' exits 0", result.returncode == 0, True)
            say("  with the binding the hook created:")
            self.probes(lab, web, peer, filtered=True)
            listing = netlab.run_in(lab.host_ns, [sys.executable, "-m", "libvirt_nwfilter", "--confdir",
                                                  str(self.confdir), "--rundir", str(self.rundir), "binding-list"])
            say("  " + listing.stdout.replace("\n", "\n  ").rstrip())
            self.run_hook(lab, "stopped", "end", xml)
            say("  after 'stopped end':")
            self.probes(lab, web, peer, filtered=False)

    def libvirt_part(self) -> None:
        import libvirtd

        say("\n== 2. A real libvirtd and a disk-less QEMU guest, hook installed in qemu.d")
        daemon = libvirtd.start_libvirtd(self.hook.read_text())
        try:
            guest = daemon.start_guest("nwft-demo", WEB_MAC, metadata=metadata(WEB_MAC, {"IP": WEB_IP}))
            bound = guest.tap in daemon_bindings(self)
            self.check(f"guest started; its tap {guest.tap} has a binding", bound, True)
            daemon.remove_guest("nwft-demo")
            self.check("guest destroyed; its binding is gone", guest.tap not in daemon_bindings(self), True)
            try:
                daemon.start_guest("nwft-demo-noip", "52:54:00:d0:00:03", metadata=metadata("52:54:00:d0:00:03", {}))
                refused, message = False, ""
            except libvirtd.LibvirtdError as error:
                refused, message = True, str(error)
            self.check("a guest whose metadata lacks IP does not start (learning needs libvirt-nwfilterd)", refused,
                       True)
            reason = message.split("unexpected exit status 1: ", 1)[-1].splitlines()[0]
            say(f"  virsh start said: ...unexpected exit status 1: {reason.strip()}")
        finally:
            daemon.stop()


def daemon_bindings(demo: Demo) -> str:
    result = subprocess.run([sys.executable, "-m", "libvirt_nwfilter", "--confdir", str(demo.confdir),
                             "--rundir", str(demo.rundir), "binding-list"], capture_output=True, text=True)
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-libvirt", action="store_true", help="skip the part with a real libvirtd and guest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="libvirt-nwfilter-demo-") as tmp:
        demo = Demo(Path(tmp))
        try:
            demo.hook_part()
            if not args.no_libvirt:
                demo.libvirt_part()
        finally:
            netlab.cleanup_all()
    say("\nAll checks behaved as expected." if not demo.failures else f"\n{demo.failures} check(s) did NOT behave as expected.")
    return 1 if demo.failures else 0


if __name__ == "__main__":
    sys.exit(main())
