"""The kernel's nf_tables notifications as the service reads them: our changes are told apart
from anyone else's by the process name, each transaction names the ports it touched, and the
generation read on demand is the one the last notification announced."""

from __future__ import annotations

import json

from bindings_helpers import Cli, binding_xml
from nft_listener import Listener
from libvirt_nwfilter.backends.nftables.names import shard_of


def test_our_changes_and_foreign_ones_as_the_kernel_announces_them(lab, tmp_path):
    port = lab.add_vm("a", "52:54:00:00:00:01").port
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    listener = Listener(lab.host_ns)
    try:
        cli.run("binding-create", "-", input=binding_xml(port, "52:54:00:00:00:01", "clean-traffic", {"IP": "10.0.0.1"}))
        ours, generation = listener.transactions()
        assert [t[1:3] for t in ours] == [["nwfilter-nft", [port]]], ours
        assert generation == ours[-1][0]

        chain = next(c for c in json.loads(lab.host_run(["nft", "-j", "list", "chains", "bridge"]).stdout)["nftables"]
                     if "chain" in c and c["chain"]["name"].endswith(f"/{port}/mac"))["chain"]["name"]
        lab.host_run(["nft", "flush", "chain", "bridge", shard_of(port), chain])
        lab.host_run(["nft", "add", "table", "ip", "someone_else"])
        lab.host_run(["nft", "flush", "ruleset"])
        foreign, generation = listener.transactions()
        assert [t[1:] for t in foreign] == [["nft", [port], False, False], ["nft", [], False, False],
                                            ["nft", [port], True, True]], foreign
        assert generation == foreign[-1][0] and [t[0] for t in foreign] == list(range(ours[-1][0] + 1, generation + 1))
    finally:
        listener.close()
