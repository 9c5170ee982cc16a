"""start_libvirtd()/stop() leave the machine as they found it (no fixture: checks the
teardown itself)."""

from __future__ import annotations

from pathlib import Path

import libvirtd as lv
import netlab


def test_stop_restores_everything(kernel_env):
    # (A backup exists only when an earlier run was killed: it holds the original.)
    original = lv.QEMU_CONF_BACKUP if lv.QEMU_CONF_BACKUP.exists() else lv.QEMU_CONF
    conf_before = original.read_bytes()
    namespaces_before = set(netlab.list_namespaces())
    daemon = lv.start_libvirtd(hook_script_text="#!/bin/sh\nexit 0\n")
    try:
        pid, lab = daemon.pid, daemon.lab
        hook = daemon.hook_path
        assert hook.exists()
        vm = lab.add_vm("a", "52:54:00:00:00:01", ipv4="10.0.0.1/24")
        lv.libvirt_oracle_binding(lab, vm.port, vm.mac, "no-mac-spoofing")
        assert (lv.BINDING_DIR / f"{vm.port}.xml").exists()
        daemon.start_guest("nwft-lifecycle", "52:54:00:12:34:59")
        qemu_pids = netlab.ns_pids(lab.host_ns)
        assert len(qemu_pids) >= 2  # libvirtd and QEMU
    finally:
        daemon.stop()
    daemon.stop()  # idempotent

    assert lv.QEMU_CONF.read_bytes() == conf_before
    assert not lv.QEMU_CONF_BACKUP.exists()
    assert not hook.exists()
    assert not (lv.BINDING_DIR / f"{vm.port}.xml").exists()
    # only this lab's namespaces (its host namespace name is the prefix of its VMs'): other
    # test sessions on the machine may create their own meanwhile
    lab_prefix = lab.host_ns
    assert {n for n in netlab.list_namespaces() if n.startswith(lab_prefix)} <= namespaces_before
    assert not netlab.run(["pgrep", "-x", "libvirtd"], check=False).stdout.strip()
    for p in qemu_pids + [pid]:
        comm = Path(f"/proc/{p}/comm")
        assert not comm.exists() or comm.read_text().strip() not in ("libvirtd", "qemu-system-x86")
    assert not lv.PID_FILE.exists()
