"""The benchmark's ports, MAC and IP addresses, and the documents it feeds our CLI, the hook and
virsh: a clean-traffic ``<filterbinding>``, a one-interface guest, a clean-traffic copy of our own."""

from __future__ import annotations

import uuid as uuidlib

FILTER = "clean-traffic"
CUSTOM_FILTER = "bench-clean-traffic"
CUSTOM_UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b001"
GUEST = "bench-guest"
GUEST_UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0ff"
NWF_NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
MEAS_PORTS = 16  # fresh ports for the timed binding-creates (bm0..bm15)


def prepop_port(i: int) -> str:
    return f"bp{i}"


def prepop_mac(i: int) -> str:
    return f"52:54:00:01:{i >> 8:02x}:{i & 0xFF:02x}"


def prepop_ip(i: int) -> str:
    return f"10.1.{i >> 8}.{(i & 0xFF)}"


def prepop_uuid(i: int) -> str:
    return str(uuidlib.UUID(int=(0x6F0C4F5E << 96) | (1 << 64) | i))


def meas_port(k: int) -> str:
    return f"bm{k}"


def meas_mac(k: int) -> str:
    return f"52:54:00:02:00:{k:02x}"


HOOK_PORT, HOOK_MAC, HOOK_IP = "bh0", "52:54:00:03:00:01", "10.3.0.1"


def binding_xml(port: str, mac: str, ip: str, filter_name: str = FILTER,
                owner: str = "bench-owner", owner_uuid: str | None = None) -> str:
    return (
        "<filterbinding>\n"
        "  <owner>\n"
        f"    <name>{owner}</name>\n"
        f"    <uuid>{owner_uuid or uuidlib.uuid4()}</uuid>\n"
        "  </owner>\n"
        f"  <portdev name='{port}'/>\n"
        f"  <mac address='{mac}'/>\n"
        f"  <filterref filter='{filter_name}'>\n"
        f"    <parameter name='IP' value='{ip}'/>\n"
        "  </filterref>\n"
        "</filterbinding>\n"
    )


def domain_xml(target: str | None) -> bytes:
    """A one-interface running guest as libvirt gives it to the qemu hook (``target`` None: the
    inactive form of ``stopped``/``release``, without the auto-generated tap name)."""
    target_el = f"      <target dev='{target}'/>\n" if target else ""
    return (
        "<domain type='kvm' id='7'>\n"
        f"  <name>{GUEST}</name>\n"
        f"  <uuid>{GUEST_UUID}</uuid>\n"
        "  <metadata>\n"
        f"    <nwf:nwfilter xmlns:nwf=\"{NWF_NS}\">\n"
        f"      <nwf:interface mac=\"{HOOK_MAC}\">\n"
        f"        <nwf:filterref filter=\"{FILTER}\">\n"
        f"          <nwf:parameter name=\"IP\" value=\"{HOOK_IP}\"/>\n"
        "        </nwf:filterref>\n"
        "      </nwf:interface>\n"
        "    </nwf:nwfilter>\n"
        "  </metadata>\n"
        "  <memory unit='KiB'>49152</memory>\n"
        "  <currentMemory unit='KiB'>49152</currentMemory>\n"
        "  <vcpu placement='static'>1</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>\n"
        "    <boot dev='hd'/>\n"
        "  </os>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <interface type='bridge'>\n"
        f"      <mac address='{HOOK_MAC}'/>\n"
        "      <source bridge='br0'/>\n"
        f"{target_el}"
        "      <model type='virtio'/>\n"
        "      <alias name='net0'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n"
        "    </interface>\n"
        "    <memballoon model='none'/>\n"
        "  </devices>\n"
        "</domain>\n"
    ).encode()


def custom_filter_xml(variant: int) -> str:
    """clean-traffic under another name; variants differ in one rule (the ARP rule's comment),
    which changes the rules of every port that uses the filter."""
    comment = f" comment='bench variant {variant}'" if variant else ""
    return (
        f"<filter name='{CUSTOM_FILTER}' chain='root'>\n"
        f"  <uuid>{CUSTOM_UUID}</uuid>\n"
        "  <filterref filter='no-mac-spoofing'/>\n"
        "  <filterref filter='no-ip-spoofing'/>\n"
        "  <rule action='accept' direction='out' priority='-650'>\n"
        "    <mac protocolid='ipv4'/>\n"
        "  </rule>\n"
        "  <filterref filter='allow-incoming-ipv4'/>\n"
        "  <filterref filter='no-arp-spoofing'/>\n"
        "  <rule action='accept' direction='inout' priority='-500'>\n"
        f"    <mac protocolid='arp'{comment}/>\n"
        "  </rule>\n"
        "  <filterref filter='no-other-l2-traffic'/>\n"
        "  <filterref filter='qemu-announce-self'/>\n"
        "</filter>\n"
    )
