"""``libvirt-nwfilter status`` against the real kernel of a lab namespace, on both backends.

Each line is checked against what the test finds out by itself: what the kernel accepts
(``nft -c`` of a bridge table with a conntrack match, with a reject), the bridge-netfilter
sysctls as the test set them, the filters and bindings it made, and no service running for its
run directory. ``status`` changes nothing.
"""

from __future__ import annotations

import uuid

import netlab
from bindings_helpers import (  # noqa: F401  (fixtures)
    backend, binding_xml, cli, filter_xml, kernel_snapshot, pair, run_directory_files,
)

PROBE = "table bridge nwft_probe {{ chain c {{ type filter hook forward priority 0; {rule}; }} }}"
BRIDGE_CONNTRACK = PROBE.format(rule="ct state established accept")
BRIDGE_REJECT = PROBE.format(rule="reject")
TRACKING = {"nftables": {True: "bridge family (nf_conntrack_bridge)",
                         False: "inet family via br_netfilter, ports carried in the packet mark"},
            "ebiptables": {True: "iptables/ip6tables via br_netfilter (physdev)",
                           False: "iptables/ip6tables via br_netfilter (physdev)"}}


def status(cli) -> dict[str, str]:
    lines = cli.run("status").stdout.splitlines()
    return {label.strip(): value.strip() for label, _, value in (line.partition(":") for line in lines)}


def state_files(cli) -> dict[str, str]:
    """The run directory's state (status fills the kernel probe cache only)."""
    return run_directory_files(cli.rundir)


def kernel_accepts(lab, script: str) -> bool:
    return lab.host_run(["nft", "-c", "-f", "-"], input=script + "\n", check=False).returncode == 0


def test_status_reports_this_kernel_and_these_counts(lab, cli, pair):
    a, b = pair
    conntrack, reject = kernel_accepts(lab, BRIDGE_CONNTRACK), kernel_accepts(lab, BRIDGE_REJECT)
    netlab.sysctl_in(lab.host_ns, {"net.bridge.bridge-nf-call-ip6tables": 0})
    cli.define(filter_xml("nwft-status", "<filterref filter='allow-arp'/>"))
    owner = str(uuid.uuid4())
    for vm in (a, b):
        path = cli.workdir / f"binding-{vm.port}.xml"
        path.write_text(binding_xml(vm.port, vm.mac, "nwft-status", owner_uuid=owner))
        cli.run("binding-create", path)
    kernel, state = kernel_snapshot(lab.host_ns), state_files(cli)

    shown = status(cli)
    assert shown == {
        "Backend": cli.backend,
        "Connection tracking": TRACKING[cli.backend][conntrack],
        "nf_conntrack_bridge": "yes" if conntrack else "no",
        "Reject in bridge tables": "yes" if reject else "no (L2 reject is drop)",
        "bridge-nf-call-iptables": "1",
        "bridge-nf-call-ip6tables": "0 (L3 rules are switched on when a binding needs them)",
        "Filters": "29 (28 built in, 1 defined here)",  # libvirt's 24 and our 4 IPv6 filters
        "Bindings": "2 on 1 owner(s)",
        "Configuration": str(cli.confdir),
        "State": str(cli.rundir),
        "Service": "not running (the hook and the command work in-process; no hot-plug, live metadata or "
                   "self-healing)",  # none was started for this run directory
    }
    assert kernel_snapshot(lab.host_ns) == kernel, "status changed the kernel"
    assert state_files(cli) == state, "status changed the state"

    cli.binding_delete(a.port)
    assert status(cli)["Bindings"] == "1 on 1 owner(s)"
