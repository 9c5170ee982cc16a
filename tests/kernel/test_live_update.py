"""Live update of filters in use: all or nothing, crash-safe, with drift verification.

Real kernel, real frames: every test runs the CLI (``python3 -m libvirt_nwfilter``) inside a
fresh lab's host namespace (tests/netlab.py, tests/bindings_helpers.py), once per backend.

The filter under change is ``inner`` (root chain: one L2 ``<ip>`` UDP rule and one L3 ``<tcp>``
rule, both dropping traffic *from* the VM to one destination port), reached only through
``outer`` (root chain, ``<filterref filter='inner'/>``), the filter the bindings name. Its
variants differ in the ports they drop, so a verdict tells which variant a port runs:

========  ===================  ===================
variant   L2: UDP dport drop   L3: TCP dport drop
========  ===================  ===================
A         7001                 8001
B         7002                 8002
C         7003                 8003
========  ===================  ===================

What is checked:

* redefining ``inner`` switches every bound port (frames and real TCP), ``verify`` passes and
  the state records the new rules;
* a redefinition that one binding cannot take (a variable it lacks), or that the firewall
  refuses while applying it (reversed port range; an ipset that does not exist), is refused
  and changes nothing: store (``dumpxml``), state files, kernel (``nft list ruleset``,
  ``ebtables-save``, ``iptables-save``, ``ip6tables-save``) and verdicts;
* ``undefine`` of a filter in use is refused naming the ports, allowed once they are gone;
* SIGKILL of ``define`` at spread moments over 30 bound ports (and of the ``verify`` that
  recovers, in some rounds): afterwards ``verify`` (which completes the interrupted update
  first) passes, the stored definition is one of the two (the new one whenever the journal was
  left), every probed port runs it and all 30 bindings are still listed. With nftables the
  kernel holds, and the VMs get, all old or all new rules even before recovery;
* a journalled definition that cannot be applied any more at recovery (ebiptables: its ipset
  was destroyed) makes the recovery fall back to the previous definition;
* 10 redefinitions while 10 ``binding-create`` run in parallel, and a filter change and a
  ``binding-create`` ordered through the lock;
* ``verify``'s report of a filter changed behind the tool's back.

What ebiptables guarantees under SIGKILL (observed by the SIGKILL test's table): the store,
the state and the kernel agree again after the next command that takes the lock (roll forward
from the journal). Before that, the kernel may hold the old rules plus the new ones in temporary
chains (the VMs still get the old verdicts), or new L3 (iptables) rules with the old L2
(ebtables) ones: each tool's part is one transaction, the three parts are not one.

The SIGKILL test prints a table of where each kill landed (run with ``-s`` to see it). Its
schedule (which kind of kill in which order, the delays, which recoveries are killed too) and the
launch times of the concurrency test come from the ``rng`` fixture: the seed is printed and
``NWFT_SEED=N`` replays it (the SIGKILL delays scale with a calibration measured in the run, so
the kills land at the same fractions of a define, not at the same milliseconds).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import netlab
from bindings_helpers import (  # noqa: F401  (fixtures)
    backend, cli, filter_xml, ip_frame, kernel_snapshot, run_directory_files,
)
from traffic import Conn, Probe, check_connections, check_frames, frames, run_frames

# ----------------------------------------------------------------------------------------------
# Filters and variants

VARIANTS = {"A": (7001, 8001), "B": (7002, 8002), "C": (7003, 8003)}
UDP_PORTS = sorted(udp for udp, _ in VARIANTS.values())
TCP_PORTS = sorted(tcp for _, tcp in VARIANTS.values())
OUTER = filter_xml("outer", "<filterref filter='inner'/>")


def inner_xml(variant: str, extra: str = "") -> str:
    udp, tcp = VARIANTS[variant]
    body = (f"<rule action='drop' direction='out' priority='500'>"
            f"<ip protocol='udp' dstportstart='{udp}'/></rule>\n"
            f"<rule action='drop' direction='out' priority='500'><tcp dstportstart='{tcp}'/></rule>")
    return filter_xml("inner", body + ("\n" + extra if extra else ""))


# A rule that needs $NWFT_PORT, which only some bindings have.
NEEDS_VARIABLE = ("<rule action='drop' direction='out' priority='600'>"
                  "<tcp dstportstart='$NWFT_PORT'/></rule>")
# Refused by the firewall while the plan is applied (they compile): nft ("Range has zero or
# negative size") and iptables-restore ("invalid portrange (min > max)") refuse a reversed
# range; iptables-restore refuses an ipset that does not exist ("Set ... doesn't exist"; the
# nftables backend refuses ipset when compiling).
FIREWALL_REFUSES = {
    "reversed-port-range": "<rule action='drop' direction='out' priority='600'>"
                           "<tcp dstportstart='9000' dstportend='8000'/></rule>",
    "missing-ipset": "<rule action='drop' direction='out' priority='600'>"
                     "<tcp ipset='nwft-no-such-set' ipsetflags='src'/></rule>",
}

PEER_MAC, PEER_IP = "52:54:00:00:01:99", "10.0.0.99"


def vm_mac(i: int) -> str:
    return f"52:54:00:00:01:{i:02x}"


def vm_ip(i: int) -> str:
    return f"10.0.0.{10 + i}"


class RaceBug(Exception):
    """A filter change and a binding-create that ran concurrently left a binding that does not
    match the stored filters."""


# ----------------------------------------------------------------------------------------------
# Lab helpers


def add_vms(lab, count: int):
    """VMs v1..vN (ports vp1..vpN) and an unfiltered peer ``p`` that receives the probes."""
    vms = [lab.add_vm(f"v{i}", vm_mac(i), ipv4=f"{vm_ip(i)}/24") for i in range(1, count + 1)]
    peer = lab.add_vm("p", PEER_MAC, ipv4=f"{PEER_IP}/24")
    return vms, peer


def add_plain_ports(lab, names) -> list[str]:
    """Bridge ports without a VM behind them (veth pairs whose peers stay in the host
    namespace, down): enough for bindings that no probe uses. One ``ip -batch``."""
    lines = []
    for name in names:
        lines += [f"link add {name} type veth peer name {name}x",
                  f"link set {name} master {netlab.BRIDGE}", f"link set {name} up"]
    netlab.run(["ip", "-n", lab.host_ns, "-batch", "-"], input="\n".join(lines) + "\n")
    return list(names)


CONTROL_UDP, CONTROL_TCP = 7000, 8000  # dropped by no variant: every batch's positive twins


def variant_probes(vms, peer, variant: str | None) -> list[Probe]:
    """For every VM: one UDP frame (L2 rule) and one TCP SYN (L3 rule, through br_netfilter)
    to the peer per destination port of every variant, expected dropped only for ``variant``'s
    ports (``None``: every one expected delivered; ``"?"``: observed only), plus one UDP and one
    TCP control to ports no variant drops (expected delivered: the twins of the drops)."""
    drops = VARIANTS.get(variant, (None, None))
    probes = []
    for vm in vms:
        for proto, ports, drop, control in (("udp", UDP_PORTS, drops[0], CONTROL_UDP),
                                            ("tcp", TCP_PORTS, drops[1], CONTROL_TCP)):
            for port in [control, *ports]:
                frame = ip_frame(vm.mac, peer.mac, vm.ipv4, peer.ipv4, proto,
                                 sport=random.randrange(32768, 60000), dport=port)
                expect = True if port == control or variant is None else None if variant == "?" else port != drop
                probes.append(Probe(f"{vm.port} {proto} {port}", vm, frame, peer, expect))
    return probes


def wrong_verdicts(lab, vms, peer, variant: str) -> list[str]:
    """The probes of :func:`variant_probes` that did not get ``variant``'s verdict."""
    probes = variant_probes(vms, peer, variant)
    got, inconclusive = run_frames(lab, probes)
    return [f"{p.name}: expected {'delivered' if p.expect else 'dropped'}" for p in probes
            if got[p.name] != p.expect] + [f"{name}: inconclusive" for name in inconclusive]


def expect_variant(lab, vms, peer, variant: str, context: str) -> None:
    wrong = wrong_verdicts(lab, vms, peer, variant)
    assert not wrong, f"{context}: ports do not run variant {variant}:\n" + "\n".join(wrong)


def expect_tcp(lab, vms, peer, variant: str, context: str) -> None:
    """Real TCP connections from every VM, all at once: the variant's TCP port is dropped,
    another is not."""
    _, dropped = VARIANTS[variant]
    allowed = next(p for p in TCP_PORTS if p != dropped)
    check_connections(lab, [Conn(f"{vm.port} -> {port}", "tcp", vm, peer.ipv4, port, port == allowed)
                            for vm in vms for port in (dropped, allowed)],
                      context=f"{context} (variant {variant} drops TCP port {dropped})")


def state_files(cli) -> dict[str, str]:
    return run_directory_files(cli.rundir)


def binding_state(cli, port: str) -> dict:
    return json.loads((cli.rundir / "bindings" / f"{port}.json").read_text())


def journal(cli) -> Path:
    return cli.rundir / "journal.json"


def mentions(text: str, port: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(port)}(?![\w.-])", text) is not None


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def dumpxml(cli, name: str = "inner") -> str:
    return cli.run("dumpxml", name).stdout


def verify(cli, context: str) -> str:
    proc = cli.run("verify", check=False)
    assert proc.returncode == 0, (f"{context}: verify exited {proc.returncode}\n"
                                  f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc.stdout


# -- the host-wide lock, to force an order between two CLI processes ---------------------------


def _blocked_on(lock: Path, pid: int) -> bool:
    """True when process ``pid`` waits for a flock on ``lock`` (``/proc/locks``: ``->`` lines)."""
    inode = f":{os.stat(lock).st_ino} "
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[5] == str(pid) and inode in line + " ":
            return True
    return False


def wait_blocked(lock: Path, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _blocked_on(lock, proc.pid):
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended (exit {proc.returncode}) instead of waiting for the lock: "
                                 f"{proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{what} did not reach the lock in {timeout}s"
        time.sleep(0.005)


class HeldLock:
    """The CLI's host-wide lock (``RUNDIR/lock``) held by the test: processes started meanwhile
    queue on it, and the kernel hands it on in the order they queued."""

    def __init__(self, cli):
        self.path = cli.rundir / "lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def finish(proc: subprocess.Popen, what: str, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a CLI process: (exit status, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{what} did not finish in {timeout}s") from None
    return proc.returncode, out, err


# ----------------------------------------------------------------------------------------------
# Setup shared by most tests


def setup_three(lab, cli, params=None):
    """inner (variant A) reached through outer, bound on v1, v2, v3 (``params``: port ->
    parameters)."""
    vms, peer = add_vms(lab, 3)
    cli.define(inner_xml("A"))
    cli.define(OUTER)
    for vm in vms:
        cli.binding_create(vm.port, vm.mac, "outer", (params or {}).get(vm.port))
    return vms, peer


# ----------------------------------------------------------------------------------------------
# Redefinition switches every port


def test_redefine_inner_switches_every_port(lab, cli):
    vms, peer = setup_three(lab, cli)
    expect_variant(lab, vms, peer, "A", "after binding-create")
    expect_tcp(lab, vms, peer, "A", "after binding-create")
    before = {vm.port: binding_state(cli, vm.port) for vm in vms}
    outer_before = dumpxml(cli, "outer")

    done = cli.define(inner_xml("B"))
    assert done.stderr == "", done.stderr
    assert not journal(cli).exists(), "the update journal is left behind"
    assert "dstportstart='7002'" in dumpxml(cli) and "8002" in dumpxml(cli)
    assert dumpxml(cli, "outer") == outer_before
    expect_variant(lab, vms, peer, "B", "after redefining inner")
    expect_tcp(lab, vms, peer, "B", "after redefining inner")
    assert "All 3 binding(s) match" in verify(cli, "after redefining inner")

    for vm in vms:
        after = binding_state(cli, vm.port)
        assert after["hash"] != before[vm.port]["hash"], f"{vm.port}: state keeps the old ruleset hash"
        assert after["binding"] == before[vm.port]["binding"], f"{vm.port}: the binding itself changed"
        if cli.backend == "nftables":  # the same shape: refilled in place (the frames show the rules)
            assert after["record"] == before[vm.port]["record"], f"{vm.port}: not refilled: {after['record']}"
    assert cli.binding_ports() == sorted(vm.port for vm in vms)

    # and back: the same definition twice is a no-op that changes nothing
    cli.define(inner_xml("A"))
    expect_variant(lab, vms, peer, "A", "after redefining inner back")
    snapshot, files = kernel_snapshot(lab.host_ns), state_files(cli)
    again = cli.define(inner_xml("A"))
    assert again.returncode == 0 and again.stderr == ""
    assert kernel_snapshot(lab.host_ns) == snapshot and state_files(cli) == files
    verify(cli, "after redefining inner back")


# ----------------------------------------------------------------------------------------------
# Refusals change nothing


def assert_nothing_changed(lab, cli, vms, peer, before: dict, context: str) -> None:
    assert dumpxml(cli) == before["inner"], f"{context}: the stored filter changed"
    assert state_files(cli) == before["state"], f"{context}: the state changed"
    after = kernel_snapshot(lab.host_ns)
    changed = [key for key in after if after[key] != before["kernel"][key]]
    assert not changed, f"{context}: the kernel changed ({', '.join(changed)}):\n" + "\n".join(
        f"--- {key} before:\n{before['kernel'][key]}\n--- after:\n{after[key]}" for key in changed)
    expect_variant(lab, vms, peer, "A", context)
    verify(cli, context)


def snapshot_all(lab, cli) -> dict:
    return {"inner": dumpxml(cli), "state": state_files(cli), "kernel": kernel_snapshot(lab.host_ns)}


def test_redefinition_one_binding_cannot_take_is_refused(lab, cli):
    """vp1 and vp2 have $NWFT_PORT, vp3 does not: the definition needing it is refused with one
    line naming vp3 (only), and nothing changes anywhere."""
    params = {"vp1": {"NWFT_PORT": "8101"}, "vp2": {"NWFT_PORT": "8102"}}
    vms, peer = setup_three(lab, cli, params)
    assert [vm.port for vm in vms] == ["vp1", "vp2", "vp3"]
    expect_variant(lab, vms, peer, "A", "before")
    before = snapshot_all(lab, cli)

    refused = cli.define(inner_xml("B", NEEDS_VARIABLE), check=False)
    assert refused.returncode == 1, refused
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one error line: {refused.stderr!r}"
    assert mentions(lines[0], "vp3") and "NWFT_PORT" in lines[0], lines[0]
    assert not mentions(lines[0], "vp1") and not mentions(lines[0], "vp2"), \
        f"the ports that can take it are named too: {lines[0]}"
    assert not journal(cli).exists()
    assert_nothing_changed(lab, cli, vms, peer, before, "after the refused definition")


@pytest.mark.parametrize("case", list(FIREWALL_REFUSES))
def test_redefinition_the_firewall_refuses_changes_nothing(lab, cli, case):
    """A definition that compiles but that nft / iptables-restore refuses in the middle of the
    update (ebiptables: after ebtables' part was applied) is refused; nothing changes. With the
    nftables backend the ipset case is refused before (ipset cannot be rendered for nft)."""
    vms, peer = setup_three(lab, cli)
    expect_variant(lab, vms, peer, "A", "before")
    before = snapshot_all(lab, cli)

    refused = cli.define(inner_xml("B", FIREWALL_REFUSES[case]), check=False)
    assert refused.returncode == 1, refused
    errors = error_lines(refused)
    assert len(errors) == 1, f"expected one error line: {refused.stderr!r}"
    if case == "missing-ipset" and cli.backend == "nftables":
        assert "'ipset' cannot be rendered by the nftables backend" in errors[0], errors[0]
    elif case == "missing-ipset":
        assert "nwft-no-such-set" in errors[0], errors[0]
    else:
        assert "refused the change" in errors[0], errors[0]
    assert not journal(cli).exists()
    assert_nothing_changed(lab, cli, vms, peer, before, f"after the refused definition ({case})")

    # the bindings still take a good definition afterwards
    cli.define(inner_xml("B"))
    expect_variant(lab, vms, peer, "B", "after a good definition")
    verify(cli, "after a good definition")


def test_undefine_in_use_refused(lab, cli):
    vms, peer = setup_three(lab, cli)
    ports = [vm.port for vm in vms]
    before = snapshot_all(lab, cli)
    for name in ("inner", "outer"):
        refused = cli.run("undefine", name, check=False)
        assert refused.returncode == 1, refused
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "in use" in lines[0], refused.stderr
        assert all(mentions(lines[0], port) for port in ports), lines[0]
    assert dumpxml(cli, "outer") and cli.run("-q", "list").stdout.count("inner") == 1
    assert_nothing_changed(lab, cli, vms, peer, before, "after the refused undefine")

    cli.binding_delete(vms[0].port)
    cli.binding_delete(vms[1].port)
    refused = cli.run("undefine", "inner", check=False)
    assert refused.returncode == 1 and mentions(refused.stderr, vms[2].port), refused
    assert not mentions(refused.stderr, vms[0].port) and not mentions(refused.stderr, vms[1].port)

    cli.binding_delete(vms[2].port)
    assert cli.run("undefine", "inner").stdout == "Network filter inner undefined\n"
    assert cli.run("dumpxml", "inner", check=False).returncode == 1
    assert cli.run("undefine", "outer").returncode == 0
    check_frames(lab, variant_probes(vms, peer, None), context="traffic still filtered after the bindings went")


# ----------------------------------------------------------------------------------------------
# SIGKILL during define

KILL_PORTS = 30
# rounds: kills after a delay spread over a whole define, kills when the journal appears, kills
# as soon as the kernel shows the first rule of the new definition
KILL_PLAN = {"delay": 8, "journal": 4, "kernel": 3}
RECOVERY_KILLS = 3  # rounds whose recovering verify is SIGKILLed too


def kernel_counts(ns: str, backend: str) -> dict[str, dict[str, int]]:
    """How many rules of each variant the kernel holds, at L2 (the UDP rule) and L3 (the TCP
    rule), read with the backend's own listing tools."""
    if backend == "nftables":
        l2 = l3 = netlab.run_in(ns, ["nft", "list", "ruleset"]).stdout
    else:
        l2 = netlab.run_in(ns, ["ebtables-save"]).stdout
        l3 = netlab.run_in(ns, ["iptables-save"]).stdout
    return {"l2": {v: _count(l2, udp) for v, (udp, _) in VARIANTS.items()},
            "l3": {v: _count(l3, tcp) for v, (_, tcp) in VARIANTS.items()}}


def _count(text: str, number: int) -> int:
    return len(re.findall(rf"(?<![\w.:]){number}(?![\w.:])", text))


def kernel_holds(counts: dict, old: str, new: str) -> str:
    """``old``, ``new`` or ``mixed`` (both, or L2 and L3 disagree)."""
    has_old = any(counts[layer][old] for layer in counts)
    has_new = any(counts[layer][new] for layer in counts)
    return "mixed" if has_old and has_new else new if has_new else old if has_old else "none"


def observed_variants(lab, vms, peer) -> dict[str, tuple[str, str]]:
    """Per VM port, which variant's ports are dropped at L2 and at L3 (``A``, ``A+B``, ``-``)."""
    got = frames(lab, variant_probes(vms, peer, "?"))
    by_port = {}
    for proto, layer_ports in (("udp", {udp: v for v, (udp, _) in VARIANTS.items()}),
                               ("tcp", {tcp: v for v, (_, tcp) in VARIANTS.items()})):
        for vm in vms:
            dropped = [v for port, v in sorted(layer_ports.items()) if not got[f"{vm.port} {proto} {port}"]]
            by_port.setdefault(vm.port, []).append("+".join(dropped) or "-")
    return {port: tuple(layers) for port, layers in by_port.items()}


def start_cli(cli, *args: str) -> subprocess.Popen:
    """The CLI in a session of its own (so that its whole process group can be killed)."""
    return subprocess.Popen(cli.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=netlab.TESTS_DIR.parent,
                            env=cli.env(), start_new_session=True)


def start_define(cli, variant: str) -> subprocess.Popen:
    return start_cli(cli, "define", cli._file(f"inner-{variant}", inner_xml(variant)))


def kill(proc: subprocess.Popen, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=30)


def timed_define(cli, variant: str) -> tuple[float, float]:
    """Run a define to completion, noting when the journal appeared and when it ended."""
    started = time.monotonic()
    proc = start_define(cli, variant)
    seen = None
    while proc.poll() is None:
        if seen is None and journal(cli).exists():
            seen = time.monotonic() - started
        time.sleep(0.001)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return (seen if seen is not None else float("nan")), time.monotonic() - started


def test_sigkill_during_define(lab, cli, rng):
    """30 bound ports; 15 times: start ``define`` of the other variant and SIGKILL it at a
    spread moment (delays spread over a whole undisturbed define, kills when the update journal
    appears, kills when the kernel shows the first new rule), then ``verify`` must pass (it
    completes an interrupted update first), the stored definition must be A or B, the three
    probed ports must run it (L2 and L3 frames) and the 30 bindings must still be listed. Half
    the kills hit the whole process group (the CLI and the nft/restore it runs), half the CLI
    alone (its child finishes on its own). In 3 rounds that left a journal, the recovering
    ``verify`` is SIGKILLed as well before the checking one runs. nftables: the kernel, before
    recovery, holds all old or all new rules, never a mix."""
    vms, peer = add_vms(lab, 3)
    plain = add_plain_ports(lab, [f"lp{i:02d}" for i in range(len(vms) + 2, KILL_PORTS + 2)])
    ports = [vm.port for vm in vms] + plain
    assert len(ports) == KILL_PORTS
    cli.define(inner_xml("A"))
    cli.define(OUTER)
    for i, port in enumerate(ports):
        mac = vms[i].mac if i < len(vms) else f"52:54:00:02:00:{i:02x}"
        cli.binding_create(port, mac, "outer")
    canonical = {"A": dumpxml(cli)}
    expect_variant(lab, vms, peer, "A", "before")

    # calibration: two undisturbed updates (A -> B -> A)
    journal_at, total = timed_define(cli, "B")
    canonical["B"] = dumpxml(cli)
    expect_variant(lab, vms, peer, "B", "after an undisturbed update")
    journal_at2, total2 = timed_define(cli, "A")
    stored = "A"
    span = max(0.3, 1.1 * max(total, total2))
    seed = rng.seed_value
    plan: list[tuple[str, float]] = [("delay", (k + rng.random()) * span / KILL_PLAN["delay"])
                                     for k in range(KILL_PLAN["delay"])]
    plan += [("journal", offset) for offset in (0.0, 0.002, 0.005, 0.010)[:KILL_PLAN["journal"]]]
    plan += [("kernel", 0.0)] * KILL_PLAN["kernel"]
    rng.shuffle(plan)

    rows = []
    recovery_kills = 0
    started_loop = time.monotonic()
    for round_no, (trigger, delay) in enumerate(plan, 1):
        old, target = stored, "B" if stored == "A" else "A"
        group = round_no % 2 == 0
        t0 = time.monotonic()
        proc = start_define(cli, target)
        if trigger == "journal":
            while not journal(cli).exists() and proc.poll() is None and time.monotonic() - t0 < 10:
                time.sleep(0.0005)
        elif trigger == "kernel":
            while (proc.poll() is None and time.monotonic() - t0 < 10
                   and kernel_holds(kernel_counts(lab.host_ns, cli.backend), old, target) == old):
                pass
        time.sleep(delay)
        killed_at = time.monotonic() - t0
        kill(proc, group)
        left_journal = journal(cli).exists()
        counts = kernel_counts(lab.host_ns, cli.backend)
        holds = kernel_holds(counts, old, target)
        if proc.returncode == 0:
            phase = "completed"
        elif left_journal:
            phase = f"journal, kernel {'old' if holds == old else 'new' if holds == target else holds}"
        else:
            phase = "before journal" if holds == old else "after journal" if holds == target else f"?? {holds}"
        context = (f"round {round_no} (seed {seed}): define {target} killed after {killed_at * 1000:.0f} ms "
                   f"({trigger}, {'group' if group else 'CLI only'}), exit {proc.returncode}, {phase}, "
                   f"kernel rules before recovery: {counts}")
        assert not phase.startswith("??"), f"{context}: no journal but the kernel holds {holds}"
        # what the VMs get before anything recovers (one probe batch, L2 and L3)
        seen = observed_variants(lab, vms, peer)
        uniform = set(seen.values())
        traffic = ("L2 {} / L3 {}".format(*next(iter(uniform))) if len(uniform) == 1
                   else "; ".join(f"{port}: L2 {l2} / L3 {l3}" for port, (l2, l3) in seen.items()))
        context += f"; traffic before recovery: {traffic}"
        if cli.backend == "nftables":
            assert holds in (old, target), f"{context}: the kernel holds a mix of old and new rules"
            assert uniform in ({(old, old)}, {(target, target)}), \
                f"{context}: before recovery the ports do not all run the old or all the new variant"

        recovery_killed = ""
        if left_journal and recovery_kills < RECOVERY_KILLS:
            recovery_kills += 1
            recovering = start_cli(cli, "verify")
            time.sleep(rng.uniform(0.05, 0.4))
            kill(recovering, group=True)
            recovery_killed = f"exit {recovering.returncode}, journal {journal(cli).exists()}"
            context += f"; recovering verify killed: {recovery_killed}"
        out = verify(cli, context)
        assert f"All {KILL_PORTS} binding(s) match" in out, f"{context}: {out}"
        assert not journal(cli).exists(), f"{context}: journal still there after verify"
        now = dumpxml(cli)
        assert now in (canonical["A"], canonical["B"]), f"{context}: stored filter is neither A nor B:\n{now}"
        stored = "A" if now == canonical["A"] else "B"
        if left_journal:
            assert stored == target, f"{context}: an interrupted update with a journal must roll forward"
        wrong = wrong_verdicts(lab, vms, peer, stored)
        assert not wrong, f"{context}: stored {stored} but the ports do not run it:\n" + "\n".join(wrong)
        assert cli.binding_ports() == sorted(ports, key=lambda n: (n.lower(), n)), context
        rows.append((round_no, trigger, killed_at, "group" if group else "CLI", proc.returncode, phase,
                     counts, traffic, target, stored, recovery_killed))
    loop_time = time.monotonic() - started_loop

    print(f"\n[{cli.backend}] SIGKILL rounds (seed {seed}); undisturbed define: journal after "
          f"{journal_at * 1000:.0f}/{journal_at2 * 1000:.0f} ms, done after {total * 1000:.0f}/"
          f"{total2 * 1000:.0f} ms; loop {loop_time:.1f} s")
    print(" # trigger  killed  whom   exit  phase                  L2 A/B   L3 A/B   traffic before "
          "recovery  target stored recovering verify killed")
    for no, trigger, at, whom, rc, phase, counts, traffic, target, now, rec in rows:
        print(f"{no:2d} {trigger:8s}{at * 1000:5.0f}ms  {whom:5s} {rc:4d}  {phase:21s} "
              f"{counts['l2']['A']:3d}/{counts['l2']['B']:<3d}  {counts['l3']['A']:3d}/{counts['l3']['B']:<3d}"
              f"  {traffic:23s}  {target}      {now}      {rec}")
    leftovers = sorted(str(p.relative_to(cli.workdir)) for p in cli.workdir.rglob(".*") if p.is_file())
    print(f"temporary files left by the kills: {leftovers or 'none'}")
    # the recovery path was exercised: kills landed while an update was in flight
    assert any(row[5].startswith("journal") for row in rows), "no kill landed while an update was in flight"


@pytest.mark.parametrize("backend", ["ebiptables"])
def test_recovery_falls_back_to_the_previous_definition(lab, cli, backend):
    """The journalled definition cannot be applied any more when the next command recovers
    (its ipset was destroyed after ``define`` was killed): the recovery restores the previous
    definition and rebuilds with it; ``verify`` passes and every port runs the old variant.
    (ebiptables only: the nftables backend cannot reference an ipset, and nothing else makes a
    definition that compiled fail later.)"""
    vms, peer = setup_three(lab, cli)
    canonical_a = dumpxml(cli)
    ipset_rule = ("<rule action='drop' direction='out' priority='600'>"
                  "<tcp ipset='nwft-recover' ipsetflags='src'/></rule>")
    for attempt in range(1, 6):
        lab.host_run(["ipset", "create", "nwft-recover", "hash:ip"])
        proc = start_cli(cli, "define", cli._file("inner-ipset", inner_xml("B", ipset_rule)))
        while not journal(cli).exists() and proc.poll() is None:
            time.sleep(0.0002)
        kill(proc, group=True)
        destroyed = lab.host_run(["ipset", "destroy", "nwft-recover"], check=False).returncode == 0
        if journal(cli).exists() and destroyed:
            break
        # too late (the update completed, or its iptables part already refers to the set):
        # complete it, go back to A and try again
        if not destroyed:
            verify(cli, f"attempt {attempt}: completing the update")
            cli.define(inner_xml("A"))
            lab.host_run(["ipset", "destroy", "nwft-recover"])
        else:
            cli.define(inner_xml("A"))
    else:
        pytest.fail("could not kill define between its journal and its iptables transaction in 5 attempts")

    proc = cli.run("verify", check=False)
    assert proc.returncode == 0, f"verify after the failed recovery: {proc.stdout}{proc.stderr}"
    assert "restoring the previous one" in proc.stderr, proc.stderr
    assert not journal(cli).exists()
    assert dumpxml(cli) == canonical_a
    expect_variant(lab, vms, peer, "A", "after falling back to the previous definition")
    assert cli.binding_ports() == [vm.port for vm in vms]


class VerifyReportBug(Exception):
    """verify's report of a filter changed behind its back is wrong."""


def test_verify_reports_a_filter_changed_behind_its_back(lab, cli):
    vms, peer = setup_three(lab, cli)
    path = cli.confdir / "filters" / "inner.xml"
    text = path.read_text()
    assert "7001" in text and "8001" in text
    path.write_text(text.replace("7001", "7002").replace("8001", "8002"))
    kernel = kernel_snapshot(lab.host_ns)

    drifted = cli.run("verify", check=False)
    assert drifted.returncode == 1, drifted
    for vm in vms:
        assert mentions(drifted.stdout, vm.port), drifted.stdout
    assert kernel_snapshot(lab.host_ns) == kernel, "verify changed the kernel"
    expect_variant(lab, vms, peer, "A", "verify changes nothing")
    cli.run("reapply")
    expect_variant(lab, vms, peer, "B", "after reapply")
    verify(cli, "after reapply")

    problems = []
    lines = drifted.stdout.strip().splitlines()
    expected = [f"{vm.port}: applied rules differ from its filters' definitions" for vm in vms]
    if lines != expected:
        problems.append("report:\n" + drifted.stdout + "expected:\n" + "\n".join(expected))
    if f"error: {len(vms)} port(s) drifted" not in drifted.stderr:
        problems.append(f"summary: {drifted.stderr.strip()!r} for {len(vms)} ports")
    if problems:
        raise VerifyReportBug("\n".join(problems))


# ----------------------------------------------------------------------------------------------
# Concurrency


def check_consistent(lab, cli, new_vms, peer, variant: str, context: str) -> None:
    """verify passes and the new VMs run ``variant``; a mismatch is a race through the lock (RaceBug)."""
    proc = cli.run("verify", check=False)
    if proc.returncode != 0:
        stale = [line for line in proc.stdout.splitlines()
                 if "applied rules differ from its filters' definitions" in line
                 or "its filter no longer resolves" in line]
        if stale:
            raise RaceBug(f"{context}: verify exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        raise AssertionError(f"{context}: verify exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    wrong = wrong_verdicts(lab, new_vms, peer, variant)
    if wrong:
        raise RaceBug(f"{context}: the new ports do not run variant {variant}:\n" + "\n".join(wrong))


def test_concurrent_defines_and_binding_creates(lab, cli, rng):
    """10 redefinitions of ``inner`` (A, B, A, ..., B) while 10 ``binding-create`` of new ports
    run in parallel: every process succeeds, every binding exists, ``verify`` passes and the new
    ports run the final definition (B). The last create is queued on the lock right behind the
    last define after compiling (deterministic order: the test holds the lock while both queue),
    which exposes the race the others only hit by chance."""
    vms, peer = add_vms(lab, 3)
    old_vm, probe_vm, late_vm = vms  # v1: bound before; v2: created during the loop; v3: the late one
    extra = add_plain_ports(lab, [f"lc{i:02d}" for i in range(1, 3)])
    new_plain = add_plain_ports(lab, [f"ln{i:02d}" for i in range(1, 9)])
    cli.define(inner_xml("C"))
    cli.define(OUTER)
    cli.binding_create(old_vm.port, old_vm.mac, "outer")
    for i, port in enumerate(extra):
        cli.binding_create(port, f"52:54:00:03:00:{i:02x}", "outer")
    expect_variant(lab, [old_vm], peer, "C", "before")

    creations = [(probe_vm.port, probe_vm.mac)] + [(port, f"52:54:00:04:00:{i:02x}")
                                                 for i, port in enumerate(new_plain)]
    files = {port: cli.binding_file(port, mac, "outer") for port, mac in creations}
    files[late_vm.port] = cli.binding_file(late_vm.port, late_vm.mac, "outer")
    started: list[tuple[str, subprocess.Popen]] = []

    def launch():
        for port, _ in creations:  # spread over the first redefinitions
            time.sleep(rng.uniform(0.02, 0.25))
            started.append((port, cli.popen("binding-create", files[port])))

    launcher = threading.Thread(target=launch)
    launcher.start()
    defines = []
    try:
        for i in range(10):
            variant = "A" if i % 2 == 0 else "B"
            if i < 9:
                defines.append(cli.define(inner_xml(variant), check=False))
                continue
            launcher.join()
            held = HeldLock(cli)
            try:
                last = cli.popen("define", cli._file("inner-last", inner_xml(variant)))
                wait_blocked(held.path, last, "the last define")
                late = cli.popen("binding-create", files[late_vm.port])
                wait_blocked(held.path, late, "the late binding-create")
            finally:
                held.release()
            code, out, err = finish(last, "the last define")
            defines.append(subprocess.CompletedProcess(last.args, code, out, err))
            started.append((late_vm.port, late))
    finally:
        launcher.join()
    results = {port: finish(proc, f"binding-create {port}") for port, proc in started}

    failed = [f"define #{n}: exit {p.returncode}: {p.stderr}" for n, p in enumerate(defines) if p.returncode]
    failed += [f"binding-create {port}: exit {code}: {err}" for port, (code, _, err) in results.items() if code]
    assert not failed, "\n".join(failed)
    expected = sorted([old_vm.port, *extra, *(p for p, _ in creations), late_vm.port],
                      key=lambda n: (n.lower(), n))
    assert cli.binding_ports() == expected
    assert not journal(cli).exists()
    assert "dstportstart='7002'" in dumpxml(cli)
    expect_variant(lab, [old_vm], peer, "B", "the port bound before the loop")
    check_consistent(lab, cli, [probe_vm, late_vm], peer, "B", "after the loop")


@pytest.mark.parametrize("change", ["define", "undefine"])
def test_change_queued_before_binding_create(lab, cli, change):
    """The smallest reproduction of the race, with a deterministic order: the test holds the
    lock; ``define inner`` (B) or ``undefine inner`` queues on it; then ``binding-create`` of a
    new port using ``outer`` starts, compiles (inner is still A) and queues; the lock is
    released (the kernel hands it on in queue order). Expected: the new port runs B / the
    undefine or the create is refused."""
    vms, peer = add_vms(lab, 2)
    bound, new = vms
    cli.define(inner_xml("A"))
    cli.define(OUTER)
    if change == "define":
        cli.binding_create(bound.port, bound.mac, "outer")
    path = cli.binding_file(new.port, new.mac, "outer")
    held = HeldLock(cli)
    try:
        first = (cli.popen("define", cli._file("inner-B", inner_xml("B"))) if change == "define"
                 else cli.popen("undefine", "inner"))
        wait_blocked(held.path, first, change)
        create = cli.popen("binding-create", path)
        wait_blocked(held.path, create, "binding-create")
    finally:
        held.release()
    code1, _, err1 = finish(first, change)
    code2, _, err2 = finish(create, "binding-create")
    if change == "define":
        assert code1 == 0 and code2 == 0, (err1, err2)
        check_consistent(lab, cli, vms, peer, "B", "define queued before binding-create")
    else:
        # all or nothing: either the undefine is refused (in use) or the create (no filter)
        if code1 == 0 and code2 == 0:
            check_consistent(lab, cli, [new], peer, "A", "undefine queued before binding-create")
            raise RaceBug(f"undefine and binding-create both succeeded: the binding on {new.port} "
                          f"uses the undefined filter 'inner'")
        assert (code1, code2) in ((0, 1), (1, 0)), (code1, err1, code2, err2)
        verify(cli, "undefine queued before binding-create")
