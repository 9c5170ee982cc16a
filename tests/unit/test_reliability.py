"""Reliability without a kernel: configuration, the bounded lock, expansion limits, domain XML of
any size, validated files of the run directory, and the small defects of issue 9.

Processes that must be separate (a lock holder, the CLI and the hook as libvirt runs them, with
their memory measured) are real subprocesses; nothing here needs root or a network namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_nwfilter import cli, executor, files, state as state_mod
from libvirt_nwfilter.config import Config
from libvirt_nwfilter.errors import ExpansionLimitError, FirewallError, NwfilterError
from libvirt_nwfilter.journal import Journal, JournalDamaged
from libvirt_nwfilter.lock import LockTimeout, host_lock
from libvirt_nwfilter.model import FilterRef
from libvirt_nwfilter.resolve import resolve
from libvirt_nwfilter.service import Service
from libvirt_nwfilter.state import AppliedBinding, RecordError, State
from libvirt_nwfilter.bindingxml import parse_binding
from libvirt_nwfilter.xml import parse_filter

ROOT = Path(__file__).resolve().parents[2]
NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC = "52:54:00:00:00:01"


def python_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIBVIRT_NWFILTER_")}
    env.update(LIBVIRT_NWFILTER_CONFDIR=str(tmp_path / "conf"), LIBVIRT_NWFILTER_RUNDIR=str(tmp_path / "run"),
               PYTHONPATH=str(ROOT), **extra)
    return env


# Runs argv[1:] and reports its peak memory on the last line of stderr. The measured process must
# be started by a small process: its first exec records the peak of the memory it was started
# from (pytest's, with vfork) as its own.
_MEASURER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
sys.stderr.write(f"\\npeak-kib={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(argv: list[str], env: dict[str, str], stdin: bytes = b"", timeout: float = 120) \
        -> tuple[int, bytes, str, float, float]:
    """Run ``argv``; (exit status, stdout, stderr, seconds, peak memory of that process in MiB)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _MEASURER, *argv], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=timeout)
    errors, _, peak = done.stderr.decode().rpartition("\npeak-kib=")
    return done.returncode, done.stdout, errors, time.monotonic() - started, int(peak) / 1024


def domain_xml(description_bytes: int = 0, metadata: bool = True, target: str = "vnet0",
               ip: str = "10.0.0.5", filter: str = "clean-traffic") -> bytes:
    meta = (f"<metadata><nwf:nwfilter xmlns:nwf='{NS}'><nwf:interface mac='{MAC}'><nwf:filterref filter='{filter}'>"
            f"<nwf:parameter name='IP' value='{ip}'/></nwf:filterref></nwf:interface></nwf:nwfilter></metadata>"
            if metadata else "")
    description = "<description>" + "d" * description_bytes + "</description>" if description_bytes else ""
    disks = "<disk type='file' device='disk'><source file='/nowhere.img'/><target dev='vda'/></disk>" * 2000
    return (f"<domain type='kvm'><name>big</name><uuid>{UUID}</uuid>{description}{meta}<devices>{disks}"
            f"<interface type='bridge'><mac address='{MAC}'/><source bridge='br0'/><target dev='{target}'/>"
            "</interface></devices></domain>").encode()


def hook_argv(operation: str) -> list[str]:
    return [sys.executable, "-m", "libvirt_nwfilter.hook", "big", operation, "begin", "-"]


# ----------------------------------------------------------------------------------------------
# Configuration (item 8)


def test_confdir_option_reads_that_directorys_configuration_file(tmp_path):
    confdir = tmp_path / "elsewhere"
    confdir.mkdir()
    (confdir / "libvirt-nwfilter.conf").write_text(
        "# comment\nbackend = ebiptables\nlock-timeout = 3.5\nhook-lock-timeout=2\nmax-rules-per-binding = 50\n")
    config = Config.load({"LIBVIRT_NWFILTER_CONFDIR": str(tmp_path / "unused")}, confdir=str(confdir))
    assert (config.confdir, config.backend, config.lock_timeout, config.hook_lock_timeout, config.max_rules) == \
        (confdir, "ebiptables", 3.5, 2.0, 50)
    assert config.for_hook().lock_timeout == 2.0
    # the environment overrides the file, options override both
    config = Config.load({"LIBVIRT_NWFILTER_BACKEND": "nftables", "LIBVIRT_NWFILTER_LOCK_TIMEOUT": "7"},
                         confdir=str(confdir))
    assert (config.backend, config.lock_timeout) == ("nftables", 7.0)
    assert Config.load({}, confdir=str(confdir), backend="nftables", lock_timeout="1").lock_timeout == 1.0


@pytest.mark.parametrize("line, words", [
    ("backend = iptables", ["conf:1", "unknown backend 'iptables'"]),
    ("lock-timeout = soon", ["conf:1", "'soon' is not a number of seconds"]),
    ("lock-timeout = nan", ["'nan' is not a number of seconds"]),
    ("max-rules-per-binding = 0", ["'0' is not a positive whole number"]),
    ("backend", ["expected 'key = value'"]),
])
def test_invalid_configuration_is_one_line_naming_the_file_and_line(tmp_path, line, words):
    confdir = tmp_path / "c"
    confdir.mkdir()
    (confdir / "libvirt-nwfilter.conf").write_text(line + "\n")
    with pytest.raises(NwfilterError) as error:
        Config.load({}, confdir=str(confdir))
    assert all(word in str(error.value) for word in words), error.value
    lenient = Config.load({}, confdir=str(confdir), strict=False)
    assert lenient.problem == str(error.value) and lenient.confdir == confdir
    with pytest.raises(NwfilterError, match="libvirt-nwfilter.conf"):
        Service(lenient)


def test_cli_confdir_option_uses_its_configuration(tmp_path):
    confdir = tmp_path / "c"
    confdir.mkdir()
    (confdir / "libvirt-nwfilter.conf").write_text("backend = bogus\n")
    done = subprocess.run([sys.executable, "-m", "libvirt_nwfilter", "--confdir", str(confdir), "--rundir",
                           str(tmp_path / "run"), "list"], capture_output=True, text=True, cwd=ROOT,
                          env=python_env(tmp_path))
    assert done.returncode == 1
    assert done.stderr == f"error: {confdir}/libvirt-nwfilter.conf:1: unknown backend 'bogus' " \
                          "(expected nftables or ebiptables)\n"


def test_unknown_setting_is_a_warning(tmp_path, caplog):
    confdir = tmp_path / "c"
    confdir.mkdir()
    (confdir / "libvirt-nwfilter.conf").write_text("colour = blue\n")
    assert Config.load({}, confdir=str(confdir)).backend == "nftables"
    assert "unknown setting 'colour' ignored" in caplog.text


# ----------------------------------------------------------------------------------------------
# The lock (item 6)

HOLDER = """
import sys, time
from pathlib import Path
from libvirt_nwfilter.lock import host_lock
with host_lock(Path(sys.argv[1]), 5):
    print("holding", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held_lock(tmp_path):
    """RUNDIR/lock held by another process (``python -c ... lock-holder``)."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(rundir / "lock"), "lock-holder"],
                              stdout=subprocess.PIPE, text=True, env=python_env(tmp_path), cwd=ROOT)
    assert holder.stdout.readline() == "holding\n"
    yield holder
    holder.kill()
    holder.wait()


def test_lock_wait_is_bounded_and_names_the_holder(tmp_path, held_lock):
    started = time.monotonic()
    with pytest.raises(LockTimeout) as error:
        with host_lock(tmp_path / "run" / "lock", 0.5):
            pass
    assert time.monotonic() - started >= 0.5
    assert f"held by pid {held_lock.pid} (-c " in str(error.value) and "lock-holder" in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_gives_up_after_its_lock_timeout_with_one_line(tmp_path, held_lock):
    flt = tmp_path / "f.xml"
    flt.write_text("<filter name='mine' chain='root'><rule action='drop' direction='in'/></filter>")
    code, _, err, seconds, _ = measured([sys.executable, "-m", "libvirt_nwfilter", "--lock-timeout", "1", "define",
                                         str(flt)], python_env(tmp_path))
    print(f"CLI gave up after {seconds:.2f} s (lock-timeout 1)")
    assert code == 1 and seconds >= 1
    assert err.count("\n") == 1 and err.startswith("error: gave up after 1 s waiting for the lock"), err
    assert f"held by pid {held_lock.pid}" in err and "lock-holder" in err


def test_hook_gives_up_after_its_hook_lock_timeout_with_one_line(tmp_path, held_lock):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "libvirt-nwfilter.conf").write_text("hook-lock-timeout = 1\n")
    code, _, err, seconds, _ = measured(hook_argv("start"), python_env(tmp_path), domain_xml())
    print(f"hook start gave up after {seconds:.2f} s (hook-lock-timeout 1)")
    assert code == 1 and seconds >= 1
    assert err.count("\n") == 1 and err.startswith("libvirt-nwfilter: domain 'big': gave up after 1 s"), err
    assert f"held by pid {held_lock.pid}" in err
    # teardown never fails: the guest's bindings are looked for and the wait is logged only
    code, _, err, _, _ = measured(hook_argv("stopped"), python_env(tmp_path), domain_xml())
    assert (code, err) == (0, "")


def test_lock_file_symlink_is_refused(tmp_path):
    (tmp_path / "target").write_text("")
    (tmp_path / "lock").symlink_to(tmp_path / "target")
    with pytest.raises(NwfilterError, match="is a symbolic link; refusing to follow it"):
        with host_lock(tmp_path / "lock", 1):
            pass


# ----------------------------------------------------------------------------------------------
# Expansion limits (item 7)

BOMB = ("<filter name='bomb' chain='root'><rule action='accept' direction='out'>"
        "<tcp srcipaddr='$A' dstipaddr='$B[@1]' srcportstart='$C[@2]' dstportstart='$D[@3]'/></rule>"
        "<rule action='accept' direction='out'><udp srcipaddr='$A' dstipaddr='$B[@1]' srcportstart='$C[@2]' "
        "dstportstart='$D[@3]' dscp='$E[@4]'/></rule></filter>")


def _lists(count: int) -> dict[str, tuple[str, ...]]:
    addresses = tuple(f"10.{i // 250}.{i % 250}.1" for i in range(count))
    ports = tuple(str(1000 + i) for i in range(count))
    return {"A": addresses, "B": addresses, "C": ports, "D": ports, "E": tuple(str(i % 64) for i in range(count))}


def _bomb_ref(count: int) -> FilterRef:
    return FilterRef("bomb", tuple(sorted(_lists(count).items())))


def test_expansion_is_counted_before_it_is_made():
    lookup = {"bomb": parse_filter(BOMB)}.get
    # 300**4 * (1 + 64) = 5.3e11 rules: refused without making any (this test would never end)
    with pytest.raises(ExpansionLimitError) as error:
        resolve(_bomb_ref(300), MAC, lookup, max_rules=100_000)
    text = str(error.value)
    assert f"filter 'bomb' would expand to {300 ** 4 * 65} rules, more than the 100000" in text, text
    assert f"filter 'bomb' rule 2 alone gives {300 ** 4 * 64}" in text
    assert "list variables A (300 values), B[@1] (300 values), C[@2] (300 values), D[@3] (300 values), " \
           "E[@4] (64 values)" in text
    assert "\n" not in text


def test_expansion_at_the_limit_is_allowed():
    lookup = {"bomb": parse_filter(BOMB)}.get
    rules = len(resolve(_bomb_ref(3), MAC, lookup, max_rules=3 ** 4 + 3 ** 5))
    assert rules == 3 ** 4 + 3 ** 5
    with pytest.raises(ExpansionLimitError):
        resolve(_bomb_ref(3), MAC, lookup, max_rules=3 ** 4 + 3 ** 5 - 1)


def _bomb_binding(tmp_path: Path, count: int) -> Path:
    params = "".join(f"<parameter name='{name}' value='{value}'/>" for name, values in _lists(count).items()
                     for value in values)
    path = tmp_path / "bomb-binding.xml"
    path.write_text(f"<filterbinding><owner><name>g</name><uuid>{UUID}</uuid></owner><portdev name='vnet0'/>"
                    f"<mac address='{MAC}'/><filterref filter='bomb'>{params}</filterref></filterbinding>")
    return path


def test_expansion_bomb_is_refused_by_the_cli_and_the_hook_in_bounded_memory(tmp_path):
    (tmp_path / "conf" / "filters").mkdir(parents=True)
    (tmp_path / "conf" / "filters" / "bomb.xml").write_text(BOMB)
    env = python_env(tmp_path)
    code, _, err, seconds, peak = measured([sys.executable, "-m", "libvirt_nwfilter", "binding-create",
                                            str(_bomb_binding(tmp_path, 300))], env)
    print(f"binding-create of the bomb refused after {seconds:.2f} s, peak {peak:.0f} MiB")
    assert code == 1 and err.count("\n") == 1 and f"would expand to {300 ** 4 * 65} rules" in err, err
    assert peak < 120, f"{peak:.0f} MiB"
    metadata = "".join(f"<nwf:parameter name='{name}' value='{value}'/>" for name, values in _lists(300).items()
                       for value in values)
    xml = domain_xml().replace(b"<nwf:parameter name='IP' value='10.0.0.5'/>", metadata.encode()) \
        .replace(b"filter='clean-traffic'", b"filter='bomb'")
    code, _, err, seconds, peak = measured(hook_argv("prepare"), env, xml)
    print(f"hook prepare of the bomb refused after {seconds:.2f} s, peak {peak:.0f} MiB")
    assert code == 1 and err.count("\n") == 1 and "max-rules-per-binding" in err, err
    assert peak < 120, f"{peak:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# Domain XML of any size (item 5)

DESCRIPTION = 17 << 20  # more than 16 MiB


@pytest.mark.parametrize("metadata", [False, True])
def test_hook_reads_a_huge_domain_xml_in_bounded_memory(tmp_path, metadata):
    xml = domain_xml(DESCRIPTION, metadata)
    env = python_env(tmp_path)
    for operation in ("prepare", "restore"):
        code, out, err, seconds, peak = measured(hook_argv(operation), env, xml)
        print(f"{operation} of a {len(xml) >> 20} MiB domain XML (metadata {metadata}): {seconds:.2f} s, "
              f"peak {peak:.0f} MiB")
        assert (code, err) == (0, ""), err[:300]
        assert out == (xml if operation != "prepare" else b"")
        assert peak < 2 * len(xml) / (1 << 20) + 40, f"{peak:.0f} MiB for {len(xml) >> 20} MiB of XML"
    code, out, err, _, _ = measured(hook_argv("stopped"), env, xml)
    assert (code, err) == (0, "")


def test_huge_domain_is_parsed_into_what_filtering_needs():
    from libvirt_nwfilter.domain import parse_domain, parse_identity

    xml = domain_xml(DESCRIPTION)
    domain = parse_domain(xml)
    assert (domain.name, domain.uuid) == ("big", UUID)
    assert [(i.mac, i.target, i.filterref) for i in domain.interfaces] == \
        [(MAC, "vnet0", FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),)))]
    assert parse_identity(xml) == ("big", UUID)
    assert parse_domain(domain_xml(DESCRIPTION, metadata=False)).filtered == ()


# ----------------------------------------------------------------------------------------------
# Files of the run directory (items 1 and 4)


def _applied(port: str, backend: str = "nftables") -> AppliedBinding:
    binding = parse_binding(f"<filterbinding><owner><name>g</name><uuid>{UUID}</uuid></owner>"
                            f"<portdev name='{port}'/><mac address='{MAC}'/><filterref filter='allow-arp'/>"
                            "</filterbinding>")
    return AppliedBinding(binding, backend, {"id": 7}, "0" * 16)


def test_index_is_a_superset_of_the_records_at_every_instant(tmp_path, monkeypatch):
    """A change interrupted at each of its writes: every record file has an index entry."""
    real, writes, fail_at = state_mod.write_atomically, [], [0]

    def interrupted(path, text, mode=0o644, scratch=None):
        writes.append(Path(path).name)
        if len(writes) == fail_at[0]:
            raise KeyboardInterrupt  # stands for a SIGKILL: nothing after it happens
        real(path, text, mode, scratch)

    monkeypatch.setattr(state_mod, "write_atomically", interrupted)
    for point in range(1, 6):
        records = State(tmp_path / f"run{point}")
        records.write([_applied("vp1")])
        writes.clear()
        fail_at[0] = point
        try:
            records.write([_applied("vp2"), _applied("vp3")], removed=["vp1"])
        except KeyboardInterrupt:
            pass
        fail_at[0] = 0
        on_disk = {p.stem for p in records.files()}
        assert on_disk <= set(records.index()), (point, writes, on_disk, records.index())
    assert writes == ["index.json", "vp2.json", "vp3.json", "index.json"]


def test_the_index_is_read_again_whenever_its_file_changed(tmp_path):
    """Kept per process with its file's identity: a write by anyone (another process, an editor
    writing in place, a damage) is seen by the next read."""
    records = State(tmp_path / "run")
    records.write([_applied("vp1")])
    assert set(State(tmp_path / "run").index()) == {"vp1"}
    State(tmp_path / "run").write([_applied("vp2")])  # as another process would: a new file
    assert set(records.index()) == {"vp1", "vp2"}
    index = tmp_path / "run" / "index.json"
    entries = json.loads(index.read_text())
    with open(index, "r+", encoding="utf-8") as handle:  # in place: same inode, other size and times
        handle.write(json.dumps({"vp1": entries["vp1"]}))
        handle.truncate()
    assert set(State(tmp_path / "run").index()) == {"vp1"}
    index.write_text("[]")
    fresh = State(tmp_path / "run")
    assert set(fresh.index()) == {"vp1", "vp2"} and fresh.index_problem == "does not have the expected shape"


def test_the_index_text_is_spelled_again_only_for_changed_entries(tmp_path, monkeypatch):
    """Rewriting the index spells only the entries that changed (the others are kept with the
    entry object they spell, which nobody changes in place); the file holds exactly the index,
    one port per line, whatever was spelled before (also by another State, or ahead)."""
    spelled = []
    real_dumps = state_mod.json.dumps
    monkeypatch.setattr(state_mod.json, "dumps", lambda value, **kw: spelled.append(value) or real_dumps(value, **kw))
    records = State(tmp_path / "run")
    records.write([_applied(f"vp{i}") for i in range(1, 6)])
    records.spell_index()
    spelled.clear()
    records.write([_applied("vp9")], removed=["vp2"])
    entries = [value for value in spelled if isinstance(value, dict) and "owner" in value]
    assert entries == [state_mod._index_entry(_applied("vp9"))]  # vp9's line; vp2's dropped
    text = (tmp_path / "run" / "index.json").read_text()
    assert json.loads(text) == State(tmp_path / "run").index() and set(json.loads(text)) == {
        "vp1", "vp3", "vp4", "vp5", "vp9"}
    assert text.startswith('{\n"vp1": {') and text.count("\n") == 7
    # an entry changed (a new object, equal or not) is spelled from what it holds
    again = {port: dict(entry) for port, entry in records.index().items()}
    again["vp3"]["id"] = 9
    assert json.loads(state_mod._index_text.spell(again)) == again


def test_a_record_is_read_again_whenever_its_file_changed(tmp_path):
    records = State(tmp_path / "run")
    records.write([_applied("vp1")])
    first = records.get("vp1")
    assert State(tmp_path / "run").get("vp1") is first  # kept while the file is the same
    changed = AppliedBinding(first.binding, "nftables", {"id": 8}, "1" * 16)
    State(tmp_path / "run").write([changed])
    assert records.get("vp1") == changed
    (tmp_path / "run" / "bindings" / "vp1.json").write_text("{")
    with pytest.raises(RecordError, match="not valid JSON"):
        records.get("vp1")


def test_partial_writes_of_a_killed_writer_are_removed_under_the_lock(tmp_path):
    run = tmp_path / "run"
    (run / "bindings").mkdir(parents=True)
    leftovers = [run / ".index.json.abc123", run / ".journal.json.x", run / "bindings" / ".vp1.json.q1"]
    kept = [run / "probe.json", run / ".status.json.k", run / "bindings" / "vp1.json"]
    for path in leftovers + kept:
        path.write_text("{}")
    with State(run).locked(timeout=5):
        pass
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in kept)


@pytest.mark.parametrize("content, problem", [
    (None, "is not a regular file"),
    (b"x" * (state_mod.MAX_RECORD_BYTES + 1), "is larger than"),
    (b"\xff\xfe", "is not UTF-8 text"),
    (b'{"binding": "x", "backend": "nftables", "record": [], "hash": "0"}', "'record' field that is not a dict"),
    (b'{"binding": "x", "backend": "pf", "record": {}, "hash": "0"}', "unknown backend 'pf'"),
    ("vp2", "holds the binding of port 'vp2'"),
])
def test_unusable_record_is_an_error_naming_file_problem_and_repair(tmp_path, content, problem):
    path = tmp_path / "bindings" / "vp1.json"
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()
    elif content == "vp2":  # another port's record
        State(tmp_path).write([_applied("vp2")])
        path.write_bytes(path.with_name("vp2.json").read_bytes())
    else:
        path.write_bytes(content)
    with pytest.raises(RecordError) as error:
        State(tmp_path).get("vp1")
    text = str(error.value)
    assert str(path) in text and problem in text and "binding-delete --force vp1" in text, text
    assert State(tmp_path).scan()[1][0].port == "vp1"


def test_fifo_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(files.FileProblem, match="not a regular file"):
        files.read_regular(tmp_path / "fifo", 100)


@pytest.mark.parametrize("data, problem", [
    ({"format": 2}, "not a format 1 journal"),
    ({"format": 1, "command": "x", "ports": {"bad name": {}}, "filter": None, "teardown": []}, "bad entry"),
    ({"format": 1, "command": "x", "ports": {}, "filter": None, "teardown": ["pf"]}, "unknown backend"),
    ({"format": 1, "command": "x", "ports": {}, "filter": {"name": "a", "new": "<filter name='b'/>",
                                                            "previous": None}, "teardown": []},
     "not filter 'a'"),
    ({"format": 1, "command": "x", "ports": {}, "teardown": []}, "has no 'filter' field"),
    ({"format": 1, "command": "x", "ports": {"vp9": {"old": "<filterbinding>", "new": None}}, "filter": None,
      "teardown": []}, "does not have the expected content"),
])
def test_damaged_journal_names_file_problem_and_repair(tmp_path, data, problem):
    (tmp_path / "journal.json").write_text(json.dumps(data))
    with pytest.raises(JournalDamaged) as error:
        Journal(tmp_path).read()
    text = str(error.value)
    assert problem in text and str(tmp_path / "journal.json") in text and "'libvirt-nwfilter reapply'" in text, text


# ----------------------------------------------------------------------------------------------
# Small defects (item 9)


def test_five_thousand_digit_numbers_are_refused_in_one_line(tmp_path):
    digits = "7" * 5000
    for text in (f"<filter name='x' chain='root'><rule action='drop' direction='in' priority='{digits}'/></filter>",
                 f"<filter name='x' chain='root'><rule action='drop' direction='in'>"
                 f"<tcp dstportstart='{digits}' srcipaddr='$A[{digits}]' srcipmask='{digits}'/></rule></filter>"):
        path = tmp_path / "x.xml"
        path.write_text(text)
        done = subprocess.run([sys.executable, "-m", "libvirt_nwfilter", "define", str(path)], capture_output=True,
                              text=True, cwd=ROOT, env=python_env(tmp_path))
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[:300]
        assert "internal error" not in done.stderr and ("-1000..1000" in done.stderr or "out of range" in done.stderr)


def test_unwritable_run_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    flt = tmp_path / "f.xml"
    flt.write_text("<filter name='mine' chain='root'><rule action='drop' direction='in'/></filter>")
    done = subprocess.run([sys.executable, "-m", "libvirt_nwfilter", "--rundir", str(tmp_path / "file" / "run"),
                           "define", str(flt)], capture_output=True, text=True, cwd=ROOT, env=python_env(tmp_path))
    assert done.returncode == 1
    assert done.stderr == f"error: cannot create the run directory {tmp_path}/file/run: Not a directory\n"


def test_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    def read_only(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(NwfilterError, match=r"^cannot write .*x: Read-only file system$"):
        files.write_atomically(tmp_path / "x", "text")
    assert os.listdir(tmp_path) == []


def test_owner_name_with_a_line_break_stays_on_its_row():
    table = cli.format_table(("Port Dev", "Filter", "Owner"), [("vp1", "f", "evil\nvp2  f  forged")])
    assert table.count("\n") == 3 and "evil\\nvp2" in table


def test_render_help_says_what_it_touches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["render", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "probe.json" in text and "'nft -c'" in text and "Changes no rule and no binding" in text


def test_reading_commands_work_while_an_interrupted_change_cannot_be_completed(tmp_path, monkeypatch, capsys,
                                                                                  caplog):
    """A journal whose completion the kernel refuses (forward and back): listing commands warn
    and list; verify fails in one line naming the refusal; the journal stays. (The firewall
    tools are the boundary faked here: nothing runs.)"""
    for name, value in python_env(tmp_path, LIBVIRT_NWFILTER_BACKEND="ebiptables").items():
        monkeypatch.setenv(name, value)

    def refused(plan, netns=None):
        raise FirewallError("ebtables-restore refused the change: Chain nwf-I-vp1 already exists")

    monkeypatch.setattr(executor, "execute", refused)
    monkeypatch.setattr(executor, "survey", lambda steps, netns=None: ["" for _ in steps])
    State(tmp_path / "run").write([_applied("vp1", "ebiptables"), _applied("vp2", "ebiptables")])
    (tmp_path / "run" / "journal.json").write_text(json.dumps(
        {"format": 1, "command": "binding-delete", "ports": {"vp2": {"old": None, "new": None}}, "filter": None,
         "teardown": []}))
    assert cli.main(["-q", "binding-list"]) == 0
    assert capsys.readouterr().out.split() == ["vp1", "allow-arp", "g", "vp2", "allow-arp", "g"]
    assert "cannot complete 'binding-delete' on vp2" in caplog.text
    assert "Chain nwf-I-vp1 already exists" in caplog.text
    assert cli.main(["verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Chain nwf-I-vp1 already exists" in err
    assert (tmp_path / "run" / "journal.json").exists()


def test_records_are_written_through_their_partial_directory(tmp_path, monkeypatch):
    """A record's temporary file is made in ``bindings/.partial`` (so the lock need not list
    every record); leftovers there go under the lock. Once that directory exists, leftovers of
    older versions beside the records are no longer looked for (they name no record)."""
    made = []
    real_mkstemp = state_mod.write_atomically.__globals__["tempfile"].mkstemp
    monkeypatch.setattr(state_mod.write_atomically.__globals__["tempfile"], "mkstemp",
                        lambda **kw: made.append(kw["dir"]) or real_mkstemp(**kw))
    st = State(tmp_path)
    st.write([_applied("vp1")])
    assert made == [tmp_path, st.partial_dir] and list(st.partial_dir.iterdir()) == []
    assert [p.name for p in st.files()] == ["vp1.json"] and st.get("vp1") == _applied("vp1")
    leftover, older = st.partial_dir / ".vp2.json.x1", st.bindings_dir / ".vp3.json.x2"
    leftover.write_text("partial")
    older.write_text("partial")
    with st.locked(timeout=5):
        pass
    assert not leftover.exists() and older.exists() and [p.name for p in st.files()] == ["vp1.json"]


def test_taking_the_lock_removes_partial_writes_of_locked_files_only(tmp_path):
    """Temporary files of records, the index and the journal are a killed writer's; those of the
    service's reports (written without the lock, maybe right now) are left alone."""
    from libvirt_nwfilter import journal
    from libvirt_nwfilter.daemon import knowledge, status

    st = State(tmp_path)
    st.bindings_dir.mkdir(parents=True)
    ours = [tmp_path / ".index.json.x1", tmp_path / f".{journal.JOURNAL}.x2", st.bindings_dir / ".vnet0.json.x3"]
    reports = [tmp_path / f".{status.STATUS_FILE}.x4", tmp_path / f".{knowledge.KNOWLEDGE_FILE}.x5"]
    for path in ours + reports:
        path.write_text("partial")
    with st.locked(timeout=5):
        pass
    assert [p for p in ours if p.exists()] == [] and all(p.exists() for p in reports)


def test_a_status_report_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    from libvirt_nwfilter.daemon.status import Report

    report = Report(tmp_path / "missing" / "file-not-dir", os.getpid(), time.time())
    (tmp_path / "missing").write_text("a file where the run directory should be")
    report.count("events", last_event={"what": "x"})
    assert "status not reported" in caplog.text
