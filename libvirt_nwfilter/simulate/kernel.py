"""``simulate --kernel``: the packets through the real rules of either backend.

In a throw-away network namespace (``lab``) the port's rules are built with the backend's own
plan, exactly as ``binding-create`` would build them; ``inject.py`` sends each packet's frame
into the bridge from the guest's side, the remote peer or the host, followed by a marker frame;
``nft -a monitor trace`` reports every rule each frame met. A packet passed when its frame
arrived where it was going (the remote peer's or the guest's end of the veth, captured by the
injector) or, for the host, when it reached the last chain of the host's input path. The rules
are named from the trace and mapped back to the IR (and so to the filter rule) by their
position in the kernel's listing of the chain.

Only the executor runs processes; this module decides what to run and reads what they say.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import executor
from ..backends.base import Backend, PortChange, Step
from ..errors import FirewallError
from ..ir import PortRuleset
from . import frames, lab
from .evaluate import STAGES, Chain, CompiledRule, Result, Simulator, _stage_keys
from .conds import never
from .explain import rule_info, rule_name
from .packet import Addresses, Packet
from .trace import Event, Role, StageTrace, split_windows, stage_decision

INJECT = Path(__file__).with_name("inject.py")
CHUNK = 40  # packets between two waits for the trace (bounds what the trace socket buffers)
TRACE_TIMEOUT = 20.0
_MARKER_RE = re.compile(r'iif "' + lab.MARKER_PORT + r'" ether saddr (02:00(?::[0-9a-f]{2}){4})')


# ------------------------------------------------------------------------------------------
# Chain names of the backends -> roles


def _nft_encode(port: str) -> str:
    return port.replace("_", "__").replace(":", "_c")


def role_matcher(backend: str, port: str):
    """``role(event) -> Role | None`` for the chains ``backend`` makes for ``port``."""
    if backend == "nftables":
        name = re.escape(_nft_encode(port))
        patterns = [(re.compile(rf"^I-\d+/{name}(?:/(.+))?$"), "l2-out"),
                    (re.compile(rf"^O-\d+/{name}(?:/(.+))?$"), "l2-in"),
                    (re.compile(rf"^FI-\d+/{name}()$"), "l3-fi"), (re.compile(rf"^FO-\d+/{name}()$"), "l3-fo"),
                    (re.compile(rf"^HI-\d+/{name}()$"), "l3-hi")]
    else:
        name = re.escape(port)
        patterns = [(re.compile(rf"^nwf-I-{name}()$"), "l2-out"), (re.compile(rf"^NI-{name}:(.+)$"), "l2-out"),
                    (re.compile(rf"^nwf-O-{name}()$"), "l2-in"), (re.compile(rf"^NO-{name}:(.+)$"), "l2-in"),
                    (re.compile(rf"^NFI-{name}()$"), "l3-fi"), (re.compile(rf"^NFO-{name}()$"), "l3-fo"),
                    (re.compile(rf"^NHI-{name}()$"), "l3-hi")]

    def role(event: Event) -> Role | None:
        for pattern, stage in patterns:
            found = pattern.match(event.chain)
            if found:
                sub = found.group(1) or None
                return Role(stage, sub.replace("_c", ":").replace("__", "_") if sub and backend == "nftables" else sub)
        return None
    return role


# ------------------------------------------------------------------------------------------
# Results


@dataclass
class KernelStage:
    key: str
    passed: bool
    event: Event | None = None  # the kernel's deciding rule line
    rule: CompiledRule | None = None  # the IR rule at that position
    note: str = ""  # "end of the chain (policy accept)", "the port's mark rule"...

    def describe(self) -> str:
        if self.event is None:
            return "no rule of the port decided: it went on"
        kernel = f"chain {self.event.chain} handle {self.event.handle}: {self.event.text} (verdict {self.event.verdict})"
        if self.rule is not None:
            return f"{kernel} = {rule_name(self.rule)}"
        return f"{kernel}" + (f" = {self.note}" if self.note else "")


@dataclass
class KernelResult:
    backend: str
    passed: bool
    stages: list[KernelStage] = field(default_factory=list)
    note: str = ""
    unreached: list[str] = field(default_factory=list)  # stages after the one that dropped it

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "drop"

    def as_text(self, offline: Result) -> str:
        agree = "agrees with" if offline.passed == self.passed else "DISAGREES with"
        lines = [f"  kernel ({self.backend}): {self.verdict} ({agree} the offline engine)"]
        for stage in self.stages:
            lines.append(f"    {STAGES[stage.key]}: {'pass' if stage.passed else 'DROP'} - {stage.describe()}")
        lines += [f"    {STAGES[key]}: not reached" for key in self.unreached]
        if self.note:
            lines.append(f"    note: {self.note}")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict:
        out = {"backend": self.backend, "verdict": self.verdict, "stages": []}
        for stage in self.stages:
            item = {"stage": stage.key, "verdict": "pass" if stage.passed else "drop"}
            if stage.event is not None:
                item.update({"chain": stage.event.chain, "handle": stage.event.handle,
                             "kernel-rule": stage.event.text, "kernel-verdict": stage.event.verdict})
            if stage.rule is not None:
                item["rule"] = rule_info(stage.rule)
            elif stage.note:
                item["note"] = stage.note
            out["stages"].append(item)
        out["stages"] += [{"stage": key, "verdict": "not-reached"} for key in self.unreached]
        if self.note:
            out["note"] = self.note
        return out


# ------------------------------------------------------------------------------------------
# Running


def _where(p: Packet) -> tuple[str, str | None]:
    """(interface to send on, interface the frame should arrive at; None: the host)."""
    if p.direction == "out":
        return lab.GUEST, (None if p.host else lab.REMOTE)
    return (lab.BRIDGE if p.host else lab.REMOTE), lab.GUEST


def _host_addresses(packets: Sequence[Packet], addresses: Addresses) -> tuple[list[str], list[str]]:
    import ipaddress

    v4, v6 = {addresses.host_ipv4}, set()
    for p in packets:
        if p.direction == "out" and p.host and p.family is not None:
            address = ipaddress.IPv4Address(p.ip_dst) if p.family == 4 else ipaddress.IPv6Address(p.ip_dst)
            if not (address.is_multicast or str(address) == "255.255.255.255" or address.is_unspecified):
                (v4 if p.family == 4 else v6).add(str(address))
    return sorted(v4), sorted(v6)


class _Run:
    """One namespace, one port, one batch of packets."""

    def __init__(self, backend: Backend, port: str, ruleset: PortRuleset, ns: str):
        self.backend, self.port, self.ruleset, self.ns = backend, port, ruleset, ns
        self.monitor = self.injector = None
        self.lines: list[str] = []
        self._pending = b""

    def setup(self, packets: Sequence[Packet], addresses: Addresses) -> None:
        v4, v6 = _host_addresses(packets, addresses)
        for step in lab.setup_steps(self.port, addresses.host_mac, v4, v6, self.ns, bool(v6)):
            self._must(step, self.ns if step.argv[0] == "sysctl" else None)
        executor.run(Step(("sysctl", "-q", "-w", lab.SYSCTL_TCP_LIBERAL)), self.ns)  # absent without conntrack
        plan, _ = self.backend.plan([PortChange(self.port, None, self.ruleset)])
        executor.execute(plan, self.ns)
        self._must(Step(("nft", "-f", "-"), lab.tracer_ruleset(self.port)), self.ns)

    def _must(self, step: Step, netns: str | None) -> None:
        result = executor.run(step, netns)
        if result.returncode != 0:
            raise FirewallError(f"simulate --kernel: {' '.join(step.argv[:3])} failed: {result.stderr.strip()}")

    def listing(self) -> dict[tuple[str, str, str], list[dict]]:
        result = executor.run(Step(("nft", "-j", "-a", "list", "ruleset")), self.ns)
        chains: dict[tuple[str, str, str], list[dict]] = {}
        for item in json.loads(result.stdout or '{"nftables": []}')["nftables"]:
            rule = item.get("rule")
            if rule:
                chains.setdefault((rule["family"], rule["table"], rule["chain"]), []).append(rule)
        return chains

    def start(self) -> None:
        self.monitor = executor.start(Step(("stdbuf", "-oL", "nft", "-a", "monitor", "trace")), self.ns)
        self.injector = executor.start(Step((sys.executable, str(INJECT))), self.ns)
        self._ask({"cpu": 0, "capture": [lab.GUEST, lab.REMOTE], "mark": lab.HOST_MARK})
        self._wait_ready()

    def _ask(self, command: dict) -> dict:
        self.injector.stdin.write(json.dumps(command) + "\n")
        self.injector.stdin.flush()
        answer = self.injector.stdout.readline()
        if not answer:
            raise FirewallError(f"simulate --kernel: the frame injector failed: {executor.stop(self.injector)}")
        return json.loads(answer)

    def _wait_ready(self) -> None:
        """Send marker 0 until the trace shows it: the monitor is listening."""
        deadline = time.monotonic() + TRACE_TIMEOUT
        while time.monotonic() < deadline:
            self._ask({"send": [[lab.MARKER, lab.marker_frame(0).hex()]]})
            if self._read_until(lab.marker_mac(0), 0.3, keep=False):
                return
        raise FirewallError("simulate --kernel: nft monitor trace shows nothing (is nftrace supported?)")

    def _read_until(self, marker: str, timeout: float, keep: bool = True) -> bool:
        """Read trace lines until a marker's line; False after ``timeout`` seconds. The pipe is
        read with ``os.read`` (a buffered reader would hide lines from ``select``)."""
        deadline = time.monotonic() + timeout
        fd = self.monitor.stdout.fileno()
        while True:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode("utf-8", "replace")
                if keep:
                    self.lines.append(line)
                if marker in line and lab.MARKER_PORT in line:
                    return True
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return False
            self._pending += chunk

    def send(self, packets: Sequence[Packet]) -> dict[str, list[bytes]]:
        for first in range(0, len(packets), CHUNK):
            batch = []
            for number in range(first + 1, min(first + CHUNK, len(packets)) + 1):
                p = packets[number - 1]
                batch.append([_where(p)[0], frames.build(p, number).hex()])
                batch.append([lab.MARKER, lab.marker_frame(number).hex()])
            self._ask({"send": batch})
            last = min(first + CHUNK, len(packets))
            if not self._read_until(lab.marker_mac(last), TRACE_TIMEOUT):
                raise FirewallError(f"simulate --kernel: the trace of packet {last} did not arrive")
        captured = self._ask({"collect": True})["frames"]
        return {iface: [bytes.fromhex(h) for h in hexes] for iface, hexes in captured.items()}

    def close(self) -> None:
        for process in (self.injector, self.monitor):
            if process is not None:
                executor.stop(process)


def _tag(frame: bytes) -> int | None:
    """The run's sequence number a captured frame carries (see ``frames``)."""
    at = frame.find(b"nwfs")
    if at >= 0 and len(frame) >= at + 8:
        return int.from_bytes(frame[at + 4:at + 8], "big")
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800:
        return int.from_bytes(frame[18:20], "big")
    if ethertype == 0x86DD:
        return int.from_bytes(frame[15:18], "big") & 0xFFFFF
    return None


def _marker_number(dump: str) -> int | None:
    found = _MARKER_RE.search(dump)
    return int(found.group(1).replace(":", ""), 16) & 0xFFFFFFFF if found else None


class _Mapper:
    """Kernel rule (chain, handle) -> the IR rule at the same position of the same chain."""

    def __init__(self, simulator: Simulator, listing: dict, role_of):
        self.simulator, self.listing, self.role_of = simulator, listing, role_of

    def _ir_chain(self, role: Role, family: str) -> list[CompiledRule]:
        sim = self.simulator
        if role.stage.startswith("l2"):
            root: Chain = sim.l2[_side(role.stage)]
            if role.sub is None:
                return root.rules
            sub = next((r.sub for r in root.rules if r.sub is not None and r.sub.name == role.sub), None)
            return sub.rules if sub else []
        copy = role.stage[3:]
        families = {"ip": (4,), "ip6": (6,)}.get(family, (4, 6))
        rules = [r for f in families for r in sim.l3[(copy, f)].rules]
        order = {id(rule): index for index, rule in enumerate(getattr(sim.ruleset, copy))}
        return sorted(rules, key=lambda r: order.get(id(r.rule), 0))

    def stage(self, trace: StageTrace) -> KernelStage:
        stage = KernelStage(trace.key, trace.passed, trace.event)
        event = trace.event
        if event is None:
            return stage
        kernel = self.listing.get((event.family, event.table, event.chain), [])
        handles = [rule.get("handle") for rule in kernel]
        if event.handle not in handles:
            return stage
        position = handles.index(event.handle)
        ir = self._ir_chain(self.role_of(event), event.family)
        if len(kernel) - len(ir) < 0:  # the nftables backend leaves out rules that never match
            ir = [rule for rule in ir if never not in rule.preds]
        extra = len(kernel) - len(ir)
        if extra == 1 and _sets_mark(kernel[0]):
            if position == 0:
                stage.note = "the port's mark rule"
                return stage
            position -= 1
        elif extra == 1:  # a trailing rule: the chain's policy (ebtables) or explicit end (nftables)
            if position == len(ir):
                stage.note = "the end of the chain (accept)"
                return stage
        elif extra != 0:
            stage.note = f"rule {position + 1} of the chain (the IR has {len(ir)} rules here)"
            return stage
        stage.rule = ir[position]
        return stage


def _side(stage: str):
    from ..ir import Side

    return Side.FROM_VM if stage == "l2-out" else Side.TO_VM


def _sets_mark(rule: dict) -> bool:
    return any("mangle" in expr and "mark" in json.dumps(expr["mangle"].get("key", {})) for expr in rule.get("expr", []))


def kernel_results(backend: Backend, port: str, ruleset: PortRuleset, packets: Sequence[Packet],
                   addresses: Addresses | None = None) -> list[KernelResult]:
    """What the kernel did with each packet (in order, one conversation), on ``backend``."""
    addresses = addresses or Addresses("52:54:00:00:00:01")
    simulator = Simulator(ruleset)
    role_of = role_matcher(backend.name, port)
    with executor.throwaway_namespace(executor.SIMULATION_PREFIX) as ns:
        run = _Run(backend, port, ruleset, ns)
        try:
            run.setup(packets, addresses)
            mapper = _Mapper(simulator, run.listing(), role_of)
            run.start()
            captured = run.send(packets)
        finally:
            run.close()
    arrived = {iface: {_tag(frame) for frame in got} for iface, got in captured.items()}
    windows = split_windows(run.lines, _marker_number)
    return [_result(backend.name, number, p, windows.get(number, []), arrived, mapper, role_of)
            for number, p in enumerate(packets, 1)]


def _result(backend: str, number: int, p: Packet, events: list[Event], arrived: dict, mapper: _Mapper,
            role_of) -> KernelResult:
    keys = _stage_keys(p)
    stages: list[KernelStage] = []
    for key in keys:
        stages.append(mapper.stage(stage_decision(key, events, role_of)))
        if not stages[-1].passed:
            break
    destination = _where(p)[1]
    if destination is not None:
        passed = number in arrived.get(destination, set())
    else:
        table = ("inet", lab.TABLE, "seen-host") if p.family is not None else ("bridge", lab.TABLE, "seen-l2in")
        passed = any((e.family, e.table, e.chain) == table for e in events)
    note = ""
    if not passed and not events:
        note = "no hook saw the frame: the bridge dropped it first (a source MAC that is not unicast?)"
    elif not passed and all(s.passed for s in stages):
        note = ("the host's stack did not take it (not addressed to the host, or a martian source)"
                if destination is None else "it was dropped after the port's rules")
    return KernelResult(backend, passed, stages, note, list(keys[len(stages):]))
