"""Traffic verdicts whose "dropped" can be trusted: every negative has a positive twin.

"Not seen within 0.3 s" proves nothing on its own on a loaded machine: a filter that fails to
block passes such a check when the frame is merely late. Here every check of a batch runs in
one process (tests/nsprobe.py, which enters the lab's namespaces itself), so the checks of a
batch share one wait, and:

* a check expected to fail (``expect=False``) needs a **positive twin** in the same batch: a
  check expected to pass that shares its sender or its receiver (frames), or one of its two
  namespaces (connections: a connection that passes has carried traffic both ways between its
  namespaces). A batch without one is refused before anything is sent (:class:`MissingTwin`);
* the wait adapts to the load: a batch ends only once every check expected to pass has passed
  and nothing more arrived for ``settle`` seconds (frames) or ``wait`` seconds (connections),
  at most ``timeout`` seconds in all;
* frames expected dropped (and unknown ones) are sent first, those expected delivered last,
  by one process pinned to one CPU: the kernel handles a CPU's frames in order, so a twin that
  arrived was processed after the frame it vouches for;
* a check without expectation (``expect=None``: an observation, e.g. of libvirt's own
  engine) that failed counts only when a check that would be its twin passed in the same
  batch; otherwise the batch is :class:`Inconclusive`;
* a negative whose twin did not pass is inconclusive too (and the twin's own failure is
  reported by :func:`check_frames` / :func:`check_connections`).

Frames: :class:`Probe` (a frame from an endpoint, seen or not at another), run by
:func:`frames` / :func:`check_frames`. Connections: :class:`Conn` (TCP with a greeting, UDP
echo, ICMP echo), run concurrently by :func:`connections` / :func:`check_connections`.
Endpoints are :data:`netlab.Endpoint` values, plus :class:`Leaving` (frames the bridge sends
out through a port, e.g. a guest's tap).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import netlab

NSPROBE = Path(__file__).resolve().parent / "nsprobe.py"
FRAME_SETTLE = 0.3
CONN_WAIT = 0.5
TIMEOUT = 10.0
_ORDER = {False: 0, None: 1, True: 2}


class MissingTwin(AssertionError):
    """A check expected to fail has no check expected to pass beside it in its batch."""


class Inconclusive(AssertionError):
    """A failed check has no twin that passed in the same wait: its failure proves nothing."""


@dataclass(frozen=True)
class Leaving:
    """Receiver: the frames the bridge sends out through ``port`` (captured on the port in the
    host namespace, after every bridge hook; e.g. a guest's tap, where no VM namespace is)."""

    port: str
    name: str = "leaving"


@dataclass(frozen=True)
class Probe:
    """One frame sent from ``src`` that should (``expect=True``) or should not arrive at ``dst``
    (``None``: observed only). ``src``/``dst`` are :data:`netlab.Endpoint` values, ``dst`` also
    a :class:`Leaving`. ``name`` identifies the probe in reports (unique within a batch)."""

    name: str
    src: object
    frame: bytes
    dst: object
    expect: bool | None = None
    seen_as: bytes | None = None
    """What the receiver's packet socket sees when it differs from ``frame``: the kernel moves
    an 802.1Q tag into metadata on receive, so a tagged frame arrives untagged."""


@dataclass(frozen=True)
class Conn:
    """One connection check from ``src`` (a VM, or anything with ``.ns``) to ``dst_ip``:
    ``kind`` ``tcp`` (a listener greets), ``udp`` (a listener echoes) or ``ping``. The listener
    runs in ``dst_ns`` (default: the namespace owning ``dst_ip``); ``source_ip`` binds the
    client (``ping -I``)."""

    name: str
    kind: str
    src: object
    dst_ip: str
    port: int | None = None
    expect: bool | None = None
    source_ip: str | None = None
    dst_ns: str | None = None


@dataclass(frozen=True)
class Result:
    """A connection check's result: ``outcome`` is ok, refused, unreachable, timeout or error."""

    ok: bool
    outcome: str
    error: str | None
    seconds: float

    def __bool__(self) -> bool:
        return self.ok


# ------------------------------------------------------------------------------------------
# Twins


def _require_twins(checks: Sequence, twins) -> None:
    lonely = [c.name for c in checks if c.expect is False
              and not any(p.expect is True and twins(c, p) for p in checks)]
    if lonely:
        raise MissingTwin(f"negative checks without a positive twin in their batch: {lonely}")


def _inconclusive(checks: Sequence, passed: dict, twins) -> list[str]:
    """Failed negatives/observations without a passed twin."""
    def vouches(c, p) -> bool:
        return p is not c and passed[p.name] and (c.expect is None or p.expect is True) and twins(c, p)

    return [c.name for c in checks if c.expect is not True and not passed[c.name]
            and not any(vouches(c, p) for p in checks)]


def _conclusive(verdicts: dict, inconclusive: list[str]) -> dict:
    if inconclusive:
        raise Inconclusive(f"failed, but no positive twin passed in the same wait, so this proves nothing: "
                           f"{inconclusive}\nverdicts: {verdicts}")
    return verdicts


def _assert_expected(checks: Sequence, verdicts: dict, inconclusive: list[str], wanted: tuple[str, str],
                     got, context: str) -> None:
    """One AssertionError listing every check whose verdict is not its ``expect`` (``wanted``:
    how to say pass and fail; ``got``: how to show a verdict) and every inconclusive one."""
    problems = [f"{c.name}: expected {wanted[0] if c.expect else wanted[1]}, got {got(verdicts[c.name])}"
                for c in checks if c.expect is not None and bool(verdicts[c.name]) != c.expect]
    problems += [f"{name}: inconclusive (its positive twin did not pass)" for name in inconclusive
                 if not any(line.startswith(f"{name}:") for line in problems)]
    assert not problems, (context + "\n" if context else "") + "\n".join(problems)


def _unique_names(checks: Sequence) -> None:
    names = [c.name for c in checks]
    assert len(set(names)) == len(names), f"duplicate check names: {names}"


def _run(command: str, spec: dict, timeout: float) -> dict:
    proc = subprocess.run([netlab.PYTHON, str(NSPROBE), command], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout + 30)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise netlab.NetlabError(f"nsprobe {command} failed (exit {proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------------
# Frames


def _receiver(lab: netlab.Lab, endpoint) -> tuple[str, str, bool]:
    if isinstance(endpoint, Leaving):
        return lab.host_ns, endpoint.port, True
    return (*lab.where(endpoint), False)


def run_frames(lab: netlab.Lab, probes: Sequence[Probe], settle: float = FRAME_SETTLE,
               timeout: float = TIMEOUT) -> tuple[dict[str, bool], list[str]]:
    """Send every probe's frame; ``({name: delivered}, [inconclusive probe names])``.

    Each frame gets a random 8-byte trailer (and padding to 60 bytes) and is recognised by its
    own bytes (bridge netfilter may trim the trailer of IP packets). Frames must differ from
    each other and none may be a prefix of another (checked)."""
    _unique_names(probes)
    sender = lambda p: lab.where(p.src)  # noqa: E731
    receiver = lambda p: _receiver(lab, p.dst)  # noqa: E731
    twins = lambda c, p: sender(c) == sender(p) or receiver(c) == receiver(p)  # noqa: E731
    _require_twins(probes, twins)
    seen_bytes = [bytes(p.seen_as if p.seen_as is not None else p.frame) for p in probes]
    for i, a in enumerate(seen_bytes):
        for j, b in enumerate(seen_bytes):
            if i != j and b.startswith(a):
                raise AssertionError(f"probe {probes[i].name!r} is a prefix of {probes[j].name!r}: "
                                     "make frames unique")
    receivers = list(dict.fromkeys(receiver(p) for p in probes))
    order = sorted(range(len(probes)), key=lambda i: _ORDER[probes[i].expect])
    frames = []
    for i in order:
        wire = bytes(probes[i].frame) + secrets.token_bytes(8)
        frames.append({"send": list(sender(probes[i])), "wire": (wire + bytes(max(0, 60 - len(wire)))).hex(),
                       "match": seen_bytes[i].hex(), "receiver": receivers.index(receiver(probes[i])),
                       "await": probes[i].expect is True})
    report = _run("frames", {"receivers": receivers, "frames": frames, "settle": settle,
                             "timeout": timeout}, timeout)
    seen = dict(zip((probes[i].name for i in order), report["seen"]))
    delivered = {p.name: seen[p.name] for p in probes}
    return delivered, _inconclusive(probes, delivered, twins)


def frames(lab: netlab.Lab, probes: Sequence[Probe], settle: float = FRAME_SETTLE,
           timeout: float = TIMEOUT) -> dict[str, bool]:
    """``{probe.name: delivered}`` for a batch (see the module docstring); raises
    :class:`Inconclusive` when a failed probe has no twin that passed."""
    return _conclusive(*run_frames(lab, probes, settle, timeout))


def check_frames(lab: netlab.Lab, probes: Sequence[Probe], settle: float = FRAME_SETTLE,
                 context: str = "", timeout: float = TIMEOUT) -> dict[str, bool]:
    """:func:`frames`, then assert every probe with an ``expect`` got it (one message listing
    every wrong or inconclusive verdict)."""
    delivered, inconclusive = run_frames(lab, probes, settle, timeout)
    _assert_expected(probes, delivered, inconclusive, ("delivered", "dropped"),
                     lambda seen: "delivered" if seen else "dropped", context)
    return delivered


# ------------------------------------------------------------------------------------------
# Connections


def _src_ns(lab: netlab.Lab, src) -> str:
    if src == netlab.HOST:
        return lab.host_ns
    if isinstance(src, str):
        return lab.vms[src].ns
    return src.ns


def _dst_ns(lab: netlab.Lab, conn: Conn) -> str:
    if conn.dst_ns:
        return conn.dst_ns
    try:
        return lab.ns_of_ip(conn.dst_ip)
    except KeyError:
        if conn.kind != "ping":
            raise
        return conn.dst_ip  # an address nobody in the lab owns


def run_connections(lab: netlab.Lab, checks: Sequence[Conn], wait: float = CONN_WAIT,
                    timeout: float = TIMEOUT) -> tuple[dict[str, Result], list[str]]:
    """Run every check at once; ``({name: Result}, [inconclusive check names])``."""
    _unique_names(checks)
    sender = lambda c: _src_ns(lab, c.src)  # noqa: E731
    receiver = lambda c: _dst_ns(lab, c)  # noqa: E731
    twins = lambda c, p: bool({sender(c), receiver(c)} & {sender(p), receiver(p)})  # noqa: E731
    _require_twins(checks, twins)
    servers = list(dict.fromkeys((receiver(c), c.kind, c.dst_ip, c.port) for c in checks
                                 if c.kind in ("tcp", "udp")))
    clients = [{"netns": sender(c), "kind": c.kind, "addr": c.dst_ip, "port": c.port,
                "source": c.source_ip, "await": c.expect is True} for c in checks]
    report = _run("conns", {"servers": servers, "clients": clients, "wait": wait, "timeout": timeout},
                  timeout)
    results = {c.name: Result(**r) for c, r in zip(checks, report["results"])}
    passed = {name: r.ok for name, r in results.items()}
    return results, _inconclusive(checks, passed, twins)


def connections(lab: netlab.Lab, checks: Sequence[Conn], wait: float = CONN_WAIT,
                timeout: float = TIMEOUT) -> dict[str, Result]:
    """``{check.name: Result}`` (truthy when it passed); raises :class:`Inconclusive` when a
    failed check has no twin that passed."""
    return _conclusive(*run_connections(lab, checks, wait, timeout))


def check_connections(lab: netlab.Lab, checks: Sequence[Conn], wait: float = CONN_WAIT,
                      context: str = "", timeout: float = TIMEOUT) -> dict[str, Result]:
    """:func:`connections`, then assert every check with an ``expect`` got it."""
    results, inconclusive = run_connections(lab, checks, wait, timeout)
    _assert_expected(checks, results, inconclusive, ("success", "failure"),
                     lambda r: r.outcome + (f" ({r.error})" if r.error else ""), context)
    return results
