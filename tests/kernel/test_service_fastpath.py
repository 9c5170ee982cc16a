"""The fast path equals the in-process path: the same requests through the resident service and
without it give the same standard output, standard error and exit status.

Two labs (network namespaces) run the same script of requests, one with ``libvirt-nwfilterd``
running in it, one with ``LIBVIRT_NWFILTER_NO_SERVICE=1``; configuration and run directories
have the same paths in both (each phase gets them afresh), so every line can be compared
byte for byte. The script covers every verb of ``libvirt-nwfilter`` (libvirt's verbs against
libvirt's ``test:///default`` driver, which needs no libvirtd), bad input and usage errors,
and every hook operation (the hook wrapper's command), including refusals.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

import netlab
from bindings_helpers import binding_xml, dispatch_entries
from service_helpers import Daemon, client_argv, env_for, hook_argv

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0a1"
OWNER = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0a2"
TEST_URI = "test:///default"

FILTER = """<filter name='nwft-fast' chain='ipv4'>
  <uuid>6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0a3</uuid>
  <rule action='drop' direction='out' priority='100'><udp dstportstart='9'/></rule>
</filter>
"""
FILTER2 = FILTER.replace("dstportstart='9'", "dstportstart='10'")


def domain(targets: bool = True, extra_entry: str = "", value: str = "10.0.0.5") -> str:
    target = "<target dev='fp1'/>" if targets else ""
    return (f"<domain type='kvm'><name>nwft-fast</name><uuid>{UUID}</uuid><metadata>"
            f"<nwf:nwfilter xmlns:nwf='{NS}'><nwf:interface mac='52:54:00:0f:00:01'>"
            f"<nwf:filterref filter='clean-traffic'><nwf:parameter name='IP' value='{value}'/>"
            f"</nwf:filterref></nwf:interface>{extra_entry}</nwf:nwfilter></metadata><devices>"
            f"<interface type='bridge'><mac address='52:54:00:0f:00:01'/><source bridge='br0'/>{target}"
            "</interface></devices></domain>\n")


ABSENT = ("<nwf:interface mac='52:54:00:0f:00:09'><nwf:filterref filter='clean-traffic'/>"
          "</nwf:interface>")


def script(work: Path) -> list[tuple[str, list[str], str | None]]:
    """(kind, argv, stdin) of every request, in order; files in ``work``."""
    (work / "f.xml").write_text(FILTER)
    (work / "bad.xml").write_text("<filter name='x'><rule action='drop'")
    (work / "b1.xml").write_text(binding_xml("fp2", "52:54:00:0f:00:02", "clean-traffic", {"IP": "10.0.0.6"},
                                             owner_uuid=OWNER))
    (work / "nov.xml").write_text(binding_xml("fp3", "52:54:00:0f:00:03", "clean-traffic", {"CTRL_IP_LEARNING": "none"},
                                              owner_uuid=OWNER))  # refused alike (a learning binding needs the service)
    b3 = binding_xml("fp3", "52:54:00:0f:00:03", "nwft-fast", owner_uuid=OWNER)
    cli = [
        ["list"], ["-q", "list"], ["define", "f.xml"], ["define", str(work / "f.xml")], ["define", "-"],
        ["dumpxml", "nwft-fast"], ["dumpxml", "nwft-none"], ["define", "bad.xml"], ["define", "missing.xml"],
        ["binding-create", "b1.xml"], ["binding-create", "b1.xml"], ["binding-create", "nov.xml"],
        ["binding-create", "-"], ["binding-list"], ["-q", "binding-list"], ["binding-dumpxml", "fp2"],
        ["binding-dumpxml", "fp9"], ["render", "b1.xml"], ["verify"], ["reapply"], ["define", "-"],
        ["undefine", "nwft-fast"], ["binding-delete", "fp3"], ["undefine", "nwft-fast"], ["binding-delete", "fp3"],
        ["--debug", "binding-list"], ["bogus"], [], ["--help"], ["binding-create", "--help"], ["list", "--bogus"],
        ["--backend", "nope", "list"], ["--rundir"], ["reapply", "--all", "-c", TEST_URI],
        ["reapply", "test", "-c", TEST_URI], ["reapply", "nwft-none", "-c", TEST_URI],
        ["attach-filter", "test", "52:54:00:0f:00:07", "clean-traffic", "-c", TEST_URI],
        ["detach-filter", "test", "52:54:00:0f:00:07", "-c", TEST_URI], ["import-libvirt", "-c", TEST_URI],
        ["convert-domain", "test", "-c", TEST_URI], ["reapply", "--all", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"],
    ]
    stdins = {13: b3, 21: FILTER2, 5: FILTER}
    requests = [("cli", argv, stdins.get(i)) for i, argv in enumerate(cli)]
    hook = [
        (["nwft-fast", "prepare", "begin", "-"], domain(targets=False, extra_entry=ABSENT)),
        (["nwft-fast", "start", "begin", "-"], domain(extra_entry=ABSENT)),
        (["nwft-fast", "started", "begin", "-"], domain()),
        (["nwft-fast", "reconnect", "begin", "-"], domain()),
        (["nwft-fast", "migrate", "begin", "-"], domain()),
        (["nwft-fast", "restore", "begin", "-"], domain(targets=False)),
        (["nwft-fast", "stopped", "end", "-"], domain(targets=False)),
        (["nwft-fast", "release", "end", "-"], domain(targets=False)),
        (["nwft-fast", "prepare", "begin", "-"], domain(value="10.0.0.5;")),
        (["nwft-fast", "start", "begin", "-"], "<domain>"),
        (["nwft-fast", "start", "begin", "-"], domain().replace("clean-traffic", "nwft-none")),
        (["nwft-fast", "stopped", "end", "-"], "not xml"),
        (["nwft-fast"], ""),
        (["nwft-fast", "attach", "begin", "-"], domain()),
    ]
    return requests + [("hook", argv, stdin) for argv, stdin in hook]


def run_script(ns: str, base: Path, service: bool) -> list[tuple]:
    """Run the script in ``ns`` with fresh directories under ``base``; every result."""
    work, conf, run = base / "work", base / "conf", base / "run"
    for path in (work, conf, run):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    daemon = Daemon(ns, conf, run, log=base / f"service-{service}.log") if service else None
    results = []
    try:
        if daemon:
            daemon.start()
        env = env_for(conf, run, service=service)
        for kind, argv, stdin in script(work):
            command = client_argv(ns, *argv) if kind == "cli" else hook_argv(ns, *argv)
            done = subprocess.run(command, input=(stdin or "").encode(), capture_output=True, cwd=work, env=env,
                                  timeout=120)
            results.append((kind, argv, done.returncode, done.stdout.decode(), done.stderr.decode()))
        if daemon:
            assert daemon.answers() and daemon.proc.poll() is None
    finally:
        if daemon:
            daemon.stop()
    return results


@pytest.fixture
def two_labs(kernel_env):
    labs = [netlab.Lab(), netlab.Lab()]
    try:
        for lab in labs:
            lines = [line for name in ("fp1", "fp2", "fp3")
                     for line in (f"link add {name} type veth peer name {name}x", f"link set {name} master br0",
                                  f"link set {name} up")]
            netlab.run(["ip", "-n", lab.host_ns, "-batch", "-"], input="\n".join(lines) + "\n")
        yield labs
    finally:
        for lab in labs:
            lab.close()


def test_every_verb_and_hook_operation_gives_the_same_output_through_the_service(two_labs, tmp_path):
    base = tmp_path / "same"
    through = run_script(two_labs[0].host_ns, base, service=True)
    assert dispatch_entries(two_labs[0].host_ns, "nftables") == {"fp1", "fp2"}  # the service acted in ITS namespace
    assert dispatch_entries(two_labs[1].host_ns, "nftables") == set()
    log = (base / "service-True.log").read_text()
    assert log.count("request: ") == len(through), log  # every request went through the service
    direct = run_script(two_labs[1].host_ns, base, service=False)
    assert dispatch_entries(two_labs[1].host_ns, "nftables") == {"fp1", "fp2"}
    assert len(through) == len(direct)
    for service_result, in_process in zip(through, direct):
        assert service_result == in_process
    statuses = {tuple(r[1]): r[2] for r in through if r[0] == "cli"}
    assert statuses[("define", "f.xml")] == 0 and statuses[("define", "bad.xml")] == 1
    assert statuses[("bogus",)] == 2 and statuses[("--help",)] == 0  # the script exercises each outcome


def test_a_request_acts_in_its_clients_namespace(two_labs, tmp_path):
    """The service in one namespace, the client in another (the run directory shared): the
    request acts in the client's, as the command would in-process, although the spare that
    serves it read the nft cache ahead in the service's namespace."""
    work, conf, run = tmp_path / "work", tmp_path / "conf", tmp_path / "run"
    for path in (work, conf, run):
        path.mkdir()
    (work / "b.xml").write_text(binding_xml("fp2", "52:54:00:0f:00:02", "clean-traffic", {"IP": "10.0.0.6"},
                                            owner_uuid=OWNER))
    service_ns, client_ns = two_labs[0].host_ns, two_labs[1].host_ns
    daemon = Daemon(service_ns, conf, run, options=("--no-libvirt", "--no-heal"), log=tmp_path / "service.log")
    try:
        daemon.start()
        wait_for_spare(daemon.pid)
        done = subprocess.run(client_argv(client_ns, "binding-create", "b.xml"), capture_output=True, cwd=work,
                              env=env_for(conf, run), timeout=120)
        assert done.returncode == 0, done.stderr
        assert "request: " in daemon.log_text()  # served by the service
    finally:
        daemon.stop()
    assert dispatch_entries(client_ns, "nftables") == {"fp2"}
    assert dispatch_entries(service_ns, "nftables") == set()


def wait_for_spare(pid: int, timeout: float = 30.0) -> None:
    """Until the service has forked its spare request process (its children: the watcher and
    the spare), which warms its nft cache as it starts."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while len(children.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the service forked no spare request process"
        time.sleep(0.05)
