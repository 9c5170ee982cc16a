"""Which steps the executor runs through libnftables (executor.use_nft_library) and how: nft's
own options map to the library's settings, a batch is read from a memory file whose name errors
give as /dev/stdin, anything else (another program, options the library does not share) runs as
a process. The library itself is a recording stand-in here; tests/kernel/test_nft_library.py
runs the real one against the nft process."""

from __future__ import annotations

import subprocess
import threading
from types import SimpleNamespace

import pytest

from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import Step


class FakeNftables:
    instances: list["FakeNftables"] = []

    def __init__(self):
        self.settings: dict[str, bool] = {}
        self.calls: list[tuple[str, str]] = []
        self.instances.append(self)

    def __getattr__(self, name):
        if name.startswith("set_"):
            return lambda value: self.settings.__setitem__(name[4:], value)
        raise AttributeError(name)

    def cmd(self, text):
        self.calls.append(("cmd", text))
        return 0, "listed\n", ""

    def cmd_from_file(self, name):
        with open(name, encoding="utf-8") as handle:
            text = handle.read()
        self.calls.append(("file", text))
        if "bad" in text:
            return -1, "", f"{name}:2:1-3: Error: syntax error\nbad\n^^^\n"
        return 0, "", ""


@pytest.fixture
def library(monkeypatch):
    FakeNftables.instances = []
    monkeypatch.setattr(executor, "_library", SimpleNamespace(Nftables=FakeNftables))
    monkeypatch.setattr(executor, "_contexts", {})
    monkeypatch.setattr(executor, "_warming", None)
    monkeypatch.setattr(executor, "tool", lambda name: name if name.startswith("/") else f"/usr/sbin/{name}")
    monkeypatch.setattr(executor.subprocess, "run", lambda *a, **k: pytest.fail(f"a process was started: {a}"))
    return FakeNftables


def test_a_batch_runs_in_the_library_with_errors_naming_stdin(library):
    done = executor.run(Step(("nft", "-f", "-"), "add table bridge t\n"))
    assert done.returncode == 0 and library.instances[0].calls == [("file", "add table bridge t\n")]
    refused = executor.run(Step(("nft", "-f", "-"), "add table bridge t\nbad\n"))
    assert refused.returncode == 1
    assert refused.stderr.startswith("/dev/stdin:2:1-3: Error: syntax error")


def test_options_map_to_the_library_settings_for_each_command(library):
    listing = executor.run(Step(("nft", "-j", "-a", "list", "table", "bridge", "t")))
    assert listing.stdout == "listed\n"
    context, = library.instances  # one context per process, reused
    assert context.calls[-1] == ("cmd", "list table bridge t")
    assert context.settings == {"json_output": True, "handle_output": True, "dry_run": False}
    executor.run(Step(("nft", "-c", "-f", "-"), "add table bridge t\n"))
    assert context.settings == {"json_output": False, "handle_output": False, "dry_run": True}


@pytest.mark.parametrize("argv", [("ip", "link"), ("nft", "-e", "-f", "-"), ("nft", "monitor", "-n"), ("nft",),
                                  ("/opt/other/nft", "-f", "-")])
def test_anything_else_runs_as_a_process(library, monkeypatch, argv):
    started = []
    monkeypatch.setattr(executor.subprocess, "run",
                        lambda args, **kwargs: started.append(args) or subprocess.CompletedProcess(args, 0, "", ""))
    executor.run(Step(argv, "x\n"))
    assert started and not any(context.calls for context in library.instances)


def test_cache_warming_runs_its_dry_run_in_the_background_and_the_next_command_waits(library, monkeypatch):
    started, release = threading.Event(), threading.Event()
    original = FakeNftables.cmd_from_file

    def slow(self, name):
        started.set()
        assert release.wait(10)
        return original(self, name)

    monkeypatch.setattr(FakeNftables, "cmd_from_file", slow)
    executor.warm_nft_cache((Step(("nft", "-c", "-f", "-"), "add rule bridge t c accept\n"),))
    assert started.wait(10)
    context, = library.instances
    assert context.settings["dry_run"] is True and context.calls == []  # still running
    threading.Timer(0.2, release.set).start()
    executor.run(Step(("nft", "list", "tables")))  # waits for the warming, then runs
    assert context.calls == [("file", "add rule bridge t c accept\n"), ("cmd", "list tables")]
    assert context.settings["dry_run"] is False and executor._warming is None


def test_cache_warming_refuses_anything_but_a_dry_run_and_needs_the_library(library, monkeypatch):
    with pytest.raises(ValueError, match="dry runs"):
        executor.warm_nft_cache((Step(("nft", "-f", "-"), "add table bridge t\n"),))
    monkeypatch.setattr(executor, "_library", None)
    executor.warm_nft_cache((Step(("nft", "-c", "-f", "-"), "add table bridge t\n"),))
    assert executor._warming is None and library.instances == []


def test_a_process_that_entered_another_network_namespace_gets_a_context_there(library, monkeypatch):
    """A context's netlink socket stays in the namespace it was opened in (a spare warms its
    cache in the service's namespace, then its request enters the client's)."""
    namespace = [1]
    monkeypatch.setattr(executor, "_netns_inode", lambda: namespace[0])
    executor.run(Step(("nft", "list", "tables")))
    executor.run(Step(("nft", "list", "tables")))
    namespace[0] = 2
    executor.run(Step(("nft", "list", "tables")))
    first, second = library.instances
    assert len(first.calls) == 2 and len(second.calls) == 1
