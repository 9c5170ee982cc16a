"""SIGKILL at EVERY step of a change: the journal makes the next command converge.

For each command below, once per backend, in a real lab (VM ``a`` on vp1, VM ``b`` on vp2, an
unfiltered peer): the "before" state is built and saved, the command's steps are enumerated
with strace (tests/crashlab.py: every ``rename``, ``unlink`` and ``vfork`` of its own process,
i.e. every file write, file removal and kernel transaction or listing), then for EVERY step the
state is put back and the command SIGKILLed as it enters that step. Afterwards:

* killed before the journal was written: the kernel holds exactly what it held before (a
  snapshot of every table) and no journal exists;
* killed after: the journal exists;
* ``verify`` tells the truth: exit 0 ("completing the interrupted ..." when a journal was left:
  the change was rolled forward, the records say "after"), or for ``reapply`` killed before its
  journal, exit 1 naming the ports whose rules differ from their filters' definitions (the
  records say "before");
* the next command converges: where the records still say "before", the same command run
  again succeeds and they say "after";
* real frames then show the intended rules only: the new address passes, the OLD address is
  dropped (a generation of the old rules left in front of the new ones would let it through),
  each negative check with its positive twin in the same batch.

Commands: ``binding-create``; hook ``start`` with one interface (its tap still has the binding
of an earlier run with the old address) and with two; hook ``stopped``; ``define`` of a filter
in use; ``reapply`` after the filter file changed behind the tool's back, and the same with
vp2's record damaged (the rebuild lists the kernel to keep vp2: one more step): there ``verify``
always names the file too, and vp2's objects stay exactly as they were (``nft -a``, handles
included) after every kill and recovery, its old rules still deciding its frames. The number of
steps per command and backend is printed (``-s``) with where each kill landed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from bindings_helpers import IP_A, IP_A2, IP_B, MAC_A, MAC_B, Cli, filter_xml, ip_frame, port_items
from crashlab import KillLab, normalized, side_by_side
from traffic import Probe, check_frames

OLD, NEW = IP_A, IP_A2  # VM a's address before and after the change
SPOOF = "10.0.0.77"
PEER_MAC, PEER_IP = "52:54:00:00:01:99", "10.0.0.99"
GUEST, GUEST_UUID = "crashguest", "5b1f0c0e-8a57-4a57-9a3b-2f7d1c6e9a01"
NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"


def drop_from(address: str) -> str:
    """Filter ``crash-ip``: drops IPv4 from ``address`` (the rest passes)."""
    return filter_xml("crash-ip", f"<rule action='drop' direction='out' priority='100'>"
                                  f"<ip srcipaddr='{address}'/></rule>")


def domain_xml(nics: dict[str, tuple[str, str]], running: bool = True) -> bytes:
    """The guest with interfaces ``{mac: (tap, IP)}``, filtered by clean-traffic; ``running``
    False gives the inactive form libvirt passes to ``stopped`` (no target names)."""
    entries = "".join(f"<nwf:interface mac='{mac}'><nwf:filterref filter='clean-traffic'>"
                      f"<nwf:parameter name='IP' value='{ip}'/></nwf:filterref></nwf:interface>"
                      for mac, (_, ip) in nics.items())
    devices = "".join(f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
                      + (f"<target dev='{tap}'/>" if running else "") + "</interface>"
                      for mac, (tap, _) in nics.items())
    return (f"<domain type='kvm'><name>{GUEST}</name><uuid>{GUEST_UUID}</uuid>"
            f"<metadata><nwf:nwfilter xmlns:nwf='{NS}'>{entries}</nwf:nwfilter></metadata>"
            f"<devices>{devices}</devices></domain>").encode()


@dataclass
class Ctx:
    lab: object
    cli: object
    kill: KillLab
    a: object
    b: object
    peer: object
    hashes: dict = field(default_factory=dict)  # the records' ruleset hashes -> "before"/"after"
    scenario: object = None

    def record_ip(self, port: str) -> str | None:
        """The IP parameter of the record of ``port`` (None: no record)."""
        path = self.cli.rundir / "bindings" / f"{port}.json"
        if not path.exists():
            return None
        found = re.search(r"name='IP' value='([^']*)'", json.loads(path.read_text())["binding"])
        return found.group(1) if found else ""

    def hook(self, operation: str, xml: bytes) -> None:
        done = self.kill.run([GUEST, operation, "begin", "-"], hook=True, stdin=xml)
        assert done.returncode == 0, done.stderr.decode()


def new_address_only(ctx: Ctx, with_b: bool = False) -> list[Probe]:
    a, b, peer = ctx.a, ctx.b, ctx.peer
    probes = [Probe("a, new address", a, ip_frame(a.mac, peer.mac, NEW, PEER_IP, "udp"), peer, True),
              Probe("a, old address", a, ip_frame(a.mac, peer.mac, OLD, PEER_IP, "udp"), peer, False)]
    if with_b:
        probes += [Probe("b, its address", b, ip_frame(b.mac, peer.mac, IP_B, PEER_IP, "udp"), peer, True),
                   Probe("b, spoofed", b, ip_frame(b.mac, peer.mac, SPOOF, PEER_IP, "udp"), peer, False)]
    return probes


def unfiltered(ctx: Ctx) -> list[Probe]:
    a, b, peer = ctx.a, ctx.b, ctx.peer
    return [Probe("a, old address", a, ip_frame(a.mac, peer.mac, OLD, PEER_IP, "udp"), peer, True),
            Probe("b, spoofed", b, ip_frame(b.mac, peer.mac, SPOOF, PEER_IP, "udp"), peer, True),
            Probe("b, its address", b, ip_frame(b.mac, peer.mac, IP_B, PEER_IP, "udp"), peer, True)]


@dataclass(frozen=True)
class Scenario:
    """A command, how to reach its "before" state, how the records say "before"/"after", and
    the frames of the "after" state."""

    prepare: Callable[[Ctx], None]
    args: Callable[[Ctx], list]
    world: Callable[[Ctx], str | None]  # "before", "after", or None for anything else
    probes: Callable[[Ctx], list[Probe]]
    hook_stdin: Callable[[Ctx], bytes] | None = None
    drift_before: str | None = None  # what verify reports while the records say "before"
    hashes: Callable[[Ctx], frozenset] | None = None  # the records' hashes that tell before from after
    damaged: str | None = None  # a port whose record is damaged (kept by every rebuild)


def _create_prepare(ctx: Ctx) -> None:
    pass


def _create_args(ctx: Ctx) -> list:
    return ["binding-create", ctx.cli.binding_file(ctx.a.port, ctx.a.mac, "clean-traffic", {"IP": NEW})]


def _ip_world(ctx: Ctx, before: dict[str, str | None], after: dict[str, str | None]) -> str | None:
    now = {port: ctx.record_ip(port) for port in before}
    return "before" if now == before else "after" if now == after else None


def _start_prepare(ctx: Ctx) -> None:
    ctx.hook("start", domain_xml({ctx.a.mac: (ctx.a.port, OLD)}))


def _stopped_prepare(ctx: Ctx) -> None:
    ctx.hook("start", domain_xml({ctx.a.mac: (ctx.a.port, NEW), ctx.b.mac: (ctx.b.port, IP_B)}))


def _define_prepare(ctx: Ctx) -> None:
    ctx.cli.define(drop_from(NEW))
    ctx.cli.binding_create(ctx.a.port, ctx.a.mac, "crash-ip")


def _reapply_prepare(ctx: Ctx) -> None:
    _define_prepare(ctx)
    ctx.cli.binding_create(ctx.b.port, ctx.b.mac, "crash-ip")
    path = ctx.cli.confdir / "filters" / "crash-ip.xml"
    path.write_text(path.read_text().replace(NEW, OLD))  # behind the tool's back


def _stored_filter_world(ctx: Ctx) -> str | None:
    text = (ctx.cli.confdir / "filters" / "crash-ip.xml").read_text()
    return "after" if f"'{OLD}'" in text else "before" if f"'{NEW}'" in text else None


def _hashes(ctx: Ctx, vms: tuple[str, ...] = ("a", "b")) -> frozenset:
    return frozenset(json.loads((ctx.cli.rundir / "bindings" / f"{getattr(ctx, vm).port}.json").read_text())["hash"]
                     for vm in vms)


def _hash_a(ctx: Ctx) -> frozenset:
    return _hashes(ctx, ("a",))


def _hashes_world(ctx: Ctx) -> str | None:
    return ctx.hashes.get(ctx.scenario.hashes(ctx))


def _reapply_keeping_prepare(ctx: Ctx) -> None:
    _reapply_prepare(ctx)
    (ctx.cli.rundir / "bindings" / f"{ctx.b.port}.json").write_text("{")  # truncated


def _kept_b(ctx: Ctx) -> list[Probe]:
    """b keeps the rules applied before the filter changed: NEW is dropped, OLD passes."""
    b, peer = ctx.b, ctx.peer
    return [Probe("b (kept), new address of a", b, ip_frame(b.mac, peer.mac, NEW, PEER_IP, "udp"), peer, False),
            Probe("b (kept), old address of a", b, ip_frame(b.mac, peer.mac, OLD, PEER_IP, "udp"), peer, True)]


SCENARIOS = {
    "binding-create": Scenario(
        _create_prepare, _create_args,
        lambda ctx: _ip_world(ctx, {"vp1": None}, {"vp1": NEW}),
        new_address_only),
    "hook start, one interface": Scenario(
        _start_prepare, lambda ctx: [GUEST, "start", "begin", "-"],
        lambda ctx: _ip_world(ctx, {"vp1": OLD}, {"vp1": NEW}),
        new_address_only, hook_stdin=lambda ctx: domain_xml({ctx.a.mac: (ctx.a.port, NEW)})),
    "hook start, two interfaces": Scenario(
        _start_prepare, lambda ctx: [GUEST, "start", "begin", "-"],
        lambda ctx: _ip_world(ctx, {"vp1": OLD, "vp2": None}, {"vp1": NEW, "vp2": IP_B}),
        lambda ctx: new_address_only(ctx, with_b=True),
        hook_stdin=lambda ctx: domain_xml({ctx.a.mac: (ctx.a.port, NEW), ctx.b.mac: (ctx.b.port, IP_B)})),
    "hook stopped": Scenario(
        _stopped_prepare, lambda ctx: [GUEST, "stopped", "end", "-"],
        lambda ctx: _ip_world(ctx, {"vp1": NEW, "vp2": IP_B}, {"vp1": None, "vp2": None}),
        unfiltered,
        hook_stdin=lambda ctx: domain_xml({ctx.a.mac: (ctx.a.port, NEW), ctx.b.mac: (ctx.b.port, IP_B)},
                                          running=False)),
    "define of a filter in use": Scenario(
        _define_prepare, lambda ctx: ["define", ctx.cli._file("crash-ip-v2", drop_from(OLD))],
        _stored_filter_world, new_address_only),
    "reapply after the filter changed": Scenario(
        _reapply_prepare, lambda ctx: ["reapply"], _hashes_world,
        lambda ctx: new_address_only(ctx)
        + [Probe("b, old address of a", ctx.b, ip_frame(ctx.b.mac, ctx.peer.mac, OLD, PEER_IP, "udp"), ctx.peer,
                 False),
           Probe("b, new address of a", ctx.b, ip_frame(ctx.b.mac, ctx.peer.mac, NEW, PEER_IP, "udp"), ctx.peer,
                 True)],
        drift_before="applied rules differ from its filters' definitions", hashes=_hashes),
    "reapply keeping a port whose record is damaged": Scenario(
        _reapply_keeping_prepare, lambda ctx: ["reapply"], _hashes_world,
        lambda ctx: new_address_only(ctx) + _kept_b(ctx),
        drift_before="applied rules differ from its filters' definitions", hashes=_hash_a, damaged="vp2"),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_at_every_step(lab, tmp_path, name):
    """Both backends side by side, each in a lab of its own (half the wall time)."""
    side_by_side(lab, tmp_path, lambda where, cli: run_scenario(where, cli, name))


def run_scenario(lab, cli: Cli, name: str) -> str:
    """Every kill point of scenario ``name`` in ``lab``; the table of where the kills landed."""
    scenario = SCENARIOS[name]
    started = time.monotonic()
    a = lab.add_vm("a", MAC_A, ipv4=f"{OLD}/24")
    b = lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24")
    peer = lab.add_vm("p", PEER_MAC, ipv4=f"{PEER_IP}/24")
    ctx = Ctx(lab, cli, KillLab(cli), a, b, peer, scenario=scenario)
    cli.run("status")  # the kernel's capabilities are probed (and cached) once per boot: not here
    scenario.prepare(ctx)
    kill = ctx.kill
    kill.save()
    kill.restore()
    reference = kill.snapshot()
    kept = port_items(lab.host_ns, scenario.damaged) if scenario.damaged else None
    args = scenario.args(ctx)
    hook = scenario.hook_stdin is not None
    stdin = scenario.hook_stdin(ctx) if hook else None
    if scenario.hashes:
        ctx.hashes[scenario.hashes(ctx)] = "before"

    steps = kill.steps(args, hook, stdin)
    if scenario.hashes:
        ctx.hashes[scenario.hashes(ctx)] = "after"
    assert scenario.world(ctx) == "after", "the undisturbed command did not reach the after state"
    assert kept is None or port_items(lab.host_ns, scenario.damaged) == kept, "the kept port's objects changed"
    assert steps and steps[0].syscall == "rename" and steps[0].what == "journal.json", \
        f"the journal is not the first thing written: {steps}"
    checked = {normalized(kill.snapshot())}  # kernel states whose frames were checked
    check_frames(lab, scenario.probes(ctx), context=f"[{cli.backend}] {name}, undisturbed")

    rows = []
    for step in steps:
        context = f"[{cli.backend}] {name}: killed entering {step}"
        kill.restore()
        killed = kill.run_killed(args, step, hook, stdin)
        assert killed.returncode == -9, f"{context}: not killed (exit {killed.returncode}): {killed.stderr.decode()}"
        left = kill.journal.exists()
        if step is steps[0]:
            assert not left, f"{context}: a journal exists although it was never written"
            assert kill.snapshot() == reference, f"{context}: the kernel changed before the journal was written"
        else:
            assert left, f"{context}: no journal was left by a change killed half-way"
        verify = cli.run("verify", check=False)
        world = scenario.world(ctx)
        report = f"{context}: verify exited {verify.returncode}\n{verify.stdout}{verify.stderr}"
        lines = verify.stdout.strip().splitlines() if verify.returncode else []  # the problems named
        if scenario.damaged:  # named at every run until repaired; its objects never touched
            record = cli.rundir / "bindings" / f"{scenario.damaged}.json"
            named = [line for line in lines if line.startswith(f"{scenario.damaged}: binding record {record} ")]
            assert named and verify.returncode == 1, report
            lines = [line for line in lines if line not in named]
            assert port_items(lab.host_ns, scenario.damaged) == kept, f"{report}\nthe kept port's objects changed"
        if left:
            assert not lines and "completing the interrupted" in verify.stderr, report
            assert verify.returncode == (1 if scenario.damaged else 0), report
            assert world == "after", f"{report}\nthe records say {world}: an interrupted change must roll forward"
        else:
            assert world == "before", f"{report}\nthe records say {world}"
            if scenario.drift_before:
                assert verify.returncode == 1 and lines and all(scenario.drift_before in line for line in lines), report
            else:
                assert verify.returncode == (1 if scenario.damaged else 0) and not lines, report
        rerun = ""
        if world == "before":  # the next command converges
            done = kill.run(args, hook, stdin)
            assert done.returncode == 0, f"{context}: the command run again failed: {done.stderr.decode()}"
            assert scenario.world(ctx) == "after", f"{context}: the command run again did not converge"
            if scenario.damaged:
                assert port_items(lab.host_ns, scenario.damaged) == kept, f"{context}: run again, the kept port changed"
            rerun = "run again"
        assert not kill.journal.exists(), f"{context}: journal left after the next commands"
        state = normalized(kill.snapshot())
        frames = "same rules as checked" if state in checked else "frames checked"
        if state not in checked:
            check_frames(lab, scenario.probes(ctx), context=context)
            checked.add(state)
        rows.append((str(step), "journal" if left else "-", verify.returncode, world, rerun, frames))
    lines = [f"[{cli.backend}] {name}: {len(steps)} kill points + the undisturbed run, "
             f"{len(checked)} kernel states frame-checked, {time.monotonic() - started:.1f} s"]
    lines += [f"  {number:2d}. {step:40s} {left:8s} verify {code}  records {world:6s} {rerun:9s}  {frames}"
              for number, (step, left, code, world, rerun, frames) in enumerate(rows, 1)]
    return "\n".join(lines)
