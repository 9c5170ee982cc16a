"""Golden files of the ebiptables backend, and the kernel's verdict on every one of them.

Each case of ``cases.py`` is rendered (the plan of a fresh instantiation, the record, the plan
of replacing it by itself, the plan of removing it) and compared with ``<case>.txt`` beside this
file (``tests/golden/files.py``: how to regenerate).

The kernel tests run the three plans of every case in a throw-away network namespace (with the
ipsets the cases name): each is accepted, and afterwards the kernel holds exactly the objects
the record lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import netlab
from golden import files
from golden.ebiptables import cases
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import Plan, PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.ebiptables.names import is_temp_chain
from libvirt_nwfilter.backends.ebiptables.tools import TOOLS

HERE = Path(__file__).resolve().parent
CASE_IDS = [case.name for case in cases.CASES]


def describe_plan(plan: Plan) -> str:
    """Readable text of a plan: each step's command line, then its input."""
    out = []
    for phase in ("apply", "commit", "rollback"):
        for i, step in enumerate(getattr(plan, phase), 1):
            flag = " (errors ignored)" if step.ignore_errors else ""
            out.append(f"## {phase} {i}: {' '.join(step.argv)}{flag}\n")
            out.append(step.stdin)
    return "".join(out)


def golden_text(case: cases.Case) -> str:
    backend = EbiptablesBackend()
    fresh, records = backend.plan([PortChange(case.port, None, case.build())])
    record = records[case.port]
    replace, records2 = backend.plan([PortChange(case.port, record, case.build())])
    assert records2[case.port] == record
    remove, records3 = backend.plan([PortChange(case.port, record, None)])
    assert records3[case.port] is None
    return "".join([
        f"# ebiptables golden case {case.name!r}, port {case.port}\n",
        "\n# ===== instantiate (no old record) =====\n", describe_plan(fresh),
        "\n# ===== record =====\n", json.dumps(record, indent=2, sort_keys=True) + "\n",
        "\n# ===== replace (old record = the record above) =====\n", describe_plan(replace),
        "\n# ===== remove =====\n", describe_plan(remove),
    ])


@pytest.mark.parametrize("case", cases.CASES, ids=CASE_IDS)
def test_golden(case):
    files.check(HERE / f"{case.name}.txt", golden_text(case))


def test_no_stray_golden_files():
    assert not files.stray(HERE, ".txt", CASE_IDS), "golden files without a case"


def test_describe_plan():
    plan, _ = EbiptablesBackend().plan([PortChange("vp1", None, cases.to_vm_only())])
    text = describe_plan(plan)
    assert text.startswith("## apply 1: ebtables-restore --noflush\n*nat\n")
    assert "## rollback 1: ebtables-restore --noflush (errors ignored)\n" in text


# ---------------------------------------------------------------------------------------------
# Kernel


def held(backend: EbiptablesBackend, ns: str) -> dict:
    """Per port, what the kernel holds of ours: chains and the number of rules per tool, L2
    sub-chains per side, L3 families (rules are listed in the tools' own option order)."""
    found = backend.inventory(executor.survey(backend.survey_steps(), ns))
    return {port: summary(record) for port, record in found.items()}


def summary(record) -> tuple:
    tools = tuple((sorted(record[t.name]["chains"]), len(record[t.name]["rules"])) for t in TOOLS)
    l2 = {side: sorted(subs) if subs is not None else None for side, subs in record["l2"].items()}
    return tools, l2, record["l3"]


@pytest.mark.kernel
@pytest.mark.parametrize("case", cases.CASES, ids=CASE_IDS)
def test_golden_accepted_by_kernel(case, netns):
    for name in cases.IPSETS:
        netlab.run_in(netns, ["ipset", "create", name, "hash:ip"])
    backend = EbiptablesBackend()
    record = None
    for new in (case.build(), case.build(), None):  # instantiate, replace by itself, remove
        plan, records = backend.plan([PortChange(case.port, record, new)])
        executor.execute(plan, netns)
        record = records[case.port]
        expected = {case.port: summary(record)} if record and any(
            record[t.name]["chains"] or record[t.name]["rules"] for t in TOOLS) else {}
        assert held(backend, netns) == expected
        saved = executor.survey(backend.survey_steps(), netns)
        assert not [line for line in "".join(saved).splitlines() if line.startswith(":") and
                    is_temp_chain(line[1:].split()[0])], "temporary chains left"
