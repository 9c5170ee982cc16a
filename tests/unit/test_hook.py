"""libvirt_nwfilter.hook with a fake Service: operations, exit codes, stdout, stderr."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_nwfilter import hook
from libvirt_nwfilter.config import Config
from libvirt_nwfilter.errors import BindingError, FirewallError, MissingVariablesError, UnknownFilterError
from libvirt_nwfilter.model import Binding, FilterRef
from libvirt_nwfilter.state import AppliedBinding

REPO = Path(__file__).resolve().parents[2]
NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC1, MAC2 = "52:54:00:12:34:56", "52:54:00:12:34:57"
REF = FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),))


def domain_xml(targets: bool = True, metadata: bool = True, native: bool = False, bad: bool = False) -> bytes:
    t1 = "<target dev='vnet0'/>" if targets else ""
    t2 = "<target dev='vnet1'/>" if targets else ""
    native_el = "<filterref filter='allow-arp'/>" if native else ""
    value = "" if bad else "10.0.0.5"
    meta = (f"<metadata><nwf:nwfilter xmlns:nwf='{NS}'><nwf:interface mac='{MAC1}'>"
            f"<nwf:filterref filter='clean-traffic'><nwf:parameter name='IP' value='{value}'/>"
            "</nwf:filterref></nwf:interface></nwf:nwfilter></metadata>") if metadata else ""
    return (f"<domain type='kvm'><name>guest1</name><uuid>{UUID}</uuid>{meta}<devices>"
            f"<interface type='bridge'><mac address='{MAC1}'/><source bridge='br0'/>{t1}{native_el}</interface>"
            f"<interface type='bridge'><mac address='{MAC2}'/><source bridge='br0'/>{t2}</interface>"
            "</devices></domain>").encode()


@pytest.fixture
def service(mocker):
    fake = mocker.MagicMock(name="Service")
    fake.list_bindings.return_value = []
    fake.unbind_owner.return_value = ["vnet0"]
    fake.binding.side_effect = BindingError("no nwfilter binding")
    mocker.patch.object(hook, "make_service", return_value=fake)
    mocker.patch.object(hook, "has_bindings", return_value=True)
    return fake


class Call:
    def __init__(self, status: int, stdout: bytes, stderr: str):
        self.status, self.stdout, self.stderr = status, stdout, stderr


def call(operation: str, data: bytes = b"", subop: str = "begin") -> Call:
    out, err = io.BytesIO(), io.StringIO()
    status = hook.run(["guest1", operation, subop, "-"], io.BytesIO(data), out, err,
                      config=Config(Path("/nonexistent/conf"), Path("/nonexistent/run")))
    return Call(status, out.getvalue(), err.getvalue())


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    assert text.startswith("libvirt-nwfilter: ")
    return text


# -- prepare --------------------------------------------------------------------------------


def test_prepare_checks_each_filtered_interface(service):
    result = call("prepare", domain_xml(targets=False))
    assert (result.status, result.stdout, result.stderr) == (0, b"", "")
    service.check.assert_called_once_with([Binding("guest1", UUID, "", MAC1, REF)])
    service.bind_owner.assert_not_called()


def test_prepare_refuses_with_one_line_naming_domain_interface_and_filter(service):
    service.check.side_effect = UnknownFilterError("referenced filter 'clean-traffic' is missing")
    result = call("prepare", domain_xml(targets=False))
    assert result.status == 1 and result.stdout == b""
    assert one_line(result.stderr) == (f"libvirt-nwfilter: domain 'guest1': interface {MAC1}: "
                                       "referenced filter 'clean-traffic' is missing\n")


def test_prepare_multi_line_error_becomes_one_line(service):
    service.check.side_effect = MissingVariablesError("cannot instantiate filter 'x':\n missing variables: IP")
    result = call("prepare", domain_xml(targets=False))
    assert result.status == 1
    assert "missing variables: IP" in one_line(result.stderr)


def test_prepare_refuses_invalid_metadata(service):
    result = call("prepare", domain_xml(bad=True))
    assert result.status == 1
    text = one_line(result.stderr)
    assert "domain 'guest1'" in text and MAC1 in text and "parameter 'IP'" in text
    service.check.assert_not_called()


def test_prepare_without_our_metadata_needs_no_service(service):
    result = call("prepare", domain_xml(metadata=False))
    assert result.status == 0
    hook.make_service.assert_not_called()


def test_malformed_xml_refuses_start(service):
    result = call("start", b"<domain>")
    assert result.status == 1 and "malformed XML" in one_line(result.stderr)


# -- start -------------------------------------------------------------------------------------


def test_start_binds_every_filtered_interface_on_its_tap(service):
    result = call("start", domain_xml())
    assert (result.status, result.stderr) == (0, "")
    service.bind_owner.assert_called_once_with([Binding("guest1", UUID, "vnet0", MAC1, REF)])


def test_stop_never_fails_when_the_kernel_refuses(service):
    service.unbind_owner.side_effect = FirewallError("nft refused the change")
    assert call("stopped", domain_xml(), subop="end").status == 0


def test_start_failure_is_one_line_and_exit_1(service):
    service.bind_owner.side_effect = FirewallError("nft refused the change: Error: No such file or directory")
    result = call("start", domain_xml())
    assert result.status == 1
    assert one_line(result.stderr) == ("libvirt-nwfilter: domain 'guest1': nft refused the change: "
                                       "Error: No such file or directory\n")


def test_start_failure_from_the_filter_names_the_interface(service):
    error = MissingVariablesError("cannot instantiate filter 'clean-traffic': missing variables: IP")
    service.bind_owner.side_effect = error
    service.check.side_effect = error
    result = call("start", domain_xml())
    assert result.status == 1
    assert one_line(result.stderr).startswith(f"libvirt-nwfilter: domain 'guest1': interface {MAC1}: cannot")


def test_start_without_target_is_refused(service):
    result = call("start", domain_xml(targets=False))
    assert result.status == 1
    assert f"interface {MAC1}: no <target dev>" in one_line(result.stderr)
    service.bind_owner.assert_not_called()


def test_start_removes_stale_bindings_on_its_taps(service):
    stale = AppliedBinding(Binding("old", "11111111-2222-3333-4444-555555555555", "vnet1", MAC2, REF),
                           "nftables", {}, "h")
    service.binding.side_effect = lambda port: {"vnet1": stale}[port]
    assert call("start", domain_xml()).status == 0
    service.remove_bindings.assert_called_once_with(["vnet1"])
    service.list_bindings.assert_not_called()  # a start does not scan every binding


def test_start_with_native_filterref_leaves_interface_to_libvirt(service):
    result = call("start", domain_xml(native=True))
    assert result.status == 0
    service.bind_owner.assert_not_called()


def test_internal_error_is_one_line(service):
    service.bind_owner.side_effect = KeyError("boom")
    result = call("start", domain_xml())
    assert result.status == 1
    assert one_line(result.stderr).startswith("libvirt-nwfilter: internal error: KeyError")


# -- stopped / release --------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["stopped", "release"])
def test_stop_unbinds_by_uuid(service, operation):
    result = call(operation, domain_xml(targets=False), subop="end")
    assert (result.status, result.stdout, result.stderr) == (0, b"", "")
    service.unbind_owner.assert_called_once_with(UUID)


@pytest.mark.parametrize("operation", ["stopped", "release"])
@pytest.mark.parametrize("data", [domain_xml(targets=False), domain_xml(bad=True), b"<domain>", b""])
def test_stop_never_fails(service, operation, data):
    service.unbind_owner.side_effect = FirewallError("nft refused the change")
    result = call(operation, data, subop="end")
    assert (result.status, result.stderr) == (0, "")


def test_stop_never_fails_on_internal_errors(service):
    service.unbind_owner.side_effect = RuntimeError("bug")
    assert call("release", domain_xml(), subop="end").status == 0


def test_stop_with_broken_metadata_still_unbinds(service):
    assert call("stopped", domain_xml(bad=True), subop="end").status == 0
    service.unbind_owner.assert_called_once_with(UUID)


def test_stop_without_bindings_needs_no_service(service):
    hook.has_bindings.return_value = False
    assert call("release", domain_xml(), subop="end").status == 0
    hook.make_service.assert_not_called()


# -- reconnect / attach -------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["reconnect", "attach"])
def test_reconnect_rebinds_and_drops_unplugged_ports(service, operation):
    gone = AppliedBinding(Binding("guest1", UUID, "vnet9", "52:54:00:00:00:09", REF), "nftables", {}, "h")
    other = AppliedBinding(Binding("other", "11111111-2222-3333-4444-555555555555", "veth0", MAC2, REF),
                           "nftables", {}, "h")
    by_port = {"vnet9": gone, "veth0": other}
    service.state.owned_ports.side_effect = lambda uuid: [p for p, a in by_port.items() if a.binding.owner_uuid == uuid]
    service.binding.side_effect = lambda port: by_port[port] if port in by_port else (_ for _ in ()).throw(
        BindingError("no nwfilter binding"))
    result = call(operation, domain_xml())
    assert (result.status, result.stderr) == (0, "")
    service.sync.assert_called_once_with([Binding("guest1", UUID, "vnet0", MAC1, REF)])
    service.bind_owner.assert_not_called()
    service.remove_bindings.assert_called_once_with(["vnet9"])


def test_stale_binding_removal_failure_is_not_fatal(service):
    stale = AppliedBinding(Binding("guest1", UUID, "vnet1", MAC2, REF), "nftables", {}, "h")
    service.binding.side_effect = lambda port: stale
    service.remove_bindings.side_effect = FirewallError("nft refused the change")
    assert call("start", domain_xml()).status == 0
    service.remove_bindings.assert_called_once_with(["vnet1"])


def test_reconnect_failure_exits_1(service):
    service.sync.side_effect = FirewallError("nft refused the change")
    result = call("reconnect", domain_xml())
    assert result.status == 1 and "nft refused the change" in one_line(result.stderr)


# -- migrate / restore ----------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_migrate_restore_echo_stdin_unchanged(service, operation):
    data = domain_xml(targets=False)
    result = call(operation, data)
    assert (result.status, result.stdout, result.stderr) == (0, data, "")
    service.check.assert_called_once_with([Binding("guest1", UUID, "", MAC1, REF)])
    service.bind_owner.assert_not_called()


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_migrate_restore_refuse_unknown_filter(service, operation):
    service.check.side_effect = UnknownFilterError("referenced filter 'clean-traffic' is missing")
    result = call(operation, domain_xml(targets=False))
    assert result.status == 1 and result.stdout == b""
    assert "referenced filter 'clean-traffic' is missing" in one_line(result.stderr)


def test_migrate_refuses_bad_parameters(service):
    result = call("migrate", domain_xml(bad=True))
    assert result.status == 1 and "parameter 'IP'" in one_line(result.stderr)


def test_migrate_without_metadata_echoes(service):
    data = domain_xml(metadata=False)
    assert call("migrate", data).stdout == data


# -- others ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["started", "shutdown", "whatever", "-"])
def test_other_operations_exit_0_without_reading_stdin(service, operation):
    stdin = io.BytesIO(b"<not read")
    status = hook.run(["guest1", operation, "begin", "-"], stdin, io.BytesIO(), io.StringIO())
    assert status == 0 and stdin.tell() == 0
    hook.make_service.assert_not_called()


def test_missing_arguments():
    err = io.StringIO()
    assert hook.run([], io.BytesIO(), io.BytesIO(), err) == 1
    assert "usage" in one_line(err.getvalue())


# -- the script and its imports -------------------------------------------------------------------


def run_script(argv: list[str], data: bytes, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {"LIBVIRT_NWFILTER_CONFDIR": str(tmp_path / "conf"), "LIBVIRT_NWFILTER_RUNDIR": str(tmp_path / "run"),
                   "PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "hooks" / "qemu"), *argv], input=data, capture_output=True,
                          env=environment, cwd="/", timeout=60)


def test_hooks_qemu_script_runs_with_any_interpreter(tmp_path):
    done = run_script(["guest1", "migrate", "begin", "-"], domain_xml(targets=False), tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, domain_xml(targets=False), b"")
    bad = domain_xml(targets=False).replace(b"clean-traffic", b"no-such-filter")
    done = run_script(["guest1", "prepare", "begin", "-"], bad, tmp_path)
    assert done.returncode == 1
    assert done.stderr == (f"libvirt-nwfilter: domain 'guest1': interface {MAC1}: referenced filter "
                           "'no-such-filter' is missing\n").encode()


def test_hook_log_file(tmp_path):
    log = tmp_path / "hook.log"
    done = run_script(["guest1", "start", "begin", "-"], domain_xml(native=True, metadata=False), tmp_path,
                      env={"LIBVIRT_NWFILTER_HOOK_LOG": str(log)})
    assert done.returncode == 0
    assert f"domain 'guest1' start: INFO: interface {MAC1} has libvirt's own <filterref>: left to libvirt" \
        in log.read_text()


PROBE = """
import io, sys
from libvirt_nwfilter import hook
data = sys.stdin.buffer.read()
status = hook.run(sys.argv[1:], io.BytesIO(data), io.BytesIO(), io.StringIO())
heavy = sorted(m for m in sys.modules if m in ("libvirt_nwfilter.service", "libvirt_nwfilter.compiler",
               "libvirt_nwfilter.backends.nftables", "libvirt_nwfilter.backends.ebiptables", "libvirt"))
print(status, heavy)
"""


@pytest.mark.parametrize("argv, data", [
    (["guest1", "release", "end", "-"], domain_xml(targets=False)),
    (["guest1", "prepare", "begin", "-"], domain_xml(metadata=False)),
    (["guest1", "start", "begin", "-"], domain_xml(metadata=False)),
    (["guest1", "started", "begin", "-"], domain_xml()),
])
def test_operations_without_work_import_no_service_or_backend(tmp_path, argv, data):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], input=data, capture_output=True, timeout=60,
                          env={"LIBVIRT_NWFILTER_RUNDIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"})
    assert done.stdout.decode().split(None, 1) == ["0", "[]\n"], done.stderr.decode()
