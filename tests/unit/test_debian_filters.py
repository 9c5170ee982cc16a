"""Every filter of Debian's libvirt-daemon-config-nwfilter defines unchanged and round-trips.

The files are the distribution's (installed by scripts/bootstrap), read at test time; the test
fails if they are missing rather than skipping.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_nwfilter import cli
from libvirt_nwfilter.store import builtin_dir

DEBIAN = Path("/usr/share/libvirt/nwfilter")
NAMES = sorted(p.stem for p in builtin_dir().glob("*.xml"))


def test_debian_ships_the_same_24_names():
    assert sorted(p.stem for p in DEBIAN.glob("*.xml")) == NAMES, "scripts/bootstrap installs them"


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIBVIRT_NWFILTER_CONFDIR", str(tmp_path / "conf"))
    monkeypatch.setenv("LIBVIRT_NWFILTER_RUNDIR", str(tmp_path / "run"))

    def runner(*argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        return code, capsys.readouterr().out
    return runner


@pytest.mark.parametrize("name", NAMES)
def test_define_dumpxml_define_dumpxml_is_byte_stable(run, tmp_path, name):
    assert run("define", str(DEBIAN / f"{name}.xml")) == (0, f"Network filter {name} defined from {DEBIAN / name}.xml\n")
    code, first = run("dumpxml", name)
    assert code == 0
    again = tmp_path / "again.xml"
    again.write_text(first)
    assert run("define", str(again))[0] == 0
    assert run("dumpxml", name) == (0, first)
    # the distribution's filter means what our built-in one means: same canonical form
    builtin = (builtin_dir() / f"{name}.xml").read_text()
    assert first.split("\n", 2)[2] == builtin.split("\n", 1)[1]
