"""libvirt_nwfilter.install and the install-hook / uninstall-hook verbs, in temporary directories."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_nwfilter import cli, install
from libvirt_nwfilter.errors import NwfilterError

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC = "52:54:00:12:34:56"
FOREIGN = "#!/bin/sh\n# the site's own hook\nexit 0\n"


def settings(tmp_path: Path, backend: str | None = "nftables", log_file: str | None = None) -> install.HookSettings:
    return install.HookSettings(sys.executable, str(tmp_path / "conf dir"), str(tmp_path / "run"), backend, log_file)


def test_wrapper_carries_confdir_rundir_backend(tmp_path):
    text = install.wrapper_text(settings(tmp_path, backend="ebiptables", log_file="/var/log/h.log"))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh" and lines[1] == install.MARKER
    assert f"LIBVIRT_NWFILTER_CONFDIR='{tmp_path}/conf dir'" in lines
    assert f"LIBVIRT_NWFILTER_RUNDIR={tmp_path}/run" in lines
    assert "LIBVIRT_NWFILTER_BACKEND=ebiptables" in lines
    assert "LIBVIRT_NWFILTER_HOOK_LOG=/var/log/h.log" in lines
    assert lines[-2] == ("export LIBVIRT_NWFILTER_CONFDIR LIBVIRT_NWFILTER_RUNDIR LIBVIRT_NWFILTER_BACKEND "
                         "LIBVIRT_NWFILTER_HOOK_LOG")
    package_dir = Path(install.__file__).resolve().parent.parent
    assert lines[-1] == (f'exec {sys.executable} -I -S -c \'import sys; sys.path.append("{package_dir}"); '
                         'from libvirt_nwfilter.client import hook_main; sys.exit(hook_main())\' "$@"')


def test_wrapper_without_backend_leaves_it_to_the_config_file(tmp_path):
    assert "LIBVIRT_NWFILTER_BACKEND" not in install.wrapper_text(settings(tmp_path, backend=None))


def test_wrapper_needs_absolute_paths(tmp_path):
    with pytest.raises(NwfilterError, match="absolute"):
        install.wrapper_text(install.HookSettings("python3", "/etc/x", "/run/x"))


def test_install_writes_executable_dropin(tmp_path):
    hooks = tmp_path / "hooks"
    result = install.install(hooks, settings(tmp_path))
    path = hooks / "qemu.d" / "libvirt-nwfilter"
    assert result == install.InstallResult(path, False, (), ())
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert path.read_text() == install.wrapper_text(settings(tmp_path))
    assert install.is_ours(path)
    assert sorted(p.name for p in (hooks / "qemu.d").iterdir()) == ["libvirt-nwfilter"]  # no temp files left
    assert install.install(hooks, settings(tmp_path)).replaced


def test_install_reports_other_hooks(tmp_path):
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    other = hooks / "qemu.d" / "10-site"
    other.write_text(FOREIGN)
    other.chmod(0o755)
    assert install.install(hooks, settings(tmp_path)).other_hooks == (other,)


def test_single_file_refuses_a_foreign_script(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qemu").write_text(FOREIGN)
    with pytest.raises(NwfilterError, match="not a libvirt-nwfilter hook; not overwritten"):
        install.install(hooks, settings(tmp_path), single_file=True)
    assert (hooks / "qemu").read_text() == FOREIGN
    assert not (hooks / "qemu.d").exists()


def test_single_file_replaces_ours_and_layouts_exclude_each_other(tmp_path):
    hooks = tmp_path / "hooks"
    first = install.install(hooks, settings(tmp_path))
    single = install.install(hooks, settings(tmp_path, backend="ebiptables"), single_file=True)
    assert single.path == hooks / "qemu" and single.removed == (first.path,)
    assert not first.path.exists() and "ebiptables" in (hooks / "qemu").read_text()
    assert os.access(hooks / "qemu", os.X_OK)
    again = install.install(hooks, settings(tmp_path), single_file=True)
    assert again.replaced and "ebiptables" not in (hooks / "qemu").read_text()
    back = install.install(hooks, settings(tmp_path))
    assert back.removed == (hooks / "qemu",) and not (hooks / "qemu").exists()


def test_dropin_install_never_touches_a_foreign_main_script(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qemu").write_text(FOREIGN)
    (hooks / "qemu").chmod(0o755)
    result = install.install(hooks, settings(tmp_path))
    assert result.other_hooks == (hooks / "qemu",) and result.removed == ()
    assert (hooks / "qemu").read_text() == FOREIGN
    assert install.uninstall(hooks) == (result.path,)
    assert (hooks / "qemu").read_text() == FOREIGN


def test_dropin_refuses_a_foreign_file_of_our_name(tmp_path):
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    (hooks / "qemu.d" / "libvirt-nwfilter").write_text(FOREIGN)
    with pytest.raises(NwfilterError, match="not overwritten"):
        install.install(hooks, settings(tmp_path))


def test_uninstall(tmp_path):
    hooks = tmp_path / "hooks"
    assert install.uninstall(hooks) == ()
    path = install.install(hooks, settings(tmp_path)).path
    assert install.uninstall(hooks) == (path,)
    assert not path.exists()
    assert install.uninstall(hooks) == ()


def domain_xml(filter_name: str) -> bytes:
    return (f"<domain><name>g</name><uuid>{UUID}</uuid><metadata><n:nwfilter xmlns:n='{NS}'>"
            f"<n:interface mac='{MAC}'><n:filterref filter='{filter_name}'/></n:interface></n:nwfilter>"
            f"</metadata><devices><interface type='bridge'><mac address='{MAC}'/></interface></devices>"
            "</domain>").encode()


def test_installed_wrapper_runs_the_hook_with_its_settings_in_an_empty_environment(tmp_path):
    """libvirtd clears the environment: the confdir must come from the wrapper itself."""
    conf = tmp_path / "conf dir"
    (conf / "filters").mkdir(parents=True)
    (conf / "filters" / "site-only.xml").write_text("<filter name='site-only' chain='root'>\n"
                                                    "  <rule action='accept' direction='inout'/>\n</filter>\n")
    path = install.install(tmp_path / "hooks", settings(tmp_path)).path
    ok = subprocess.run([str(path), "g", "prepare", "begin", "-"], input=domain_xml("site-only"),
                        capture_output=True, env={}, cwd="/", timeout=60)
    assert (ok.returncode, ok.stderr) == (0, b"")
    refused = subprocess.run([str(path), "g", "migrate", "begin", "-"], input=domain_xml("elsewhere"),
                             capture_output=True, env={}, cwd="/", timeout=60)
    assert refused.returncode == 1
    assert refused.stderr == (f"libvirt-nwfilter: domain 'g': interface {MAC}: referenced filter 'elsewhere' "
                              "is missing\n").encode()


# -- the CLI verbs ----------------------------------------------------------------------------------


def test_cli_install_and_uninstall(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIBVIRT_NWFILTER_BACKEND", raising=False)
    hooks = tmp_path / "hooks"
    status = cli.main(["--confdir", str(tmp_path / "c"), "--rundir", str(tmp_path / "r"), "--backend", "ebiptables",
                       "install-hook", "--hooks-dir", str(hooks), "--no-service"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"Installed the qemu hook {hooks}/qemu.d/libvirt-nwfilter" in out
    assert "restart" in out and "reapply --all" in out
    text = (hooks / "qemu.d" / "libvirt-nwfilter").read_text()
    assert f"LIBVIRT_NWFILTER_CONFDIR={tmp_path}/c\n" in text
    assert f"LIBVIRT_NWFILTER_RUNDIR={tmp_path}/r\n" in text
    assert "LIBVIRT_NWFILTER_BACKEND=ebiptables\n" in text
    assert cli.main(["uninstall-hook", "--hooks-dir", str(hooks)]) == 0
    assert "Removed the qemu hook" in capsys.readouterr().out
    assert not (hooks / "qemu.d" / "libvirt-nwfilter").exists()


def test_cli_install_takes_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIBVIRT_NWFILTER_CONFDIR", str(tmp_path / "envconf"))
    monkeypatch.setenv("LIBVIRT_NWFILTER_RUNDIR", str(tmp_path / "envrun"))
    monkeypatch.delenv("LIBVIRT_NWFILTER_BACKEND", raising=False)
    hooks = tmp_path / "hooks"
    assert cli.main(["install-hook", "--hooks-dir", str(hooks), "--single-file", "--no-service"]) == 0
    text = (hooks / "qemu").read_text()
    assert f"LIBVIRT_NWFILTER_CONFDIR={tmp_path}/envconf\n" in text
    assert f"LIBVIRT_NWFILTER_RUNDIR={tmp_path}/envrun\n" in text
    assert "LIBVIRT_NWFILTER_BACKEND" not in text
    assert "at each run" in capsys.readouterr().out


def test_cli_single_file_refusal_is_one_line(tmp_path, capsys):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qemu").write_text(FOREIGN)
    assert cli.main(["install-hook", "--hooks-dir", str(hooks), "--single-file", "--no-service"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not overwritten" in err


# -- the resident service's unit -------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_contrib_unit_is_the_packaged_unit():
    from libvirt_nwfilter import unit

    assert (REPO / "contrib" / unit.UNIT_NAME).read_text() == unit.unit_text([unit.PACKAGED_COMMAND])


def test_unit_passes_systemd_analyze_verify(tmp_path):
    from libvirt_nwfilter import unit

    path = tmp_path / unit.UNIT_NAME
    path.write_text(unit.unit_text([sys.executable, "-m", "libvirt_nwfilter.daemon"], "/etc/x y", "/run/z", "ebiptables"))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def test_install_hook_installs_the_unit_and_says_how_to_start_it_without_systemd(tmp_path, mocker, capsys):
    from libvirt_nwfilter import unit

    mocker.patch.object(unit, "systemd_runs", return_value=False)
    args = ["--confdir", str(tmp_path / "conf"), "--rundir", str(tmp_path / "run"), "install-hook",
            "--hooks-dir", str(tmp_path / "hooks"), "--unit-dir", str(tmp_path / "units")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "units" / unit.UNIT_NAME).read_text()
    assert f"Environment=LIBVIRT_NWFILTER_RUNDIR={tmp_path}/run" in text
    assert f"ExecStart={sys.executable} -m libvirt_nwfilter.daemon" in text
    assert "systemd does not run here, so it was not enabled: start the service with" in out
    assert cli.main(["uninstall-hook", "--hooks-dir", str(tmp_path / "hooks"), "--unit-dir", str(tmp_path / "units")]) == 0
    assert f"Removed the service unit {tmp_path}/units/{unit.UNIT_NAME}" in capsys.readouterr().out
    assert not (tmp_path / "units" / unit.UNIT_NAME).exists()


def test_install_hook_enables_the_unit_where_systemd_runs(tmp_path, mocker, capsys):
    from libvirt_nwfilter import unit

    mocker.patch.object(unit, "systemd_runs", return_value=True)
    calls = mocker.patch.object(unit, "_systemctl")
    assert cli.main(["install-hook", "--hooks-dir", str(tmp_path / "hooks"), "--unit-dir", str(tmp_path / "u")]) == 0
    assert [c.args for c in calls.call_args_list] == [("daemon-reload",), ("enable", unit.UNIT_NAME),
                                                      ("restart", unit.UNIT_NAME)]
    assert "Installed, enabled and started the service" in capsys.readouterr().out


def test_a_foreign_unit_is_never_overwritten(tmp_path, mocker):
    from libvirt_nwfilter import unit

    mocker.patch.object(unit, "systemd_runs", return_value=False)
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / unit.UNIT_NAME).write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(NwfilterError, match="was not written by libvirt-nwfilter"):
        unit.install(tmp_path / "u", unit.unit_text(["/bin/x"]))
    assert unit.uninstall(tmp_path / "u") is None
