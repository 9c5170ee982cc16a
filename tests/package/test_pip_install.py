"""``pip install .`` into a virtual environment: the other way to install, next to the package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from libvirt_nwfilter import __version__

REPO = Path(__file__).resolve().parents[2]


def run(argv: list, env: dict | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def copy_of_tree(target: Path) -> Path:
    """The working tree as git sees it (pip builds in the source directory: not in ours)."""
    files = run(["git", "-C", REPO, "ls-files", "--cached", "--others", "--exclude-standard"]).splitlines()
    for name in files:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def test_pip_install_into_a_venv_gives_command_filters_hook_and_docs(tmp_path):
    venv = tmp_path / "venv"
    # Debian's python3-lxml from the system; no download: the build tools are Debian's too
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv])
    run([venv / "bin/pip", "install", "-q", "--no-build-isolation", "--no-deps", copy_of_tree(tmp_path / "src")])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LIBVIRT_NWFILTER_CONFDIR": str(tmp_path / "conf"),
           "LIBVIRT_NWFILTER_RUNDIR": str(tmp_path / "run")}
    command = venv / "bin/libvirt-nwfilter"
    assert run([command, "--version"], env) == f"libvirt-nwfilter {__version__}\n"
    listed = run([command, "-q", "list"], env).splitlines()
    assert len(listed) == 24 + 4 and sum(line.endswith("builtin (libvirt-nwfilter)") for line in listed) == 4
    run([command, "install-hook", "--hooks-dir", tmp_path / "hooks", "--unit-dir", tmp_path / "units"], env)
    wrapper = (tmp_path / "hooks/qemu.d/libvirt-nwfilter").read_text()
    assert f"exec {venv}/bin/python" in wrapper
    unit = (tmp_path / "units/libvirt-nwfilterd.service").read_text()
    assert f"ExecStart={venv}/bin/python" in unit and " -m libvirt_nwfilter.daemon\n" in unit
    run([venv / "bin/python", "-m", "libvirt_nwfilter.docgen", tmp_path / "share"], env)
    assert (tmp_path / "share/man/man8/libvirt-nwfilter.8").is_file()
    assert (tmp_path / "share/bash-completion/completions/libvirt-nwfilter").is_file()
