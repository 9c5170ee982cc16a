"""Damaged files in the run directory: no port loses its rules, ``verify`` names the file, and
the documented repair works. Real kernel, real frames, both backends side by side (each in a lab
of its own, tests/crashlab.py).

The lab: guest ``one`` (hook ``start``) on vp1, a CLI binding on vp2, both clean-traffic with
their address; guest ``other`` on vp3 comes and goes through the hook while the files are
damaged. Every case damages one file and then checks:

* binding records (truncated, empty, a JSON list, a field missing, a binding XML that does not
  parse, a symbolic link; more shapes in tests/unit/test_reliability.py): ``verify`` exits 1
  with a line naming the file, the problem and the repair; the repair is alternately
  ``binding-delete --force vp1`` (the port's rules go with the record; the guest is started
  again) and the hook's ``reconnect`` (the binding is derived again from the running guest:
  what ``reapply GUEST`` does), after which ``verify`` passes. The first case also checks that
  every rebuild keeps vp1's objects exactly as they were (every chain, rule, set and dispatch
  entry of it in ``nft -a -j list ruleset``, handles included: none was re-created) and its
  traffic filtered, while it rebuilds the others: ``reapply`` (vp2's rules removed by hand
  first come back), the hook's ``reconnect`` of another guest whose rules were removed by
  hand, and the recovery of that guest's ``start`` SIGKILLed as it started its last kernel
  transaction (completed by ``verify``); ``verify`` names the file after each; and that
  ``binding-create`` on the port is refused naming the file and ``stopped`` of its guest
  keeps its rules;
* the index (truncated, empty, a JSON list, entries of the wrong shape, a symbolic link,
  missing, valid but without an entry): ``verify`` exits 1 naming it and rebuilds it as it was;
  damaged or missing, ``stopped`` still finds the guest's binding;
* the journal (truncated, empty, a JSON list, a symbolic link; content that does not parse in
  tests/unit/test_reliability.py): ``verify`` exits 1 naming it and the repair;
  ``binding-list`` works (and ``list``, ``dumpxml``, an unrelated guest's ``start`` and
  ``stopped`` in the first case); the bindings keep their rules; the repair ``reapply`` removes
  it and ``verify`` passes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bindings_helpers import IP_A, IP_B, MAC_A, MAC_B, Cli, dispatch_entries, ip_frame, port_items
from crashlab import KillLab, side_by_side
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.nftables import NftablesBackend
from traffic import Probe, check_frames

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
MAC_C, IP_C = "52:54:00:00:00:03", "10.0.0.4"
PEER_MAC, PEER_IP = "52:54:00:00:01:99", "10.0.0.99"
SPOOF = "10.0.0.77"
GUESTS = {"one": "0b8f6b5e-4c59-4b0e-9d3c-6a1f2e7d8c01", "other": "0b8f6b5e-4c59-4b0e-9d3c-6a1f2e7d8c02"}


def domain_xml(name: str, mac: str, tap: str, ip: str, running: bool = True) -> bytes:
    target = f"<target dev='{tap}'/>" if running else ""
    return (f"<domain type='kvm'><name>{name}</name><uuid>{GUESTS[name]}</uuid><metadata>"
            f"<nwf:nwfilter xmlns:nwf='{NS}'><nwf:interface mac='{mac}'><nwf:filterref filter='clean-traffic'>"
            f"<nwf:parameter name='IP' value='{ip}'/></nwf:filterref></nwf:interface></nwf:nwfilter>"
            f"</metadata><devices><interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
            f"{target}</interface></devices></domain>").encode()


@dataclass
class World:
    lab: object
    cli: Cli
    run: KillLab
    vms: dict

    def hook(self, guest: str, operation: str, running: bool = True) -> str:
        vm = self.vms["a" if guest == "one" else "c"]
        done = self.run.run([guest, operation, "begin", "-"], hook=True,
                            stdin=domain_xml(guest, vm.mac, vm.port, vm.ipv4, running))
        assert done.returncode == 0, f"hook {operation} of {guest}: {done.stderr.decode()}"
        return done.stderr.decode()

    def probes(self, filtered: bool = True, names: tuple[str, ...] = ("a", "b"),
               unfiltered: tuple[str, ...] = ()) -> list[Probe]:
        """Each VM's own address passes; a spoofed one is dropped where the VM is ``filtered``
        and not named in ``unfiltered``."""
        peer, found = self.vms["p"], []
        for name in names:
            vm = self.vms[name]
            found += [Probe(f"{name}, its address", vm, ip_frame(vm.mac, peer.mac, vm.ipv4, PEER_IP, "udp"), peer, True),
                      Probe(f"{name}, spoofed", vm, ip_frame(vm.mac, peer.mac, SPOOF, PEER_IP, "udp"), peer,
                            not filtered or name in unfiltered)]
        return found

    def record(self, port: str = "vp1") -> Path:
        return self.cli.rundir / "bindings" / f"{port}.json"


def make_world(lab, cli: Cli) -> World:
    vms = {"a": lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24"), "b": lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24"),
           "c": lab.add_vm("c", MAC_C, ipv4=f"{IP_C}/24"), "p": lab.add_vm("p", PEER_MAC, ipv4=f"{PEER_IP}/24")}
    world = World(lab, cli, KillLab(cli), vms)
    world.hook("one", "start")
    cli.binding_create("vp2", MAC_B, "clean-traffic", {"IP": IP_B})
    check_frames(lab, world.probes(), context=f"[{cli.backend}] before any damage")
    return world


def expect_verify(world: World, subject: str, *words: str) -> str:
    done = world.cli.run("verify", check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"{subject}: ")]
    assert done.returncode == 1 and lines and all(word in lines[0] for word in words), \
        f"[{world.cli.backend}] verify did not name {subject} ({words}):\n{done.stdout}{done.stderr}"
    return lines[0]


def verify_passes(world: World, context: str) -> None:
    done = world.cli.run("verify", check=False)
    assert done.returncode == 0, f"[{world.cli.backend}] {context}: verify exited {done.returncode}\n" \
                                 f"{done.stdout}{done.stderr}"


def symlink_to_copy(path: Path) -> None:
    """``path`` becomes a symbolic link to a copy of itself (the content stays valid)."""
    copy = path.with_name(f"copy-of-{path.name}.bak")
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)


# ----------------------------------------------------------------------------------------------
# Binding records

def _without(field: str):
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        del data[field]
        path.write_text(json.dumps(data))
    return damage


def _bad_binding(path: Path) -> None:
    data = json.loads(path.read_text())
    data["binding"] = "<filterbinding><owner>"
    path.write_text(json.dumps(data))


RECORD_CASES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is not valid JSON"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "a JSON list": (lambda p: p.write_text("[]\n"), "does not hold a JSON object"),
    "a field missing": (_without("record"), "has no 'record' field"),
    "a binding XML that does not parse": (_bad_binding, "holds a binding that does not parse"),
    "a symbolic link": (symlink_to_copy, "is a symbolic link"),
}


def remove_by_hand(world: World, port: str) -> None:
    """Delete every object of ours of ``port`` from the kernel behind the tool's back."""
    backend = NftablesBackend() if world.cli.backend == "nftables" else EbiptablesBackend()
    held = backend.inventory(executor.survey(backend.survey_steps(), world.lab.host_ns))
    plan, _ = backend.plan([PortChange(port, held[port], None)], [])
    executor.execute(plan, world.lab.host_ns)
    assert port not in dispatch_entries(world.lab.host_ns, world.cli.backend)


def kept_by_every_rebuild(world: World, path: Path, problem: str) -> None:
    """vp1's record is damaged: each rebuild keeps vp1 as the kernel holds it, rebuilds the rest."""
    lab, cli = world.lab, world.cli
    context = f"[{cli.backend}] damaged record of vp1"
    check_frames(lab, world.probes(), context=f"{context}: before")
    held = port_items(lab.host_ns, "vp1")
    assert any("vp1" in item for item in held)

    def still_kept(step: str) -> None:
        assert port_items(lab.host_ns, "vp1") == held, f"{context}: {step} touched vp1's objects"
        expect_verify(world, "vp1", str(path), problem, "binding-delete --force vp1")

    # reapply: vp2's rules, removed by hand, come back; vp1's stay as they are
    remove_by_hand(world, "vp2")
    check_frames(lab, world.probes(unfiltered=("b",)), context=f"{context}: vp2's rules removed by hand")
    done = cli.run("reapply")
    assert str(path) in done.stderr and "rules are left as they are" in done.stderr, f"{context}: {done.stderr}"
    check_frames(lab, world.probes(), context=f"{context}: after reapply")
    still_kept("reapply")
    # the hook's reconnect of another guest whose rules were removed by hand
    world.hook("other", "start")
    remove_by_hand(world, "vp3")
    world.hook("other", "reconnect")
    check_frames(lab, world.probes(names=("a", "b", "c")), context=f"{context}: after reconnect of the other guest")
    still_kept("reconnect of the other guest")
    world.hook("other", "stopped", running=False)
    # recovery: the other guest's start killed as it starts its last kernel transaction
    args, xml = ["other", "start", "begin", "-"], domain_xml("other", MAC_C, "vp3", IP_C)
    steps = world.run.steps(args, hook=True, stdin=xml)
    world.hook("other", "stopped", running=False)
    last = [step for step in steps if step.syscall == "vfork" and ("restore" in step.what or "nft" in step.what)][-1]
    killed = world.run.run_killed(args, last, hook=True, stdin=xml)
    assert killed.returncode == -9 and world.run.journal.exists(), f"{context}: killed at {last}: {killed}"
    verify = cli.run("verify", check=False)
    assert verify.returncode == 1 and "completing the interrupted" in verify.stderr, f"{context}: {verify}"
    assert not world.run.journal.exists() and "vp3" in dispatch_entries(lab.host_ns, cli.backend), context
    check_frames(lab, world.probes(names=("a", "b", "c")), context=f"{context}: after the recovery")
    still_kept(f"the recovery of a start killed at {last}")
    world.hook("other", "stopped", running=False)
    # no binding on the port until the record is repaired; its guest's teardown keeps its rules
    created = cli.binding_create("vp1", MAC_A, "clean-traffic", {"IP": IP_A}, check=False)
    assert created.returncode == 1 and str(path) in created.stderr, f"{context}: {created}"
    world.hook("one", "stopped", running=False)
    still_kept("stopped of its guest")
    check_frames(lab, world.probes(), context=f"{context}: at the end")


def damaged_records(world: World) -> None:
    lab, cli, path = world.lab, world.cli, world.record()
    for number, (case, (damage, problem)) in enumerate(RECORD_CASES.items()):
        context = f"[{cli.backend}] record {case}"
        damage(path)
        line = expect_verify(world, "vp1", str(path), problem, "binding-delete --force vp1", "reapply GUEST")
        if number == 0:  # what a damaged record does not change is the same whatever the damage
            kept_by_every_rebuild(world, path, problem)
        if number % 2 == 0:
            cli.run("binding-delete", "--force", "vp1")
            assert not path.exists() and not path.is_symlink(), context
            assert dispatch_entries(lab.host_ns, cli.backend) == {"vp2"}, f"{context}: after --force"
            world.hook("one", "start")
        else:
            world.hook("one", "reconnect")
        assert path.is_file() and not path.is_symlink(), context
        verify_passes(world, f"{context}: after the repair")
        print(f"  [{cli.backend}] record {case}: {line[:150]}...")
    check_frames(lab, world.probes(), context=f"[{cli.backend}] after the repairs")


# ----------------------------------------------------------------------------------------------
# The index

def _stale(path: Path) -> None:
    data = json.loads(path.read_text())
    del data["vp1"]
    path.write_text(json.dumps(data))


INDEX_CASES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:10]), "is not valid JSON"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "a JSON list": (lambda p: p.write_text("[]"), "does not have the expected shape"),
    "entries of the wrong shape": (lambda p: p.write_text('{"vp1": 5}'), "does not have the expected shape"),
    "a symbolic link": (symlink_to_copy, "is a symbolic link"),
    "missing": (lambda p: p.unlink(), "is missing"),
    "without an entry": (_stale, "does not match the binding files"),
}


def damaged_index(world: World) -> None:
    lab, cli = world.lab, world.cli
    path = cli.rundir / "index.json"
    intact = json.loads(path.read_text())
    for case, (damage, problem) in INDEX_CASES.items():
        damage(path)
        expect_verify(world, str(path), problem, "rebuilt from the binding files")
        assert path.is_file() and not path.is_symlink() and json.loads(path.read_text()) == intact, \
            f"[{cli.backend}] index {case}: not rebuilt"
        if case in ("truncated", "missing"):
            damage(path)
            world.hook("one", "stopped", running=False)
            assert not world.record().exists(), f"[{cli.backend}] index {case}: stopped missed the guest's binding"
            assert dispatch_entries(lab.host_ns, cli.backend) == {"vp2"}
            world.hook("one", "start")
            intact = json.loads(path.read_text())
    verify_passes(world, "after the index cases")
    check_frames(lab, world.probes(), context=f"[{cli.backend}] after the index cases")


# ----------------------------------------------------------------------------------------------
# The journal

VALID_JOURNAL = {"format": 1, "command": "binding-create", "writer": "1 test", "filter": None, "teardown": [],
                 "ports": {"vp9": {"old": None, "new": None}}}


def _journal_symlink(path: Path) -> None:
    path.write_text(json.dumps(VALID_JOURNAL))
    symlink_to_copy(path)


JOURNAL_CASES = {
    "truncated": (lambda p: p.write_text(json.dumps(VALID_JOURNAL)[:40]), "is not valid JSON"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "a JSON list": (lambda p: p.write_text("[]"), "does not have the expected content"),
    "a symbolic link": (_journal_symlink, "is a symbolic link"),
}


def damaged_journal(world: World) -> None:
    lab, cli = world.lab, world.cli
    path = cli.rundir / "journal.json"
    for number, (case, (damage, problem)) in enumerate(JOURNAL_CASES.items()):
        context = f"[{cli.backend}] journal {case}"
        damage(path)
        expect_verify(world, str(path), problem, "libvirt-nwfilter reapply")
        assert cli.binding_ports() == ["vp1", "vp2"], context
        if number == 0:
            for args in (("list",), ("dumpxml", "clean-traffic")):
                done = cli.run(*args, check=False)
                assert done.returncode == 0 and done.stdout, f"{context}: {args}: {done.stderr}"
            world.hook("other", "start")
            assert dispatch_entries(lab.host_ns, cli.backend) == {"vp1", "vp2", "vp3"}, context
            world.hook("other", "stopped", running=False)
            check_frames(lab, world.probes(), context=f"{context}: an unrelated guest came and went")
        assert dispatch_entries(lab.host_ns, cli.backend) == {"vp1", "vp2"}, context
        repaired = cli.run("reapply")
        assert "removed the damaged journal" in repaired.stderr, f"{context}: {repaired.stderr}"
        assert not path.exists() and not path.is_symlink(), context
        verify_passes(world, f"{context}: after the repair")
    check_frames(lab, world.probes(), context=f"[{cli.backend}] after the journal cases")


# ----------------------------------------------------------------------------------------------

CHECKS = {"binding record": (damaged_records, RECORD_CASES), "index": (damaged_index, INDEX_CASES),
          "journal": (damaged_journal, JOURNAL_CASES)}


@pytest.mark.parametrize("kind", list(CHECKS))
def test_damaged_files(lab, tmp_path, kind):
    check, cases = CHECKS[kind]

    def run(where, cli: Cli) -> str:
        started = time.monotonic()
        check(make_world(where, cli))
        return f"[{cli.backend}] {len(cases)} damaged {kind} cases, {time.monotonic() - started:.1f} s"

    side_by_side(lab, tmp_path, run)
