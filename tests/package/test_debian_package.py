"""The Debian package: built by scripts/package, checked by lintian, installed, used, upgraded,
removed and purged in a clean Debian 12 root (tests/debroot.py), with bindings in the kernel of
a network namespace."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import debroot
import netlab
from libvirt_nwfilter import __version__, hook
from libvirt_nwfilter.docgen import manpage

REPO = Path(__file__).resolve().parents[2]
BUILTIN = sorted(p.stem for p in (REPO / "libvirt_nwfilter/filters").glob("*.xml"))
OWN = sorted(p.stem for p in (REPO / "libvirt_nwfilter/own_filters").glob("*.xml"))
NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC = "52:54:00:12:34:56"
HOOK = "/etc/libvirt/hooks/qemu.d/libvirt-nwfilter"
CONFFILE = "/etc/libvirt-nwfilter/libvirt-nwfilter.conf"
PAGES = [page.name for page in manpage.PAGES]
USER_FILTER = """<filter name='site-web' chain='root'>
  <uuid>5d0c0f5e-6d6c-4a43-9c5e-1f0b6e1d2a10</uuid>
  <filterref filter='clean-traffic'/>
  <rule action='accept' direction='in' priority='500'>
    <tcp dstportstart='80'/>
  </rule>
</filter>
"""


def domain_xml(port: str) -> str:
    """A guest whose one interface (on ``port``) asks for clean-traffic in our metadata."""
    return (f"<domain type='kvm'><name>guest1</name><uuid>{UUID}</uuid><metadata>"
            f"<nwf:nwfilter xmlns:nwf='{NS}'><nwf:interface mac='{MAC}'><nwf:filterref filter='clean-traffic'>"
            "<nwf:parameter name='IP' value='10.0.0.5'/></nwf:filterref></nwf:interface></nwf:nwfilter>"
            f"</metadata><devices><interface type='bridge'><mac address='{MAC}'/><source bridge='br0'/>"
            f"<target dev='{port}'/></interface></devices></domain>")


def binding_xml(port: str, flt: str, mac: str) -> str:
    return (f"<filterbinding><owner><name>guest-{port}</name><uuid>{UUID[:-4]}{port[-1]}000</uuid></owner>"
            f"<portdev name='{port}'/><mac address='{mac}'/><filterref filter='{flt}'>"
            "<parameter name='IP' value='10.0.0.5'/></filterref></filterbinding>")


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def relation_names(deb: Path, name: str) -> list[str]:
    """Package names of a relation field (first alternatives, no versions or qualifiers)."""
    return [re.split(r"[\s(:|]", item.strip())[0] for item in field(deb, name).split(",") if item.strip()]


def dependencies(deb: Path) -> list[str]:
    """What the package depends on and recommends: installed before it, so that the root's
    snapshot before installing it differs from the one after purging it by nothing of ours."""
    return relation_names(deb, "Depends") + relation_names(deb, "Recommends")


def complete(root: debroot.DebianRoot, line: str, netns: str | None = None) -> list[str]:
    """What the installed bash completion offers for ``line`` (cursor at its end)."""
    script = ('source /usr/share/bash-completion/completions/libvirt-nwfilter; COMP_LINE=$1; '
              'COMP_POINT=${#COMP_LINE}; _libvirt_nwfilter; printf "%s\\n" "${COMPREPLY[@]}"')
    out = root.run(["bash", "-c", script, "bash", line], netns=netns).stdout
    return sorted(word for word in out.splitlines() if word)


def nwfilter(root: debroot.DebianRoot, *args: str, netns: str | None = None, input: str | None = None) -> str:
    return root.run(["libvirt-nwfilter", *args], netns=netns, input=input).stdout


def add_port(netns: str, port: str) -> None:
    netlab.run_in(netns, ["ip", "link", "add", port, "type", "veth", "peer", "name", f"{port}p"])
    netlab.run_in(netns, ["ip", "link", "set", port, "up"])


def tree(root: debroot.DebianRoot, inside: str) -> dict[str, bytes]:
    """Every file under ``inside`` (a path in the root) with its content."""
    base = root.file(inside)
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------


def test_lintian_finds_no_errors(package_build):
    """lintian on the .changes (source and binary package): no error; its tags are printed."""
    proc = subprocess.run(["lintian", "--fail-on", "error", "--pedantic", "--display-info", package_build.changes],
                          capture_output=True, text=True, timeout=300)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    print("lintian:", *(tags or ["no tags"]), sep="\n  ")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [tag for tag in tags if tag.startswith("E: ")]


def test_package_installs_command_library_pages_completion_and_conffile(package_build):
    deb = package_build.deb
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    modules = {f"/usr/lib/python3/dist-packages/{p.relative_to(REPO)}"
               for p in (REPO / "libvirt_nwfilter").rglob("*") if p.suffix in (".py", ".xml")}
    assert modules <= paths, sorted(modules - paths)
    assert {"/usr/bin/libvirt-nwfilter", CONFFILE, "/usr/share/bash-completion/completions/libvirt-nwfilter",
            *(f"/usr/share/man/man8/{name}.8.gz" for name in PAGES)} <= paths
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], capture_output=True, check=True).stdout
    assert b"./conffiles" in conffiles
    assert {"nftables", "python3-lxml", "python3"} <= set(relation_names(deb, "Depends"))
    assert {"python3-libvirt", "ebtables", "iptables"} <= set(relation_names(deb, "Recommends"))
    assert field(deb, "Version") == package_build.version
    assert field(deb, "Architecture") == "all"


def test_install_use_remove_reinstall_and_purge_on_clean_debian_12(package_build, debian_root, netns):
    """The operator's path on a clean root; purge leaves the root exactly as before."""
    root = debian_root
    deb = root.put(package_build.deb)
    root.apt("install", "--no-install-recommends", *dependencies(package_build.deb))
    before = debroot.snapshot(root.path)

    installed = root.apt("install", deb).stdout
    assert "0 upgraded, 1 newly installed" in installed, installed
    assert "libvirt is not installed" in installed  # so no hook, and no /etc/libvirt made
    assert not root.file("/etc/libvirt").exists()
    assert (root.file(CONFFILE).read_text().splitlines()
            == (REPO / "contrib/libvirt-nwfilter.conf").read_text().splitlines())

    # the command
    assert nwfilter(root, "--version") == f"libvirt-nwfilter {__version__}\n"
    rows = [line.split(None, 2) for line in nwfilter(root, "-q", "list").splitlines()]
    assert len(rows) == 24 + 4 and sorted(row[1] for row in rows) == sorted(BUILTIN + OWN)
    assert {row[1]: row[2] for row in rows} == {**dict.fromkeys(BUILTIN, "builtin"),
                                                **dict.fromkeys(OWN, "builtin (libvirt-nwfilter)")}
    nwfilter(root, "define", "-", input=USER_FILTER)

    # the hook, installed on request, run as libvirtd runs it (no environment, XML on stdin)
    nwfilter(root, "install-hook")
    wrapper = root.file(HOOK)
    assert wrapper.stat().st_mode & 0o777 == 0o755
    assert ("exec /usr/bin/python3 -I -S -c 'import sys; sys.path.append(\"/usr/lib/python3/dist-packages\"); "
            "from libvirt_nwfilter.client import hook_main; sys.exit(hook_main())' \"$@\"") in wrapper.read_text()
    assert root.run([HOOK, "--help"]).stdout == hook.HELP + "\n"
    add_port(netns, "vnet0")
    root.run(["env", "-i", HOOK, "guest1", "prepare", "begin", "-"], netns=netns, input=domain_xml("vnet0"))
    root.run(["env", "-i", HOOK, "guest1", "start", "begin", "-"], netns=netns, input=domain_xml("vnet0"))
    assert nwfilter(root, "-q", "binding-list").split() == ["vnet0", "clean-traffic", "guest1"]
    assert "All 1 binding(s) match" in nwfilter(root, "verify", netns=netns)

    # manual pages: rendered without warnings, every verb of the installed --help in the page
    verbs = re.findall(r"^    ([a-z][a-z-]+)  ", nwfilter(root, "--help"), re.M)
    assert "install-hook" in verbs and "binding-create" in verbs
    for page in PAGES:
        shown = root.run(["man", "--warnings", "-P", "cat", "8", page], env={"MANWIDTH": "100"})
        assert shown.stderr == "", f"man --warnings {page}: {shown.stderr}"
        assert shown.stdout.startswith(page.upper() + "(8)")
        if page == "libvirt-nwfilter":
            assert [v for v in verbs if not re.search(rf"^   {v}$", shown.stdout, re.M)] == []

    # bash completion: verbs, filter names, bound ports
    assert complete(root, "libvirt-nwfilter binding-d") == ["binding-delete", "binding-dumpxml"]
    assert complete(root, "libvirt-nwfilter dumpxml clean") == ["clean-traffic", "clean-traffic-dualstack",
                                                                "clean-traffic-gateway"]
    assert complete(root, "libvirt-nwfilter undefine site") == ["site-web"]
    assert complete(root, "libvirt-nwfilter binding-delete ") == ["vnet0"]

    # remove: the hook goes (its code goes), the configuration and the guest's rules stay;
    # installing again puts the hook back
    hook_text, rules = wrapper.read_text(), netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout
    removed = root.apt("remove", "libvirt-nwfilter").stdout
    assert f"removed the qemu hook {HOOK}" in removed
    assert "1 binding(s) stay in the kernel" in removed
    assert not wrapper.exists() and root.package_status("libvirt-nwfilter") == "rc"
    assert netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout == rules and "vnet0" in rules
    assert root.file(CONFFILE).exists() and root.file("/etc/libvirt-nwfilter/filters/site-web.xml").exists()
    reinstalled = root.apt("install", deb).stdout
    assert f"put back the qemu hook {HOOK}" in reinstalled
    assert wrapper.read_text() == hook_text
    assert "site-web" in nwfilter(root, "-q", "list")
    root.run(["env", "-i", HOOK, "guest1", "stopped", "end", "-"], netns=netns, input=domain_xml("vnet0"))
    assert nwfilter(root, "-q", "binding-list") == ""
    assert "vnet0" not in netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout

    # purge: nothing of ours is left
    root.apt("purge", "libvirt-nwfilter")
    assert root.package_status("libvirt-nwfilter") in ("", "pn", "un")
    after = debroot.snapshot(root.path)
    added = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert (added, gone, changed) == ([], [], [])


def test_upgrade_keeps_filters_bindings_hook_and_kernel_rules(previous_build, package_build, debian_root, netns):
    """From the previous build, with a user filter and two bindings in a kernel: the upgrade
    changes none of the filters, records, hook or rules, and they still agree afterwards."""
    root = debian_root
    root.apt("install", "--no-install-recommends", *dependencies(package_build.deb))
    root.file("/etc/libvirt").mkdir()  # libvirt is there: the first installation adds the hook
    old, new = root.put(previous_build.deb), root.put(package_build.deb)
    first = root.apt("install", old, netns=netns).stdout
    assert f"Installed the qemu hook {HOOK}" in first and "libvirtd was not restarted" in first

    nwfilter(root, "define", "-", input=USER_FILTER)
    for port, flt, mac in (("vnet0", "clean-traffic", MAC), ("vnet1", "site-web", "52:54:00:12:34:57")):
        add_port(netns, port)
        nwfilter(root, "binding-create", "-", netns=netns, input=binding_xml(port, flt, mac))

    def observe() -> dict:
        return {
            "list": nwfilter(root, "list"),
            "dumpxml": nwfilter(root, "dumpxml", "site-web"),
            "bindings": nwfilter(root, "binding-list"),
            "binding xml": [nwfilter(root, "binding-dumpxml", port) for port in ("vnet0", "vnet1")],
            "kernel": netlab.run_in(netns, ["nft", "list", "ruleset"]).stdout,
            "confdir": tree(root, "/etc/libvirt-nwfilter"),
            "rundir": tree(root, "/run/libvirt-nwfilter"),
            "hook": root.file(HOOK).read_bytes(),
        }

    state = observe()
    assert "vnet0" in state["kernel"] and "vnet1" in state["kernel"]
    upgraded = root.apt("install", new, netns=netns).stdout
    assert f"Unpacking libvirt-nwfilter ({package_build.version}) over ({previous_build.version})" in upgraded
    assert root.run(["dpkg-query", "-W", "-f=${Version}", "libvirt-nwfilter"]).stdout == package_build.version
    assert observe() == state
    assert "All 2 binding(s) match" in nwfilter(root, "verify", netns=netns)
    assert complete(root, "libvirt-nwfilter binding-dumpxml vn") == ["vnet0", "vnet1"]
