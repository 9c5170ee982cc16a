"""The contract both backends keep (backends/base.py), digests' common ground, and how a refused
batch is reported: with its failing input line and the port that line serves.

Each backend's digests, listing and inventory on recorded surveys: test_nftables_digests.py and
test_ebiptables_digests.py; against real kernels: tests/kernel/test_digests_kernel.py.
"""

from __future__ import annotations

import inspect
import typing

import pytest

from golden.ebiptables import cases as eb_cases
from golden.nftables import cases as nft_cases
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import Backend, Batch, Plan, PortChange, Step, canonical_digest
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.errors import FirewallError

BACKENDS = [NftablesBackend(), EbiptablesBackend()]
IDS = ["nftables", "ebiptables"]


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_both_backends_keep_the_whole_contract(backend):
    """Every method of the contract, with its parameters; every attribute; nothing to probe."""
    methods = [name for name, member in vars(Backend).items() if inspect.isfunction(member) and name[0] != "_"]
    assert {"plan", "rebuild_plan", "teardown_plan", "survey_steps", "kernel_digests", "kernel_ports",
            "inventory"} <= set(methods)
    for name in methods:
        ours = inspect.signature(getattr(backend, name))
        proto = inspect.signature(getattr(Backend, name))
        assert list(ours.parameters) == list(proto.parameters)[1:], name
    for attribute, kind in typing.get_type_hints(Backend).items():
        assert isinstance(getattr(backend, attribute), kind), attribute
    # applying a change computes no digest: the reference kernel gives the expected ones
    assert not hasattr(Backend, "applied_digests") and not hasattr(backend, "applied_digests")
    assert all(step.ignore_errors for step in backend.survey_steps())


def test_canonical_digest():
    assert canonical_digest({"b": 1, "a": [1, "x"]}) == canonical_digest({"a": [1, "x"], "b": 1})
    assert len(canonical_digest(None)) == 64


def test_batch_remembers_the_port_of_each_line():
    batch = Batch("*filter")
    assert not batch
    batch.add(["-N x"])  # serves no port
    batch.add(["-A a1", "-A a2"], "vp1")
    batch.add([], "vp9")  # nothing added: no block
    batch.add(["-A b1"], "vp2")
    batch.add(["-A b2"], "vp2")
    assert batch
    step = batch.step(("iptables-restore",), "COMMIT")
    assert step.stdin == "*filter\n-N x\n-A a1\n-A a2\n-A b1\n-A b2\nCOMMIT\n"
    assert [step.port_of_line(n) for n in range(1, 9)] == ["", "", "vp1", "vp1", "vp2", "vp2", "", ""]
    assert Batch().step(("nft", "-f", "-")) == Step(("nft", "-f", "-"), "\n")


@pytest.mark.parametrize("backend, ruleset", [(BACKENDS[0], nft_cases.ssh_to_a), (BACKENDS[1], eb_cases.mixed)],
                         ids=IDS)
def test_every_line_of_a_port_is_owned_by_it(backend, ruleset):
    """In the plans of a change of two ports, every input line naming one port's chain or
    interface serves that port (the nftables chain names read ``-N/vp1``)."""
    _, records = backend.plan([PortChange("vp1", None, ruleset()), PortChange("vp2", None, ruleset())], [])
    plan, _ = backend.plan([PortChange("vp1", records["vp1"], ruleset()), PortChange("vp2", records["vp2"], None)], [])
    seen = set()
    for step in plan.apply + plan.commit + plan.rollback:
        for number, line in enumerate(step.stdin.splitlines(), 1):
            for port in ("vp1", "vp2"):
                if f"/{port}" in line or f"-{port}" in line or f" {port} " in line or f'"{port}"' in line:
                    assert step.port_of_line(number) == port, line
                    seen.add(port)
    assert seen == {"vp1", "vp2"}


def _refused(step: Step, stderr: str) -> str:
    """The error of the executor running ``step`` as a tool that prints ``stderr`` and fails."""
    script = "cat >/dev/null; printf '%s' \"$1\" >&2; exit 1"
    tool = Step(("sh", "-c", script, "sh", stderr), step.stdin, owners=step.owners)
    with pytest.raises(FirewallError) as info:
        executor.execute(Plan(apply=(tool,)))
    return str(info.value).replace("sh refused", f"{step.argv[0]} refused", 1)


def test_a_refused_line_is_named_with_its_port():
    batch = Batch("# a batch")
    batch.add(["add table bridge t"])
    batch.add(["# port vp1: generation 2", "flush chain bridge t I-7/vp1", "delete chain bridge t I-7/vp1"], "vp1")
    nft = batch.step(("nft", "-f", "-"))
    message = _refused(nft, "/dev/stdin:4:37-43: Error: No such file or directory\nflush chain …\n   ^^^^\n")
    assert message.startswith("nft refused the change of port vp1 (input line 4: flush chain bridge t I-7/vp1): "
                              "/dev/stdin:4:37-43: Error: No such file or directory")
    assert "of port" not in _refused(nft, "/dev/stdin:2:1-3: Error: oops")  # a line serving no port
    assert "input line 2: add table bridge t" in _refused(nft, "/dev/stdin:2:1-3: Error: oops")
    restore = Batch("*filter")
    restore.add([":NFJ-vp2 - [0:0]", "-A NFJ-vp2 -m set --match-set nope src -j DROP"], "vp2")
    step = restore.step(("iptables-restore", "-w", "--noflush"), "COMMIT")
    parser = "iptables-restore v1.8.9 (nf_tables): Set nope doesn't exist.\n\nError occurred at line: 3\n"
    assert "change of port vp2 (input line 3: -A NFJ-vp2 -m set" in _refused(step, parser)
    assert "change of port vp2 (input line 2: :NFJ-vp2" in _refused(step, "iptables-restore: line 2 failed: Bad rule")
    # no line named (ebtables' "final implicit COMMIT failed"), or one beyond the input: the message alone
    assert _refused(step, "ebtables-restore: final implicit COMMIT failed") == \
        "iptables-restore refused the change: ebtables-restore: final implicit COMMIT failed"
    assert _refused(step, "line 99 failed") == "iptables-restore refused the change: line 99 failed"
