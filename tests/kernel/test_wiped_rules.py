"""Recovering from rules removed behind our back (``nft flush ruleset``, ``nft delete table``).

The hook's ``reconnect`` and the CLI's ``reapply`` call ``Service.bind_owner`` to make the kernel
match the state again; the ``stopped`` hook and ``binding-delete`` must be able to forget a
binding whose rules are gone. Both fail today with the nftables backend: the plan deletes the
map elements the old record lists, and nft refuses the whole transaction because they no longer
exist. Under libvirtd a failing ``reconnect`` hook kills the running guest.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import netlab

MAC = "52:54:00:b1:00:01"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"

SCRIPT = """
from libvirt_nwfilter.config import Config
from libvirt_nwfilter.model import Binding, FilterRef
from libvirt_nwfilter.service import Service
service = Service(Config.load())
binding = Binding("owner", "{uuid}", "{port}", "{mac}", FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),)))
{step}
"""
STEPS = {"bind": "service.bind_owner([binding])", "unbind": "service.unbind_owner(binding.owner_uuid)"}


def run(lab, tmp_path, port: str, step: str) -> subprocess.CompletedProcess:
    """One Service call in the lab's host namespace (where the port and the rules are)."""
    code = SCRIPT.format(uuid=UUID, port=port, mac=MAC, step=STEPS[step])
    env = ["env", f"LIBVIRT_NWFILTER_CONFDIR={tmp_path / 'conf'}", f"LIBVIRT_NWFILTER_RUNDIR={tmp_path / 'run'}",
           "LIBVIRT_NWFILTER_BACKEND=nftables"]
    return netlab.run_in(lab.host_ns, [*env, sys.executable, "-c", code], check=False, timeout=120)


def wipe(lab) -> None:
    for family in ("bridge", "inet"):
        lab.host_run(["nft", "delete", "table", family, "libvirt_nwfilter"], check=False)
    assert "libvirt_nwfilter" not in lab.ruleset()


def test_rebind_with_rules_in_place(lab, tmp_path):
    vm = lab.add_vm("a", MAC, ipv4="10.0.0.5/24")
    assert run(lab, tmp_path, vm.port, "bind").returncode == 0
    assert run(lab, tmp_path, vm.port, "bind").returncode == 0
    assert vm.port in lab.ruleset()
    assert run(lab, tmp_path, vm.port, "unbind").returncode == 0
    assert f'"{vm.port}"' not in lab.ruleset()


def test_rebind_after_rules_were_wiped_restores_them(lab, tmp_path):
    vm = lab.add_vm("a", MAC, ipv4="10.0.0.5/24")
    assert run(lab, tmp_path, vm.port, "bind").returncode == 0
    wipe(lab)
    done = run(lab, tmp_path, vm.port, "bind")
    assert done.returncode == 0, done.stderr
    assert vm.port in lab.ruleset()


def test_unbind_after_rules_were_wiped_forgets_the_binding(lab, tmp_path):
    vm = lab.add_vm("a", MAC, ipv4="10.0.0.5/24")
    assert run(lab, tmp_path, vm.port, "bind").returncode == 0
    wipe(lab)
    done = run(lab, tmp_path, vm.port, "unbind")
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "run" / "bindings").glob("*.json"))
