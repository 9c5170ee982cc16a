"""The libvirt verbs of the CLI with a fake libvirt connection (no libvirtd, no kernel)."""

from __future__ import annotations

import pytest
from lxml import etree

from libvirt_nwfilter import cli, cli_libvirt, domain
from libvirt_nwfilter.errors import BindingError, FirewallError, NwfilterError
from libvirt_nwfilter.libvirt_client import DomainRef
from libvirt_nwfilter.model import Binding, FilterRef

UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC, MAC2 = "52:54:00:12:34:56", "52:54:00:12:34:57"


class FakeClient:
    """Just enough of LibvirtClient: one domain; metadata kept per view and shown in its XML."""

    def __init__(self, active=True, persistent=True, native=False, filters=()):
        self.active, self.persistent, self.native = active, persistent, native
        self.meta = {True: None, False: None}
        self.calls: list[tuple] = []
        self.filters = list(filters)
        self.defined: str | None = None
        self.dom = DomainRef(object(), "guest1", UUID)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def domain(self, name):
        if name not in ("guest1", UUID):
            raise NwfilterError(f"domain '{name}' not found")
        return self.dom

    def running_domains(self):
        return [self.dom] if self.active else []

    def is_active(self, dom):
        return self.active

    def is_persistent(self, dom):
        return self.persistent

    def xml(self, dom, inactive=False):
        live = not inactive
        target = "<target dev='vnet0'/>" if live and self.active else ""
        native = "<filterref filter='allow-arp'/>" if self.native else ""
        meta = ""
        if self.meta[live]:
            entries = domain.parse_metadata(self.meta[live])
            meta = "<metadata>" + etree.tostring(domain._namespaced(entries), encoding="unicode") + "</metadata>"
        return (f"<domain><name>guest1</name><uuid>{UUID}</uuid>{meta}<devices>"
                f"<interface type='bridge'><mac address='{MAC}'/>{target}{native}</interface>"
                f"<interface type='direct'><mac address='{MAC2}'/></interface></devices></domain>")

    def get_metadata(self, dom, live):
        return self.meta[live]

    def set_metadata(self, dom, xml, live):
        self.calls.append(("set", live, xml))
        self.meta[live] = xml

    def nwfilters(self):
        return self.filters

    def define_xml(self, xml):
        self.defined = xml


@pytest.fixture
def fake(mocker):
    client = FakeClient()
    mocker.patch.object(cli_libvirt, "_client", side_effect=lambda args: client)
    return client


@pytest.fixture
def service(mocker):
    fake_service = mocker.MagicMock(name="Service")
    fake_service.list_bindings.return_value = []
    fake_service.state.owned_ports.return_value = []
    fake_service.binding.side_effect = BindingError("no nwfilter binding")
    mocker.patch.object(cli, "Service", return_value=fake_service)
    return fake_service


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def entries(text):
    return domain.parse_metadata(text) if text else {}


REF = FilterRef("clean-traffic", (("IP", ("10.0.0.1", "10.0.0.2")),))


def test_attach_to_running_guest_sets_both_and_binds(fake, service, capsys):
    status, out, err = run(capsys, "attach-filter", "guest1", MAC.upper(), "clean-traffic",
                           "--param", "IP=10.0.0.1", "--param", "IP=10.0.0.2")
    assert (status, err) == (0, "")
    assert "attached to interface 52:54:00:12:34:56 of domain 'guest1' (live and persistent configuration)" in out
    assert "Filtering vnet0 now" in out
    service.check.assert_called_once_with([Binding("guest1", UUID, "", MAC, REF)])
    service.sync.assert_called_once_with([Binding("guest1", UUID, "vnet0", MAC, REF)])
    assert entries(fake.meta[True]) == entries(fake.meta[False]) == {MAC: REF}
    assert [c[1] for c in fake.calls] == [True, False]  # live first


def test_attach_keeps_other_entries(fake, service, capsys):
    fake.meta[False] = domain.metadata_xml({"52:54:00:00:00:09": FilterRef("allow-arp")})
    fake.active = False
    assert run(capsys, "attach-filter", "guest1", MAC, "no-mac-spoofing")[0] == 0
    assert set(entries(fake.meta[False])) == {"52:54:00:00:00:09", MAC}
    assert fake.meta[True] is None
    service.sync.assert_not_called()


def test_attach_live_failure_restores_the_live_metadata(fake, service, capsys):
    service.sync.side_effect = FirewallError("nft refused the change")
    status, out, err = run(capsys, "attach-filter", "guest1", MAC, "allow-arp")
    assert status == 1 and err == "error: nft refused the change\n"
    assert fake.meta == {True: None, False: None}


@pytest.mark.parametrize("argv, message", [
    (["guest1", "52:54:00:zz:00:01", "allow-arp"], "is not a MAC address"),
    (["guest1", MAC, "allow-arp", "--param", "IP"], "expected NAME=VALUE"),
    (["guest1", MAC, "allow-arp", "--param", "IP=1;2"], "value '1;2' is invalid"),
    (["guest1", MAC, "bad name"], "is not a valid filter name"),
    (["guest1", "52:54:00:00:00:01", "allow-arp"], "no bridge/network/ethernet interface with MAC 52:54:00:00:00:01"),
    (["guest1", MAC2, "allow-arp"], "no bridge/network/ethernet interface with MAC"),
    (["nope", MAC, "allow-arp"], "domain 'nope' not found"),
])
def test_attach_refusals_change_nothing(fake, service, capsys, argv, message):
    status, out, err = run(capsys, "attach-filter", *argv)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and message in err
    assert fake.calls == []


def test_attach_refuses_unresolvable_filter(fake, service, capsys):
    service.check.side_effect = NwfilterError("cannot instantiate filter 'clean-traffic': missing variables: IP")
    status, _, err = run(capsys, "attach-filter", "guest1", MAC, "clean-traffic")
    assert status == 1 and "missing variables: IP" in err and fake.calls == []


def test_attach_refuses_native_filterref(fake, service, capsys):
    fake.native = True
    status, _, err = run(capsys, "attach-filter", "guest1", MAC, "allow-arp")
    assert status == 1 and "convert-domain" in err and fake.calls == []


@pytest.mark.parametrize("active, persistent, flags, views", [
    (True, True, [], [True, False]),
    (False, True, [], [False]),
    (True, False, [], [True]),
    (True, True, ["--live"], [True]),
    (True, True, ["--config"], [False]),
    (True, True, ["--live", "--config"], [True, False]),
])
def test_views(fake, service, capsys, active, persistent, flags, views):
    fake.active, fake.persistent = active, persistent
    assert run(capsys, "attach-filter", "guest1", MAC, "allow-arp", *flags)[0] == 0
    assert [c[1] for c in fake.calls] == views


@pytest.mark.parametrize("active, persistent, flag, message", [
    (False, True, "--live", "is not running (--live)"),
    (True, False, "--config", "is transient"),
])
def test_impossible_views(fake, service, capsys, active, persistent, flag, message):
    fake.active, fake.persistent = active, persistent
    status, _, err = run(capsys, "attach-filter", "guest1", MAC, "allow-arp", flag)
    assert status == 1 and message in err


def test_detach(fake, service, capsys):
    other = {"52:54:00:00:00:09": FilterRef("allow-arp")}
    fake.meta[True] = domain.metadata_xml({MAC: REF})
    fake.meta[False] = domain.metadata_xml({**other, MAC: REF})
    from libvirt_nwfilter.state import AppliedBinding
    applied = AppliedBinding(Binding("guest1", UUID, "vnet0", MAC, REF), "nftables", {}, "h")
    service.list_bindings.return_value = [applied]
    service.state.owned_ports.return_value = ["vnet0"]
    service.binding.side_effect = lambda port: applied
    status, out, err = run(capsys, "detach-filter", "guest1", MAC)
    assert (status, err) == (0, "")
    assert "(live and persistent configuration)" in out and "Removed the binding on vnet0" in out
    assert fake.meta[True] is None  # the last entry: the element is removed
    assert entries(fake.meta[False]) == other
    service.remove_bindings.assert_called_once_with(["vnet0"])
    status, _, err = run(capsys, "detach-filter", "guest1", MAC)
    assert status == 1 and "has no libvirt-nwfilter filter on interface" in err


def test_reapply_usage(fake, service, capsys):
    status, _, err = run(capsys, "reapply", "guest1", "--all")
    assert status == 2 and err == "error: give domains or --all, not both\n"


def test_reapply_without_arguments_uses_service_reapply(fake, service, capsys):
    from libvirt_nwfilter.state import AppliedBinding
    service.reapply.return_value = [AppliedBinding(Binding("g", UUID, "vnet3", MAC, REF), "nftables", {}, "h")]
    assert run(capsys, "reapply") == (0, "Re-instantiated 1 binding(s): vnet3\n", "")
    service.reapply.assert_called_once_with()
    cli_libvirt._client.assert_not_called()  # libvirt is not asked


def test_reapply_domain_not_running(fake, service, capsys):
    fake.active = False
    status, _, err = run(capsys, "reapply", "guest1")
    assert status == 1 and "is not running" in err


def test_reapply_all_binds_running_guests(fake, service, capsys):
    fake.meta[True] = domain.metadata_xml({MAC: REF})
    status, out, _ = run(capsys, "reapply", "--all")
    assert status == 0 and out == "domain 'guest1': filtered vnet0\n"
    service.sync.assert_called_once_with([Binding("guest1", UUID, "vnet0", MAC, REF)])


def test_convert_domain(fake, service, capsys):
    fake.native = True
    status, out, _ = run(capsys, "convert-domain", "guest1")
    assert status == 0 and "filter 'allow-arp' moved" in out and "started again" in out
    converted = domain.parse_domain(fake.defined)
    assert converted.interfaces[0].filterref == FilterRef("allow-arp") and not converted.interfaces[0].native_filterref
    service.check.assert_called_once_with([Binding("guest1", UUID, "", MAC, FilterRef("allow-arp"))])


def test_convert_domain_refused_when_filter_does_not_resolve(fake, service, capsys):
    fake.native = True
    service.check.side_effect = NwfilterError("referenced filter 'allow-arp' is missing")
    status, _, err = run(capsys, "convert-domain", "guest1")
    assert status == 1 and "import-libvirt" in err and fake.defined is None


def test_convert_domain_nothing_to_do(fake, service, capsys):
    status, out, _ = run(capsys, "convert-domain", "guest1")
    assert status == 0 and "no native <filterref> to convert" in out and fake.defined is None


def libvirt_filter(name: str, uuid: str, body: str) -> str:
    return f"<filter name='{name}' chain='root'>\n  <uuid>{uuid}</uuid>\n{body}</filter>\n"


def test_import_libvirt(fake, capsys, tmp_path):
    from libvirt_nwfilter.store import builtin_dir

    stock = (builtin_dir() / "clean-traffic.xml").read_text().replace(
        "<filter name='clean-traffic' chain='root'>",
        "<filter name='clean-traffic' chain='root'>\n  <uuid>11111111-1111-1111-1111-111111111111</uuid>")
    conf = tmp_path / "conf"
    (conf / "filters").mkdir(parents=True)
    (conf / "filters" / "site.xml").write_text(libvirt_filter("site", "33333333-3333-3333-3333-333333333333",
                                                              "  <rule action='drop' direction='in'/>\n"))
    fake.filters = [
        ("clean-traffic", stock),
        ("allow-arp", libvirt_filter("allow-arp", "22222222-2222-2222-2222-222222222222",
                                     "  <rule action='drop' direction='inout' priority='500'><arp/></rule>\n")),
        ("new-one", libvirt_filter("new-one", "44444444-4444-4444-4444-444444444444",
                                   "  <filterref filter='allow-arp'/>\n")),
        ("site", libvirt_filter("site", "55555555-5555-5555-5555-555555555555",
                                "  <rule action='accept' direction='in'/>\n")),
        ("broken", "<filter name='broken'><rule action='explode' direction='in'/></filter>"),
    ]
    status, out, err = run(capsys, "--confdir", str(conf), "--rundir", str(tmp_path / "run"), "import-libvirt")
    lines = out.splitlines()
    assert status == 1
    assert lines[0] == "clean-traffic: identical, skipped"
    assert lines[1] == "allow-arp: imported (overrides the built-in filter)"
    assert lines[2] == "new-one: imported"
    assert lines[3].startswith("site: not imported: defined here with another content")
    assert lines[4].startswith("broken: not imported:")
    assert lines[5] == "5 filter(s) in libvirt: 2 imported, 1 identical, 2 not imported"
    assert "44444444-4444-4444-4444-444444444444" in (conf / "filters" / "new-one.xml").read_text()
    assert "<arp" in (conf / "filters" / "allow-arp.xml").read_text()
    assert "22222222" not in (conf / "filters" / "allow-arp.xml").read_text()
    assert "action='drop'" in (conf / "filters" / "site.xml").read_text()
    # Again: everything that was imported is now identical.
    status, out, _ = run(capsys, "--confdir", str(conf), "--rundir", str(tmp_path / "run"), "import-libvirt")
    assert "allow-arp: identical, skipped" in out and "new-one: identical, skipped" in out
