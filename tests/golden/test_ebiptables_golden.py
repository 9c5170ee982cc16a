"""Golden files of the ebiptables backend: tests/golden/ebiptables/<case>.txt.

Each file holds, for one hand-built PortRuleset (tests/golden/ebiptables/cases.py), the plan of
a fresh instantiation, the record, the plan of replacing it by itself, and the plan of removing
it. Regenerate with ``LIBVIRT_NWFILTER_REGEN_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend, describe_plan

GOLDEN_DIR = Path(__file__).resolve().parent / "ebiptables"
REGEN = os.environ.get("LIBVIRT_NWFILTER_REGEN_GOLDEN") == "1"

_spec = importlib.util.spec_from_file_location("ebiptables_cases", GOLDEN_DIR / "cases.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def render_case(name: str) -> str:
    port, build = cases.CASES[name]
    backend = EbiptablesBackend()
    ruleset = build()
    fresh, records = backend.plan([PortChange(port, None, ruleset)])
    record = records[port]
    replace, records2 = backend.plan([PortChange(port, record, build())])
    assert records2[port] == record
    remove, records3 = backend.plan([PortChange(port, record, None)])
    assert records3[port] is None
    out = [f"# ebiptables golden case {name!r}, port {port}\n"]
    out.append("\n# ===== instantiate (no old record) =====\n")
    out.append(describe_plan(fresh))
    out.append("\n# ===== record =====\n")
    out.append(json.dumps(record, indent=2, sort_keys=True) + "\n")
    out.append("\n# ===== replace (old record = the record above) =====\n")
    out.append(describe_plan(replace))
    out.append("\n# ===== remove =====\n")
    out.append(describe_plan(remove))
    return "".join(out)


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_golden(name):
    path = GOLDEN_DIR / f"{name}.txt"
    text = render_case(name)
    if REGEN:
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} missing: run with LIBVIRT_NWFILTER_REGEN_GOLDEN=1 and review"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path.name} differs from the rendering; if intended, regenerate with "
        "LIBVIRT_NWFILTER_REGEN_GOLDEN=1 and review the diff"
    )


def test_no_stale_golden_files():
    names = {p.stem for p in GOLDEN_DIR.glob("*.txt")}
    assert names <= set(cases.CASES), f"golden files without a case: {sorted(names - set(cases.CASES))}"
