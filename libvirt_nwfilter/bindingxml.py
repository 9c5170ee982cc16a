"""Safe parsing and canonical formatting of ``<filterbinding>`` documents (the form of
libvirt's ``nwfilter-binding-dumpxml``), with our learned state (``<nwf:learning>``)."""

from __future__ import annotations

import logging

from .model import Binding, FilterRef
from .schema import PROTOCOLS, parse_literal
from .syntax import PORT_NAME_RE, normalise_uuid
from .xml import Problems, check_attributes, element_children, escape, format_filterref, parse_document, parse_filterref

log = logging.getLogger(__name__)

def _single(root, tag: str, problems: Problems):
    found = [child for child in element_children(root) if child.tag == tag]
    if len(found) > 1:
        problems.add(found[1], f"more than one <{tag}>")
    return found[0] if found else None


def parse_binding(data: bytes | str, source: str = "<input>", stored: bool = False) -> Binding:
    """Parse and validate a ``<filterbinding>`` document. Its learned state
    (``<nwf:learning>``, :mod:`.learning.record`) is read from our records and journal
    (``stored``); in a user's input it is left out with a warning (the port learns anew)."""
    from .learning.record import TAG as LEARNING_TAG, parse_learning

    root = parse_document(data, source, "filterbinding")
    problems = Problems(source)
    check_attributes(root, (), problems)
    learning = None
    for child in element_children(root):
        if child.tag == LEARNING_TAG:
            if stored:
                learning = parse_learning(child, problems)
            else:
                log.warning("%s: the learned addresses it lists are left out: the port learns its address anew",
                            source)
        elif child.tag not in ("owner", "portdev", "linkdev", "mac", "filterref"):
            problems.add(child, "unknown element (expected owner, portdev, linkdev, mac, filterref)")
    owner_name, owner_uuid = _parse_owner(_single(root, "owner", problems), root, problems)
    portdev = _named_device(_single(root, "portdev", problems), "portdev", root, problems, required=True)
    linkdev = _named_device(_single(root, "linkdev", problems), "linkdev", root, problems, required=False)
    mac = _parse_binding_mac(_single(root, "mac", problems), root, problems)
    ref_node = _single(root, "filterref", problems)
    if ref_node is None:
        problems.add(root, "filter binding has no <filterref>")
        ref = FilterRef("")
    else:
        ref = parse_filterref(ref_node, problems)
    problems.raise_if_any()
    return Binding(owner_name, owner_uuid, portdev, mac, ref, linkdev, learning)


def _parse_owner(owner, root, problems: Problems) -> tuple[str, str]:
    if owner is None:
        problems.add(root, "filter binding has no <owner>")
        return "", ""
    name_node, uuid_node = _single(owner, "name", problems), _single(owner, "uuid", problems)
    name = (name_node.text or "").strip() if name_node is not None else ""
    if not name:
        problems.add(owner, "filter binding has no owner name")
    uuid = ""
    if uuid_node is None:
        problems.add(owner, "filter binding has no owner UUID")
    else:
        try:
            uuid = normalise_uuid(uuid_node.text or "")
        except ValueError as error:
            problems.add(uuid_node, str(error))
    return name, uuid


def _named_device(node, tag: str, root, problems: Problems, required: bool) -> str | None:
    if node is None:
        if required:
            problems.add(root, f"filter binding has no <{tag}>")
        return None
    name = node.get("name")
    if not name or not PORT_NAME_RE.match(name) or name in (".", ".."):
        problems.add(node, f"attribute 'name': '{name or ''}' is not a valid interface name "
                     "(1..15 characters from A-Z a-z 0-9 _ . : -)")
    return name


def _parse_binding_mac(node, root, problems: Problems) -> str:
    if node is None or not node.get("address"):
        problems.add(node if node is not None else root, "filter binding has no MAC address")
        return ""
    try:
        return parse_literal(PROTOCOLS["mac"].attr("srcmacaddr"), node.get("address"))
    except ValueError as error:
        problems.add(node, f"attribute 'address': '{node.get('address')}': {error}")
        return ""


def format_binding(binding: Binding) -> str:
    """The binding XML as libvirt's ``nwfilter-binding-dumpxml`` prints it."""
    lines = ["<filterbinding>", "  <owner>", f"    <name>{escape(binding.owner_name)}</name>",
             f"    <uuid>{binding.owner_uuid}</uuid>", "  </owner>",
             f"  <portdev name='{binding.portdev}'/>"]
    if binding.linkdev:
        lines.append(f"  <linkdev name='{binding.linkdev}'/>")
    lines.append(f"  <mac address='{binding.mac}'/>")
    lines += format_filterref(binding.filterref)
    if binding.learning is not None:
        from .learning.record import format_learning

        lines += format_learning(binding.learning)
    return "\n".join(lines + ["</filterbinding>"]) + "\n"
