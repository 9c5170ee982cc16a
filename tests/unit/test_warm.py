"""What the request server keeps warm (daemon/warm.py): every recorded binding compiled once at
start, then only what changed since (a record written, or every one when a filter changed), the
index read again whenever it changed; a record that cannot be compiled is left to the request
that needs it."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from libvirt_nwfilter.config import Config
from libvirt_nwfilter.daemon import warm


class FakeService:
    """Records which bindings were compiled and planned."""

    compiled: list[str] = []
    planned: list[str] = []
    broken: set[str] = set()
    index_reads = 0

    def __init__(self, config):
        self.backend = SimpleNamespace(name="nftables", plan=self._plan)
        self.state = SimpleNamespace(get=self._get, spell_index=self._index)

    @classmethod
    def _index(cls):
        cls.index_reads += 1  # read (kept) and spelled ahead

    def _get(self, port):
        return SimpleNamespace(binding=SimpleNamespace(portdev=port), backend="nftables")

    def ruleset(self, binding):
        if binding.portdev in self.broken:
            raise ValueError("unknown filter")
        self.compiled.append(binding.portdev)
        return ("ruleset", binding.portdev)

    def _plan(self, changes):
        self.planned.extend(change.port for change in changes)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    FakeService.compiled, FakeService.planned, FakeService.broken, FakeService.index_reads = [], [], set(), 0
    monkeypatch.setattr(warm, "Service", FakeService)
    monkeypatch.setattr(warm, "ruleset_hash", lambda ruleset: "h")
    config = Config(tmp_path / "conf", tmp_path / "run")
    (tmp_path / "conf" / "filters").mkdir(parents=True)
    (tmp_path / "run" / "bindings").mkdir(parents=True)
    return config, warm.Warmer(config)


def write(directory, name, text="{}"):
    """Written as the state and the store write: a new file renamed into place."""
    temporary = directory / f".{name}.tmp"
    temporary.write_text(text)
    os.replace(temporary, directory / name)


def test_every_record_is_compiled_at_start_then_only_what_changed(setup):
    config, warmer = setup
    bindings = config.rundir / "bindings"
    for port in ("vnet0", "vnet1", "vnet2"):
        write(bindings, f"{port}.json")
    warmer.run()
    assert sorted(FakeService.compiled) == ["vnet0", "vnet1", "vnet2"]
    assert sorted(FakeService.planned) == ["vnet0", "vnet1", "vnet2"]  # the nft text rendered too

    FakeService.compiled.clear()
    assert warmer.step() is False and FakeService.compiled == []  # nothing changed: no work

    write(bindings, "vnet1.json", '{"changed": 1}')
    warmer.run()
    assert FakeService.compiled == ["vnet1"]


def test_an_index_written_after_its_records_is_read_again(setup):
    """A removal writes the index after deleting the record: a pass that began between the two
    kept the old index, which the next pass replaces (no record to compile then)."""
    config, warmer = setup
    write(config.rundir / "bindings", "vnet0.json")
    warmer.run()
    reads, passes = FakeService.index_reads, warmer.passes
    write(config.rundir, "index.json", '{"vnet0": {}}')
    warmer.run()
    assert FakeService.index_reads == reads + 1 and warmer.passes == passes + 1
    assert FakeService.compiled == ["vnet0"]  # compiled once, at start
    assert warmer.step() is False and warmer.passes == passes + 1


def test_a_changed_filter_compiles_every_record_again(setup):
    config, warmer = setup
    for port in ("vnet0", "vnet1"):
        write(config.rundir / "bindings", f"{port}.json")
    warmer.run()
    FakeService.compiled.clear()
    write(config.confdir / "filters", "clean-traffic.xml", "<filter/>")
    warmer.run()
    assert sorted(FakeService.compiled) == ["vnet0", "vnet1"]


def test_a_record_that_does_not_compile_leaves_the_others_warm(setup):
    config, warmer = setup
    for port in ("vnet0", "vnet1", "vnet2"):
        write(config.rundir / "bindings", f"{port}.json")
    FakeService.broken = {"vnet1"}
    warmer.run()
    assert sorted(FakeService.compiled) == ["vnet0", "vnet2"]


def test_work_is_done_in_slices(setup, monkeypatch):
    config, warmer = setup
    for port in range(5):
        write(config.rundir / "bindings", f"vnet{port}.json")
    monkeypatch.setattr(warm, "SLICE", -1.0)  # every slice is used up after one record
    per_step, more = [], True
    while more:
        before = len(FakeService.compiled)
        more = warmer.step()
        per_step.append(len(FakeService.compiled) - before)
    assert max(per_step) == 1 and sum(per_step) == 5
