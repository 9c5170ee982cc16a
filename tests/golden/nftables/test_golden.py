"""Golden files of the nftables backend, and the kernel's verdict on every one of them.

Each case of ``cases.py`` is rendered (all its batches, records passed along) and compared
with ``<case>.nft`` beside this file (``tests/golden/files.py``: how to regenerate).

The kernel tests load every case into a throw-away network namespace: the setup batches for
real, then the golden batch with ``nft -c -f -`` (check only) and for real, then our teardown,
after which no table may be left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import netlab
from golden import files
from golden.nftables import cases
from libvirt_nwfilter.backends.nftables import probe_bridge_conntrack_text, probe_l2_reject_text

HERE = Path(__file__).resolve().parent
CASE_IDS = [case.name for case in cases.CASES]


def golden_text(case: cases.Case) -> str:
    texts = case.batches(cases.backend_for(case))
    parts = []
    for index, text in enumerate(texts, 1):
        role = "golden" if index == len(texts) else "setup"
        parts.append(f"#### batch {index} of {len(texts)} ({role})\n{text}")
    return "\n".join(parts)


@pytest.mark.parametrize("case", cases.CASES, ids=CASE_IDS)
def test_golden(case):
    files.check(HERE / f"{case.name}.nft", golden_text(case))


def test_no_stray_golden_files():
    assert not files.stray(HERE, ".nft", CASE_IDS), "golden files without a case"


# ----------------------------------------------------------------------------------------------
# Kernel


def nft(ns: str, text: str, check_only: bool = False):
    argv = ["nft", "-c", "-f", "-"] if check_only else ["nft", "-f", "-"]
    return netlab.run_in(ns, argv, input=text, check=False)


def kernel_supports(ns: str, probe_text: str) -> bool:
    return nft(ns, probe_text, check_only=True).returncode == 0


@pytest.mark.kernel
@pytest.mark.parametrize("case", cases.CASES, ids=CASE_IDS)
def test_golden_accepted_by_kernel(case, netns):
    backend = cases.backend_for(case)
    texts = case.batches(backend)
    expect_ok = True
    if case.needs_bridge_ct and not kernel_supports(netns, probe_bridge_conntrack_text()):
        expect_ok = False
    if case.l2_reject and not kernel_supports(netns, probe_l2_reject_text()):
        expect_ok = False
    for setup in texts[:-1]:
        proc = nft(netns, setup)
        assert proc.returncode == 0, f"setup batch refused:\n{proc.stderr}"
    before = netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout
    checked = nft(netns, texts[-1], check_only=True)
    if not expect_ok:
        # the probe said no: the kernel must refuse this batch as well (the probe predicts it)
        assert checked.returncode != 0, "probe said unsupported but the kernel accepted the batch"
        assert netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout == before
        return
    assert checked.returncode == 0, f"nft -c refused {case.name}:\n{checked.stderr}"
    assert netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout == before, "nft -c changed the ruleset"
    applied = nft(netns, texts[-1])
    assert applied.returncode == 0, f"nft -f refused {case.name}:\n{applied.stderr}"
    for step in backend.teardown_plan([]).apply:
        proc = netlab.run_in(netns, list(step.argv), input=step.stdin, check=False)
        assert proc.returncode == 0, proc.stderr
    assert netlab.run_in(netns, ["nft", "list", "tables"]).stdout.strip() == ""
