"""The nftables healer's full check (daemon/nft_watch.py) against changes of ours in progress: a
check that a change overlapped (its journal on disk, or the generation moved meanwhile) sees
records and kernel of different moments, and is made again instead of repairing what only looked
broken; a check that never settles repairs after its last attempt. The kernel, the records and the
repair are stand-ins (the real healer is tested in tests/kernel/test_service_healing.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from libvirt_nwfilter.config import Config
from libvirt_nwfilter.daemon import nft_watch


class Kernel:
    """What each look at the kernel and the run directory gives, in order."""

    def __init__(self, checks: list[tuple[bool, int, int, set[str]]]):
        # (journal on disk, generation before, generation after, ports found intact) per attempt;
        # the last one repeats
        self.checks = checks
        self.calls = 0  # of generation(): two per attempt, before and after its check

    @property
    def attempt(self) -> int:
        return (self.calls - 1) // 2

    def generation(self) -> int:
        self.calls += 1
        _, before, after, _ = self.checks[min(self.attempt, len(self.checks) - 1)]
        return before if self.calls % 2 else after

    def service(self):
        record = SimpleNamespace(binding=SimpleNamespace(portdev="vp1"), ruleset_hash="h1")
        check = lambda: self.checks[min(self.attempt, len(self.checks) - 1)]  # noqa: E731
        return SimpleNamespace(
            journal=SimpleNamespace(exists=lambda: check()[0]),
            kernel_check=lambda recorded: (None, check()[3]),
            recorded=[record])


@pytest.fixture
def healer(tmp_path, monkeypatch):
    monkeypatch.setattr(nft_watch, "RETRY", (0.0, 0.0, 0.0))
    healer = nft_watch.NftablesHealer(Config(tmp_path / "conf", tmp_path / "run"), SimpleNamespace(), 3600)
    healer.repaired = []
    monkeypatch.setattr(healer, "_mine", lambda service: service.recorded)
    monkeypatch.setattr(healer, "_repair", lambda service, broken: healer.repaired.append(broken))
    monkeypatch.setattr(healer, "_publish", lambda service: None)
    return healer


def run_check(healer, monkeypatch, checks) -> Kernel:
    kernel = Kernel(checks)
    monkeypatch.setattr(nft_watch.executor, "nft_generation", kernel.generation)
    healer._check_fully(kernel.service())
    return kernel


def test_a_check_overlapped_by_a_change_of_ours_is_made_again(healer, monkeypatch):
    kernel = run_check(healer, monkeypatch, [(False, 7, 8, set()), (True, 8, 8, set()), (False, 9, 9, {"vp1"})])
    assert kernel.attempt == 2 and healer.repaired == [] and healer.intact == {"vp1": "h1"}


def test_a_settled_check_repairs_what_is_broken(healer, monkeypatch):
    kernel = run_check(healer, monkeypatch, [(False, 7, 7, set())])
    assert kernel.attempt == 0 and healer.repaired == [["vp1"]]


def test_a_check_that_never_settles_repairs_after_the_last_attempt(healer, monkeypatch):
    kernel = run_check(healer, monkeypatch, [(False, 7, 8, set())])
    assert kernel.attempt == len(nft_watch.RETRY) and healer.repaired == [["vp1"]]
