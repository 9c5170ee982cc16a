"""``nft`` through libnftables (executor.use_nft_library, what the resident service does) against
the ``nft`` process, in a throw-away namespace: the same plans give the same ruleset, a refused
batch the same error (naming the input line and its port), listings the same JSON, and with
changes marked, the kernel names the marked process as the committer while the process keeps
its own name otherwise. The library's cache warmed ahead (as in the service's spare request
process) commits nothing and spares the next batch reading every chain."""

from __future__ import annotations

import json
import subprocess
import sys

import netlab
from bindings_helpers import REPO
from nft_listener import Listener

SCRIPT = r"""
import json, sys
from pathlib import Path
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.errors import FirewallError
sys.path.insert(0, sys.argv[1])
from golden.nftables import cases

library, rundir = sys.argv[2] == "library", sys.argv[3]
if library:
    assert executor.use_nft_library()
if rundir:
    executor.mark_changes(Path(rundir))
backend = NftablesBackend(conntrack="inet")
warm = lambda: executor.warm_nft_cache(backend.warm_up_steps())  # noqa: E731 - nothing without the library
warm()  # before our tables exist: refused, harmlessly
plan, records = backend.plan([PortChange("vp1", None, cases.clean_traffic()), PortChange("vp2", None, cases.root_only())])
executor.execute(plan)
out = {"ruleset": executor.run(executor.Step(("nft", "list", "ruleset"))).stdout}
generation = executor.nft_generation()
warm()
out["warming_committed"] = executor.run(executor.Step(("nft", "list", "ruleset"))).stdout != out["ruleset"] or \
    executor.nft_generation() != generation
warm()
out["listing"] = executor.survey(backend.survey_steps())
stale = dict(records["vp1"], gen=7, chains=[["bridge", "I-7/vp1"]])
refused, _ = backend.plan([PortChange("vp1", stale, cases.root_only())])
try:
    executor.execute(refused)
    out["refused"] = None
except FirewallError as error:
    out["refused"] = str(error)
out["after_refusal"] = executor.run(executor.Step(("nft", "list", "ruleset"))).stdout
out["comm"] = Path("/proc/self/comm").read_text().strip()
executor.execute(backend.teardown_plan([]))
print(json.dumps(out))
"""


def python_in(ns: str, script: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``script`` run to success in namespace ``ns`` (argv: the tests directory, then ``args``)."""
    proc = subprocess.run(netlab.ns_argv(ns, [*prefix, sys.executable, "-c", script, str(REPO / "tests"), *args]),
                          capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                               "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def run(ns: str, mode: str, rundir: str = "") -> dict:
    return json.loads(python_in(ns, SCRIPT, mode, rundir).stdout)


def test_library_and_process_give_the_same_rules_errors_and_listings(lab):
    by_process = run(lab.host_ns, "process")
    by_library = run(lab.host_ns, "library")
    assert "chain I-1/vp1" in by_library["ruleset"]
    assert by_library["ruleset"] == by_process["ruleset"]
    assert not by_library["warming_committed"]  # the cache warming is a dry run
    assert by_library["after_refusal"] == by_library["ruleset"]
    assert by_library["refused"] is not None and "of port vp1 (input line" in by_library["refused"]
    assert by_library["refused"] == by_process["refused"]
    for ours, theirs in zip(by_library["listing"], by_process["listing"], strict=True):
        assert bool(ours) == bool(theirs)
        if not ours:
            continue  # a table of ours this plan did not make (another shard, the former single table)
        assert without_handles(json.loads(ours)["nftables"][1:]) == without_handles(json.loads(theirs)["nftables"][1:])


def without_handles(value):
    """A JSON listing without the kernel's handles (each run made the tables anew); [0] was the
    metainfo."""
    if isinstance(value, dict):
        return {key: without_handles(item) for key, item in value.items() if key != "handle"}
    if isinstance(value, list):
        return [without_handles(item) for item in value]
    return value


def test_library_commits_under_the_marked_name(lab, tmp_path):
    listener = Listener(lab.host_ns)
    try:
        result = run(lab.host_ns, "library", str(tmp_path))
        committed, _ = listener.transactions()
    finally:
        listener.close()
    assert result["comm"] == "python3" or result["comm"].startswith("python")
    assert committed and {t[1] for t in committed} == {"nwfilter-nft"}, committed
    assert not (tmp_path / "nwfilter-nft").exists()  # no nft process, no marked link


READS = r"""
import os, sys
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.nftables import NftablesBackend
sys.path.insert(0, sys.argv[1])
from golden.nftables import cases

assert executor.use_nft_library()
backend = NftablesBackend(conntrack="inet")
executor.execute(backend.plan([PortChange(f"vp{i}", None, cases.clean_traffic()) for i in range(20)])[0])
if sys.argv[2] == "warm":
    executor.warm_nft_cache(backend.warm_up_steps())
    executor._context()  # the warming is over
os.write(2, b"-- batch --\n")
executor.execute(backend.plan([PortChange("vp99", None, cases.clean_traffic())], ids_in_use=[])[0])
os.write(2, b"-- done --\n")
executor.execute(backend.teardown_plan([]))
"""


def chain_reads_of_the_batch(ns: str, mode: str, tmp_path) -> int:
    """How often the process read every chain (NFT_MSG_GETCHAIN) while running one batch."""
    trace = tmp_path / f"{mode}.trace"
    python_in(ns, READS, mode, prefix=("strace", "-e", "trace=sendto,write", "-o", str(trace)))
    text = trace.read_text()
    batch = text[text.index("-- batch --"):text.index("-- done --")]
    return batch.count("NFT_MSG_GETCHAIN")


def test_a_warmed_cache_spares_the_batch_reading_every_chain(lab, tmp_path):
    """What the spare request process gains: libnftables 1.0.6 reads every chain before a batch
    that adds rules and map elements, unless its cache of this generation was filled ahead."""
    assert chain_reads_of_the_batch(lab.host_ns, "cold", tmp_path) >= 1
    assert chain_reads_of_the_batch(lab.host_ns, "warm", tmp_path) == 0
