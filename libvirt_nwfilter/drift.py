"""Does the kernel hold exactly what the records say? (``verify``, hook ``reconnect``, ``reapply``)

A port is intact when its rules in the kernel have the digest of a reference: the same
backend's rebuild of the recorded rulesets in a throw-away network namespace (both sides in the
kernel's own printed form, so neither generations nor ids nor other ports matter). Applying a
change computes no digest; only these checks pay for the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from . import executor
from .backends.base import Backend, PortChange, Step
from .ir import Field, PortRuleset
from .model import Binding
from .state import AppliedBinding


@dataclass(frozen=True)
class Drift:
    """Something that disagrees: a port (its kernel rules, record or filters) or a file."""

    subject: str
    problem: str
    file: bool = False  # a file of ours that cannot be used (the problem names the repair)


def kernel_drift(backend: Backend, recorded: Sequence[AppliedBinding], compile: Callable[[Binding], PortRuleset],
                 named: Sequence[AppliedBinding] = (), kept: Iterable[str] = ()) -> list[Drift]:
    """One Drift per recorded port whose kernel rules are not what its record says, and one
    per port of which the kernel holds objects of ours that no record names (:func:`orphans`;
    ``named``: every readable record, ``kept``: the ports whose record cannot be read)."""
    found = []
    survey = executor.survey(backend.survey_steps())
    live, intact = kernel_check(backend, recorded, compile, survey)
    for applied in recorded:
        port = applied.binding.portdev
        if applied.backend != backend.name:
            found.append(Drift(port, f"applied with backend {applied.backend}, configured {backend.name}; "
                                     "the next change (or 'reapply') moves it"))
        elif live.get(port) is None:
            found.append(Drift(port, "rules missing from the kernel"))
        elif port not in intact:
            found.append(Drift(port, "kernel rules differ from the recorded ones (missing, extra or changed)"))
    return found + orphans(backend, survey, named, kept)


def orphans(backend: Backend, survey: Sequence[str], named: Sequence[AppliedBinding], kept: Iterable[str],
            ) -> list[Drift]:
    """Per port, the kernel objects of ours (``survey``: the outputs of the backend's survey
    steps) that no record in ``named`` names: a port without a record, an older generation,
    a stray dispatch entry or mark id. The ports ``kept`` (records that cannot be read) are
    left out: a rebuild keeps their objects as they are."""
    records = {a.binding.portdev: a.record for a in named if a.backend == backend.name}
    found = []
    kept = set(kept)
    for port, held in sorted(backend.inventory(survey).items()):
        if port in kept:
            continue
        extra = backend.unrecorded(held, records.get(port))
        if extra:
            what = "kernel objects its record does not name" if port in records else \
                "no binding record, yet the kernel holds"
            found.append(Drift(port, f"{what}: {', '.join(extra)}; 'reapply' removes them"))
    return found


def kernel_check(backend: Backend, recorded: Sequence[AppliedBinding], compile: Callable[[Binding], PortRuleset],
                 survey: Sequence[str] | None = None) -> tuple[dict[str, str | None], set[str]]:
    """The live digest of each port, and the ports whose kernel rules are intact (``survey``:
    the outputs of the backend's survey steps, listed here when not given)."""
    mine = [a for a in recorded if a.backend == backend.name]
    if not mine:
        return {}, set()
    steps = backend.survey_steps()
    live = backend.kernel_digests(executor.survey(steps) if survey is None else survey,
                                  {a.binding.portdev: a.record for a in mine})
    changes = [PortChange(a.binding.portdev, a.record, compile(a.binding)) for a in mine]
    with executor.reference_namespace() as netns:
        _copy_ipsets(changes, netns)
        plan, records = backend.rebuild_plan(changes, ["" for _ in steps], [])
        executor.execute(plan, netns)
        built = executor.survey(steps, netns)
    reference = backend.kernel_digests(built, {p: r for p, r in records.items() if r is not None})
    return live, {port for port, digest in live.items() if digest is not None and digest == reference.get(port)}


def _copy_ipsets(changes: Sequence[PortChange], netns: str) -> None:
    """Copy the kernel ipsets the rules name into ``netns`` (rules referring to a missing set
    are refused by iptables)."""
    names = {cond.value.name for change in changes if change.new is not None
             for rule in change.new.fi + change.new.fo + change.new.hi
             for cond in rule.conds if cond.field is Field.IPSET}
    for name in sorted(names):
        found, saved = executor.query(("ipset", "save", name))
        if found:
            executor.run(Step(("ipset", "restore", "-exist"), saved), netns)
