"""No test judges "dropped" on its own: negative traffic checks go through tests/traffic.py,
which requires every one to have a positive twin in its batch and waits for the twin.

The lab's single checks (``frame_delivered``, ``tcp_connect``, ``udp_exchange``, ``ping``) stay
for positive checks; a ``not`` (or a comparison with False) applied to one of them is refused
here, in every test file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from traffic_audit import lone_negatives

TESTS = Path(__file__).resolve().parents[1]
def test_the_scanner_finds_lone_negatives():
    source = ("assert not lab.tcp_connect(a, ip, 80)\nassert lab.ping(a, ip)\n"
              "assert lab.frame_delivered(a, f, to=b) is False\nok = not lab.ping(a, ip)\n")
    assert lone_negatives(source) == [1, 3, 4]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py")))
def test_no_negative_check_without_its_twin(path):
    found = lone_negatives((TESTS / path).read_text())
    assert not found, f"{path}: negative checks without a positive twin on lines {found}: use tests/traffic.py"

