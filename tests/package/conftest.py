"""Fixtures of the Debian package tests: the package built from this tree (twice, for the
upgrade), a clean Debian 12 root (tests/package/debroot.py) and a network namespace."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import debroot
import netlab

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Build:
    deb: Path
    changes: Path
    version: str


def changelog_version() -> str:
    return subprocess.run(["dpkg-parsechangelog", "-l", REPO / "debian/changelog", "-S", "Version"],
                          capture_output=True, text=True, check=True).stdout.strip()


def build(output: Path, version: str | None = None) -> Build:
    """``scripts/package`` into ``output`` (under ``version`` when given)."""
    argv = [REPO / "scripts/package", "--output", output] + (["--version", version] if version else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"scripts/package failed:\n{proc.stderr}"
    deb = Path(proc.stdout.strip().splitlines()[-1])
    version = version or changelog_version()
    return Build(deb, output / f"libvirt-nwfilter_{version}_all.changes", version)


@pytest.fixture(scope="session")
def package_env(kernel_env):
    """The tools the package tests need; scratch roots of killed test runs deleted."""
    for tool in ("dpkg-buildpackage", "lintian", "debootstrap", "unshare", "chroot", "man"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.fail(f"package tests need {tool!r} (scripts/bootstrap installs it)", pytrace=False)
    reaped = debroot.reap_orphans()
    if reaped:
        print(f"debroot: deleted scratch roots left by killed test runs: {reaped}")


@pytest.fixture(scope="session")
def package_build(package_env, tmp_path_factory) -> Build:
    """The package of this tree, with the version of debian/changelog."""
    return build(tmp_path_factory.mktemp("package"))


@pytest.fixture(scope="session")
def previous_build(package_env, tmp_path_factory) -> Build:
    """The same tree under an earlier version: what an upgrade starts from."""
    return build(tmp_path_factory.mktemp("previous"), f"{changelog_version()}~prev1")


@pytest.fixture
def debian_root(package_env):
    with debroot.DebianRoot() as root:
        yield root


@pytest.fixture
def netns(package_env):
    name = netlab.create_namespace(netlab.new_ns_name("pkg"))
    try:
        yield name
    finally:
        netlab.delete_namespace(name)
