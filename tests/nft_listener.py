"""A process in a namespace that reads the kernel's nf_tables notifications as the service does
(executor.nft_notifications, backends/nftables/notices.py) and reports the transactions."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import netlab
from bindings_helpers import REPO

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
