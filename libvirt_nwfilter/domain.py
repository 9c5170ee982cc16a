"""libvirt domain XML as far as filtering goes: interfaces and our ``<metadata>`` entries (pure).

A domain names its filters in ``<metadata>``, in our namespace (DESIGN.md, contract), one entry
per interface keyed by MAC::

    <metadata>
      <nwf:nwfilter xmlns:nwf="http://libvirt-nwfilter.org/xmlns/nwfilter/1.0">
        <nwf:interface mac="52:54:00:12:34:56">
          <nwf:filterref filter="clean-traffic">
            <nwf:parameter name="IP" value="10.0.0.5"/>
          </nwf:filterref>
        </nwf:interface>
      </nwf:nwfilter>
    </metadata>

The element is found by its namespace URI, never by its prefix. Inside it, ``filterref`` and
``parameter`` mean exactly what they mean in libvirt (parsed by :func:`xml.parse_filterref`).
Interfaces of type ``bridge``, ``network`` and ``ethernet`` can be filtered (libvirt's nwfilter
supports the same types); others are ignored. An interface with libvirt's own ``<filterref>``
is left to libvirt. An entry may name a MAC the domain has no interface with (yet), to prepare a
hot-plug: it is kept in :attr:`Domain.absent`, with its problems, and refuses nothing.

Every refusal is a :class:`ValidationError` whose problems each name the domain, the interface
MAC and what is wrong.
"""

from __future__ import annotations

import copy
import io
import logging
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, NamedTuple

from lxml import etree

from .errors import BindingError, ValidationError
from .model import Binding, FilterRef
from .schema import PROTOCOLS, parse_literal
from .syntax import NAMESPACE, PORT_NAME_RE, normalise_uuid
from .xml import element_children, parse_document, Problems, escape, format_filterref, parse_filterref

log = logging.getLogger(__name__)

#: The prefix the CLI asks libvirt to use (readers never rely on it).
METADATA_KEY = "nwf"
METADATA_ROOT = "nwfilter"
FILTERABLE_TYPES = ("bridge", "network", "ethernet")


@dataclass(frozen=True)
class Interface:
    """One filterable interface of a domain.

    ``mac`` is lower-case; ``target`` is the tap (``<target dev>``), None where libvirt did not
    show one (before start, after stop); ``filterref`` is our metadata entry for the MAC;
    ``native_filterref`` tells that the interface has libvirt's own ``<filterref>``.
    """

    type: str
    mac: str
    target: str | None = None
    filterref: FilterRef | None = None
    native_filterref: bool = False
    alias: str | None = None  # libvirt's device alias (``net0``), in a running guest's XML


@dataclass(frozen=True)
class AbsentEntry:
    """A metadata entry for a MAC the domain has no interface with (yet): how a hot-plug is
    prepared. It never refuses a start; ``problems`` (its own, one line each) refuse only the
    attach of that interface; ``filterref`` is None when the entry is invalid."""

    mac: str
    filterref: FilterRef | None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    interfaces: tuple[Interface, ...] = ()
    absent: tuple[AbsentEntry, ...] = ()

    @property
    def filtered(self) -> tuple[Interface, ...]:
        """Interfaces we instantiate filters on: ours, without a native ``<filterref>``."""
        return tuple(i for i in self.interfaces if i.filterref is not None and not i.native_filterref)


class _Device(NamedTuple):
    """An ``<interface>`` of any type, as found in ``<devices>``."""

    type: str
    mac: str | None
    target: str | None
    native: etree._Element | None
    alias: str | None


# ------------------------------------------------------------------------------------------
# Parsing


def parse_domain(data: bytes | str, source: str = "domain XML", metadata: bool = True) -> Domain:
    """Parse a domain XML document (the hook's stdin, ``virsh dumpxml``) of any size and
    validate our metadata against its interfaces. ValidationError on any problem. With
    ``metadata`` False our metadata is not read (every ``filterref`` is None)."""
    root = _outline(data, source)
    name, uuid = _identity(root, source)
    problems = Problems(f"domain '{name}'")
    devices = _devices(root, name)
    by_mac: dict[str, list[_Device]] = {}
    for device in devices:
        if device.mac:
            by_mac.setdefault(device.mac, []).append(device)
    deferred: dict[str, list[str]] = {}
    entries = _metadata_entries(root, problems, set(by_mac), deferred) if metadata else {}
    absent = tuple(AbsentEntry(mac, None if deferred.get(mac) else ref, tuple(deferred.get(mac, ())))
                   for mac, (ref, _) in entries.items() if mac not in by_mac)
    absent += tuple(AbsentEntry(mac, None, tuple(found)) for mac, found in deferred.items() if mac not in entries)
    for mac, (_, node) in entries.items():
        problems.context = f"interface {mac}"
        found = by_mac.get(mac)
        if not found:
            continue
        if not any(d.type in FILTERABLE_TYPES for d in found):
            problems.add(node, f"interface type '{found[0].type}' cannot be filtered "
                         f"(supported: {', '.join(FILTERABLE_TYPES)})")
    problems.raise_if_any()
    interfaces = []
    for device in devices:
        if device.type not in FILTERABLE_TYPES:
            log.debug("domain '%s': interface %s of type '%s' ignored", name, device.mac, device.type)
            continue
        if device.mac is None:
            log.info("domain '%s': an interface of type '%s' has no MAC address; ignored", name, device.type)
            continue
        entry = entries.get(device.mac)
        interfaces.append(Interface(device.type, device.mac, device.target, entry[0] if entry else None,
                                    device.native is not None, device.alias))
    return Domain(name, uuid, tuple(interfaces), absent)


def metadata_entry(data: bytes | str, mac: str, source: str = "domain XML") -> tuple[FilterRef | None, tuple[str, ...]]:
    """The metadata entry for ``mac`` alone, whatever the other entries hold: (its filter
    reference, None without a valid one; its problems and those of the metadata as a whole)."""
    root = parse_document(data, source, "domain")
    name, _ = _identity(root, source)
    problems = Problems(f"domain '{name}'")
    deferred: dict[str, list[str]] = {}
    entries = _metadata_entries(root, problems, set(), deferred)
    found = tuple(problems.items) + tuple(deferred.get(mac, ()))
    entry = entries.get(mac)
    return (entry[0] if entry and not found else None), found


def device_xml(data: bytes | str, alias: str, source: str = "domain XML") -> str | None:
    """The ``<interface>`` element whose alias is ``alias``, as text (None when there is none)."""
    root = parse_document(data, source, "domain")
    for node in root.findall("devices/interface"):
        alias_node = node.find("alias")
        if alias_node is not None and alias_node.get("name") == alias:
            copy_ = copy.deepcopy(node)
            copy_.tail = None
            return etree.tostring(copy_, encoding="unicode")
    return None


def parse_identity(data: bytes | str, source: str = "domain XML") -> tuple[str, str]:
    """Only the domain's name and UUID (teardown must work whatever the metadata holds)."""
    return _identity(_outline(data, source), source)


def _outline(data: bytes | str, source: str) -> etree._Element:
    """The ``<domain>`` element with only what filtering reads: ``<name>``, ``<uuid>``, the
    ``<interface>``s of ``<devices>`` and our elements in ``<metadata>``.

    libvirt's domain XML has no size bound (a 16 MiB ``<description>``, thousands of devices),
    so it is read as a stream without libxml2's size limits (``huge_tree``; entities are not
    resolved, nothing is loaded from outside) and every other subtree is dropped as soon as it
    ends: time and memory grow with the input only, never worse."""
    raw = data.encode() if isinstance(data, str) else data
    stream = etree.iterparse(io.BytesIO(raw), events=("start", "end"), huge_tree=True, resolve_entities=False,
                             no_network=True, load_dtd=False, remove_comments=True, remove_pis=True,
                             encoding="utf-8" if isinstance(data, str) else None)
    root, depth = None, 0
    try:
        for event, element in stream:
            if event == "start":
                depth += 1
                if depth == 1 and element.tag != "domain":
                    raise ValidationError([f"{source}:{element.sourceline}: expected root element <domain>, "
                                           f"not <{element.tag}>"])
                root = root if root is not None else element
                continue
            depth -= 1
            if depth == 1 and element.tag not in _OUTLINE:
                _drop(element)
            elif depth == 2 and not _kept(element):
                _drop(element)
    except etree.XMLSyntaxError as error:
        raise ValidationError([f"{source}:{error.lineno or 0}: malformed XML: {error.msg}"]) from None
    if root is None:
        raise ValidationError([f"{source}: empty document"])
    if root.getroottree().docinfo.doctype:
        raise ValidationError([f"{source}: a DOCTYPE is not allowed"])
    return root


_OUTLINE = ("name", "uuid", "devices", "metadata")


def _kept(element: etree._Element) -> bool:
    """Whether a grandchild of ``<domain>`` is part of the outline."""
    parent = element.getparent().tag
    if parent == "devices":
        return element.tag == "interface"
    if parent == "metadata":
        return isinstance(element.tag, str) and etree.QName(element).namespace == NAMESPACE
    return True


def _drop(element: etree._Element) -> None:
    element.clear()
    element.getparent().remove(element)


def _identity(root, source: str) -> tuple[str, str]:
    name_node, uuid_node = root.find("name"), root.find("uuid")
    name = (name_node.text or "").strip() if name_node is not None else ""
    if not name:
        raise ValidationError([f"{source}: the domain has no <name>"])
    if uuid_node is None:
        raise ValidationError([f"domain '{name}': the domain has no <uuid>"])
    try:
        return name, normalise_uuid(uuid_node.text or "")
    except ValueError as error:
        raise ValidationError([f"domain '{name}': <uuid>: {error}"]) from None


def _mac(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return parse_literal(PROTOCOLS["mac"].attr("srcmacaddr"), text.strip())
    except ValueError:
        return None


def _devices(root, name: str) -> list[_Device]:
    found = []
    for node in root.findall("devices/interface"):
        mac_node, target_node = node.find("mac"), node.find("target")
        mac = _mac(mac_node.get("address") if mac_node is not None else None)
        if mac is None and mac_node is not None:
            log.warning("domain '%s': interface MAC '%s' is not valid; ignored", name, mac_node.get("address"))
        target = target_node.get("dev") if target_node is not None else None
        alias_node = node.find("alias")
        found.append(_Device(node.get("type") or "", mac, target or None, node.find("filterref"),
                             alias_node.get("name") if alias_node is not None else None))
    return found


def _ours(root) -> list[etree._Element]:
    metadata = root.find("metadata")
    if metadata is None:
        return []
    return [child for child in element_children(metadata) if etree.QName(child).namespace == NAMESPACE]


def _metadata_entries(root, problems: Problems, present: set[str] | None = None,
                      deferred: dict[str, list[str]] | None = None) -> dict[str, tuple[FilterRef, etree._Element]]:
    """Our entries in the domain's ``<metadata>`` (empty when there is none). With ``present``
    (the domain's MACs), the problems of entries for other MACs go to ``deferred`` instead."""
    ours = _ours(root)
    if not ours:
        return {}
    if len(ours) > 1:
        problems.add(_local_copy(ours[1], problems), f"more than one element in the namespace {NAMESPACE}")
    return _parse_root(_local_copy(ours[0], problems), problems, present, deferred)


def _local_copy(node, problems: Problems) -> etree._Element:
    """A copy of ``node`` with our namespace (and no namespace) reduced to local names, so
    messages name ``<parameter>`` rather than ``<{uri}parameter>``; line numbers are kept."""
    local = copy.deepcopy(node)
    for element in local.iter():
        if not isinstance(element.tag, str):
            continue
        qname = etree.QName(element)
        if qname.namespace not in (None, NAMESPACE):
            problems.add(element, f"element in a foreign namespace ({qname.namespace}) inside our metadata")
        element.tag = qname.localname
    etree.cleanup_namespaces(local)
    return local


def _parse_root(root, problems: Problems, present: set[str] | None = None,
                deferred: dict[str, list[str]] | None = None) -> dict[str, tuple[FilterRef, etree._Element]]:
    if root.tag != METADATA_ROOT:
        problems.add(root, f"unknown element in the namespace {NAMESPACE} (expected <{METADATA_ROOT}>)")
        return {}
    for name in root.attrib:
        problems.add(root, f"unknown attribute '{name}'")
    entries: dict[str, tuple[FilterRef, etree._Element]] = {}
    for node in element_children(root):
        problems.context = ""
        if node.tag != "interface":
            problems.add(node, "unknown element (expected <interface mac=...>)")
            continue
        for name in node.attrib:
            if name != "mac":
                problems.add(node, f"unknown attribute '{name}'")
        text = node.get("mac")
        mac = _mac(text)
        if mac is None:
            problems.add(node, f"attribute 'mac': '{text or ''}' is not a MAC address like 52:54:00:12:34:56")
            continue
        problems.context = f"interface {mac}"
        if mac in entries:
            problems.add(node, "more than one entry for this MAC address")
            continue
        before = len(problems.items)
        if node.text and node.text.strip():
            problems.add(node, f"unexpected text '{node.text.strip()}'")
        refs = element_children(node)
        if len(refs) != 1 or refs[0].tag != "filterref":
            problems.add(node, "expected exactly one <filterref filter=...> inside <interface>")
        else:
            entries[mac] = (parse_filterref(refs[0], problems), node)
        if present is not None and deferred is not None and mac not in present and len(problems.items) > before:
            deferred[mac] = problems.items[before:]
            del problems.items[before:]
    problems.context = ""
    return entries


def parse_metadata(data: bytes | str, source: str = "metadata") -> dict[str, FilterRef]:
    """Our metadata element alone, as libvirt's metadata API returns it (namespace stripped:
    a plain ``<nwfilter>``; our namespace is accepted too): MAC -> filter reference. The MACs
    are not checked against any domain."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        root = parse_document(raw, source, METADATA_ROOT)
    except ValidationError:
        root = parse_document(raw, source, f"{{{NAMESPACE}}}{METADATA_ROOT}")
    problems = Problems(source)
    entries = _parse_root(_local_copy(root, problems), problems)
    problems.raise_if_any()
    return {mac: ref for mac, (ref, _) in entries.items()}


# ------------------------------------------------------------------------------------------
# Bindings


def to_bindings(domain: Domain, require_target: bool = True) -> list[Binding]:
    """One binding per filtered interface: owner = the domain, portdev = the tap, the
    interface's MAC. Without ``require_target`` (checks before a start: no taps exist yet) a
    missing target gives an empty ``portdev``; with it, a missing or invalid target is an
    error."""
    bindings = []
    for interface in domain.interfaces:
        if interface.filterref is None:
            continue
        if interface.native_filterref:
            log.debug("domain '%s': interface %s has libvirt's own <filterref>: left to libvirt; "
                      "our entry for it is ignored", domain.name, interface.mac)
            continue
        target = interface.target or ""
        if require_target:
            if not target:
                raise BindingError(f"domain '{domain.name}': interface {interface.mac}: no <target dev> "
                                   "(the tap is needed to filter it)")
            if not PORT_NAME_RE.match(target) or target in (".", ".."):
                raise BindingError(f"domain '{domain.name}': interface {interface.mac}: target '{target}' "
                                   "is not a valid interface name")
        bindings.append(Binding(domain.name, domain.uuid, target, interface.mac, interface.filterref))
    return bindings


# ------------------------------------------------------------------------------------------
# Formatting and editing


def metadata_xml(entries: Mapping[str, FilterRef] | Iterable[tuple[str, FilterRef]]) -> str:
    """Our metadata element WITHOUT namespace, for libvirt's ``setMetadata`` (which puts it
    and its descendants into :data:`NAMESPACE` with prefix ``key``)."""
    pairs = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    if not pairs:
        return f"<{METADATA_ROOT}/>\n"
    lines = [f"<{METADATA_ROOT}>"]
    for mac, ref in pairs:
        lines.append(f"  <interface mac='{escape(mac)}'>")
        lines += format_filterref(ref, indent="    ")
        lines.append("  </interface>")
    lines.append(f"</{METADATA_ROOT}>")
    return "\n".join(lines) + "\n"


def _namespaced(entries: Mapping[str, FilterRef]) -> etree._Element:
    element = etree.fromstring(metadata_xml(entries))
    for node in element.iter():
        node.tag = f"{{{NAMESPACE}}}{node.tag}"
    result = etree.Element(f"{{{NAMESPACE}}}{METADATA_ROOT}", nsmap={METADATA_KEY: NAMESPACE})
    result.text = element.text
    result.extend(list(element))
    return result


class Conversion(NamedTuple):
    """Result of :func:`convert_native`: the new domain XML and what moved or stayed."""

    xml: str
    converted: tuple[tuple[str, FilterRef], ...]
    left: tuple[str, ...]  # why interfaces with a native <filterref> were not converted


def convert_native(data: bytes | str, source: str = "domain XML") -> Conversion:
    """Move the native ``<filterref>`` of every filterable interface into our metadata.

    Returns the rewritten domain XML (for ``defineXML``); everything outside the interfaces'
    ``<filterref>`` and our metadata element is kept as it was. Refused (ValidationError) when
    a native reference is invalid or the interface already has an entry of ours."""
    root = parse_document(data, source, "domain", max_bytes=None)
    name, _ = _identity(root, source)
    problems = Problems(f"domain '{name}'")
    entries = {mac: ref for mac, (ref, _) in _metadata_entries(root, problems).items()}
    converted, left = [], []
    for node in root.findall("devices/interface"):
        native = node.find("filterref")
        if native is None:
            continue
        mac_node = node.find("mac")
        mac = _mac(mac_node.get("address") if mac_node is not None else None)
        kind = node.get("type") or ""
        if kind not in FILTERABLE_TYPES:
            left.append(f"interface {mac or '(no MAC)'} of type '{kind}' stays with libvirt")
            continue
        if mac is None:
            left.append(f"an interface of type '{kind}' without MAC address stays with libvirt")
            continue
        problems.context = f"interface {mac}"
        if mac in entries:
            problems.add(native, "the interface has both libvirt's <filterref> and an entry of ours; "
                         "remove one of them first")
            continue
        ref = parse_filterref(native, problems)
        entries[mac] = ref
        converted.append((mac, ref))
        _remove_keeping_layout(native)
    problems.raise_if_any()
    if converted:
        _replace_metadata(root, entries)
    text = etree.tostring(root, encoding="unicode")
    return Conversion(text + "\n", tuple(converted), tuple(left))


def _remove_keeping_layout(node) -> None:
    """Remove ``node``, keeping the indentation of what follows it."""
    parent = node.getparent()
    previous = node.getprevious()
    if previous is not None:
        previous.tail = node.tail
    else:
        parent.text = node.tail
    parent.remove(node)


def _replace_metadata(root, entries: Mapping[str, FilterRef]) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        # libvirt puts <metadata> after <name>, <uuid>, <title>, <description>.
        anchors = [node for node in (root.find(tag) for tag in ("name", "uuid", "genid", "title", "description"))
                   if node is not None]
        anchor = max(anchors, key=root.index) if anchors else None
        index = root.index(anchor) + 1 if anchor is not None else 0
        root.insert(index, metadata)
        metadata.tail = anchor.tail if anchor is not None else "\n  "
    for old in _ours(root):
        metadata.remove(old)
    metadata.append(_namespaced(entries))


def with_entry(domain: Domain, mac: str, ref: FilterRef | None) -> Domain:
    """``domain`` with our entry for ``mac`` replaced (None removes it)."""
    return replace(domain, interfaces=tuple(replace(i, filterref=ref) if i.mac == mac else i
                                            for i in domain.interfaces))
