"""The kernel's nf_tables notifications as the service reads them: our changes are told apart
from anyone else's by the process name, each transaction names the ports it touched, and the
generation read on demand is the one the last notification announced."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import netlab
from bindings_helpers import REPO, Cli, binding_xml

LISTENER = """
import json, sys
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.nftables.notices import Transactions
sock = executor.nft_notifications()
sock.settimeout(0.2)
print("ready", flush=True)
grouping = Transactions()
while sys.stdin.readline().strip() != "stop":
    while True:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            break
        for t in grouping.feed(data):
            print(json.dumps([t.generation, t.process, sorted(t.ports), t.shared, t.deleted_table]), flush=True)
    print("generation", executor.nft_generation(), flush=True)
    print("done", flush=True)
"""


class Listener:
    def __init__(self, ns: str):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(netlab.ns_argv(ns, [sys.executable, "-c", LISTENER]), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"

    def transactions(self) -> tuple[list[list], int]:
        """Everything received so far, and the generation read afterwards."""
        time.sleep(0.3)
        self.proc.stdin.write("next\n")
        self.proc.stdin.flush()
        found, generation = [], None
        while (line := self.proc.stdout.readline().strip()) != "done":
            if line.startswith("generation"):
                generation = int(line.split()[1])
            else:
                found.append(json.loads(line))
        return found, generation

    def close(self) -> None:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


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
        lab.host_run(["nft", "flush", "chain", "bridge", "libvirt_nwfilter", chain])
        lab.host_run(["nft", "add", "table", "ip", "someone_else"])
        lab.host_run(["nft", "flush", "ruleset"])
        foreign, generation = listener.transactions()
        assert [t[1:] for t in foreign] == [["nft", [port], False, False], ["nft", [], False, False],
                                            ["nft", [port], True, True]], foreign
        assert generation == foreign[-1][0] and [t[0] for t in foreign] == list(range(ours[-1][0] + 1, generation + 1))
    finally:
        listener.close()
