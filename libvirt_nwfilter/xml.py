"""Safe parsing and canonical formatting of ``<filter>`` documents (``<filterbinding>``:
:mod:`.bindingxml`), and the document helpers both use.

Parsing collects every problem of a document and raises one :class:`ValidationError`; each
problem names the source, line, filter, element, attribute and value. Formatting produces the
form libvirt's ``nwfilter-dumpxml`` prints (filter-language.md §12).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field

from lxml import etree

from .errors import ValidationError
from .model import (DEFAULT_RULE_PRIORITY, LIBVIRT_CHAIN_DEFAULTS, Action, Attr, Direction,
                    Filter, FilterRef, Match, Rule, chain_prefix, make_params)
from .schema import (EXTENSION_PREFIX, ICMPV6_GROUP, NWF_NAMESPACE, PROTOCOLS, Negation, ValueType, decimal,
                     parse_literal)
from .syntax import (FILTER_NAME_RE, PARAM_NAME_RE, PARAM_VALUE_RE,
                     chain_name_problem, match_problems, normalise_uuid, parse_varref)
from .schema import ATTR_ORDER

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1 << 20
_INTEGER_RE = re.compile(r"^[+-]?[0-9]+\Z")
_CONTROL_ESCAPES = {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}
_SPELLING_HINTS = {"port_hi": "port-hi", "msg-age": "age", "msg-age-hi": "age-hi"}


@dataclass
class Problems:
    """Collects located problems for one document."""

    source: str
    context: str = ""
    items: list[str] = field(default_factory=list)

    def add(self, node: etree._Element | None, message: str) -> None:
        where = f"{self.source}:{node.sourceline}" if node is not None and node.sourceline else self.source
        element = f"<{_shown_tag(node)}> " if node is not None else ""
        prefix = f"{self.context}, " if self.context else ""
        # One line per problem, even when a value holds a character reference such as &#10;.
        self.items.append(f"{where}: {prefix}{element}{message}".translate(_CONTROL_ESCAPES))

    def raise_if_any(self) -> None:
        if self.items:
            raise ValidationError(self.items)


def _shown_tag(node: etree._Element) -> str:
    """``prefix:name`` for an element in a namespace (as written), the name otherwise."""
    if not isinstance(node.tag, str) or not node.tag.startswith("{"):
        return str(node.tag)
    name = etree.QName(node).localname
    return f"{node.prefix}:{name}" if node.prefix else name


def parse_document(data: bytes | str, source: str, root_tag: str,
                    max_bytes: int | None = MAX_DOCUMENT_BYTES) -> etree._Element:
    """The document's root element (ValidationError naming the source). ``max_bytes`` None: a
    document of any size (libvirt's domain XML), read without libxml2's size limits."""
    raw = data.encode() if isinstance(data, str) else data
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValidationError([f"{source}: document larger than {max_bytes} bytes"])
    # Text was encoded here as UTF-8, whatever its XML declaration says.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             remove_comments=True, remove_pis=True, huge_tree=max_bytes is None,
                             encoding="utf-8" if isinstance(data, str) else None)
    try:
        tree = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as error:
        raise ValidationError([f"{source}:{error.lineno or 0}: malformed XML: {error.msg}"]) from None
    if tree.getroottree().docinfo.doctype:
        raise ValidationError([f"{source}: a DOCTYPE is not allowed"])
    if tree.tag != root_tag:
        raise ValidationError([f"{source}:{tree.sourceline}: expected root element <{root_tag}>, not <{tree.tag}>"])
    return tree


def element_children(node: etree._Element) -> list[etree._Element]:
    return [child for child in node if isinstance(child.tag, str)]


def _attribute_name(qualified: str) -> str:
    """An attribute's name as the schema knows it: ours (in :data:`NWF_NAMESPACE`) prefixed
    ``nwf:`` whatever prefix the document declared; another namespace's in Clark notation."""
    if qualified.startswith(_NWF_CLARK):
        return EXTENSION_PREFIX + qualified[len(_NWF_CLARK):]
    return qualified


_NWF_CLARK = "{" + NWF_NAMESPACE + "}"


def check_attributes(node: etree._Element, allowed: tuple[str, ...], problems: Problems) -> None:
    for name in map(_attribute_name, node.attrib):
        if name not in allowed:
            problems.add(node, f"unknown attribute '{name}'{_hint(name, allowed)}")


def _hint(name: str, known) -> str:
    spelling = _SPELLING_HINTS.get(name)
    close = spelling if spelling in known else next(iter(difflib.get_close_matches(name, list(known), 1, 0.75)), None)
    return f" (did you mean '{close}'?)" if close else ""


def _check_text(node: etree._Element, problems: Problems) -> None:
    """Non-whitespace text inside ``node`` (before or between its children) is an error."""
    texts = [child.tail for child in node] + ([] if node.tag == "uuid" else [node.text])
    for text in texts:
        if text and text.strip():
            problems.add(node, f"unexpected text '{text.strip()}'")


def _check_leaf(node: etree._Element, problems: Problems) -> None:
    """An element that may hold neither child elements nor text (except <uuid>'s value)."""
    _check_text(node, problems)
    for child in element_children(node):
        problems.add(child, f"unexpected child element inside <{node.tag}>")


def _int_attr(node, name: str, problems: Problems, default: int | None) -> int | None:
    text = node.get(name)
    if text is None:
        return default
    raw = text.lstrip(" \t\r\n")  # libvirt (strtol) skips leading blanks only
    value = decimal(raw) if _INTEGER_RE.match(raw) else None
    if value is None or not -1000 <= value <= 1000:
        problems.add(node, f"attribute '{name}': '{text}' is not an integer in -1000..1000")
        return default
    return value


# ------------------------------------------------------------------------------------------
# <filter>


def parse_filter(data: bytes | str, source: str = "<input>") -> Filter:
    """Parse and validate a ``<filter>`` document (ValidationError listing every problem)."""
    root = parse_document(data, source, "filter")
    problems = Problems(source)
    name = root.get("name")
    if not name:
        problems.add(root, "attribute 'name' is required")
        name = ""
    elif not FILTER_NAME_RE.match(name):
        problems.add(root, f"attribute 'name': '{name}' is not a valid filter name "
                     "(letters, digits, _ . -; not starting with a digit, '.' or '-'; at most 200)")
    problems.context = f"filter '{name}'"
    check_attributes(root, ("name", "chain", "priority"), problems)
    chain_given = root.get("chain") is not None
    chain = root.get("chain", "root")
    chain_problem = chain_name_problem(chain)
    if chain_problem:
        problems.add(root, chain_problem)
        chain = "root"
    priority = _int_attr(root, "priority", problems, None)
    uuid, entries = _parse_filter_children(root, problems)
    problems.raise_if_any()
    return Filter(name=name, chain=chain, priority=_chain_priority(chain, priority if chain_given else None),
                  uuid=uuid, entries=tuple(entries))


def _chain_priority(chain: str, priority: int | None) -> int | None:
    """The explicit chain priority as the canonical output reads back (None = the default).

    §12 prints the prefix default when none was given and never prints 0, so an explicit 0 or
    an explicit default must mean what the absent attribute means; otherwise a stored (canonical)
    file would read back with another chain priority than the definition had.
    """
    if priority in (0, LIBVIRT_CHAIN_DEFAULTS[chain_prefix(chain)]):
        return None
    return priority


def _parse_filter_children(root, problems: Problems):
    uuid, entries, rules = None, [], 0
    _check_text(root, problems)
    for child in element_children(root):
        if child.tag == "uuid":
            check_attributes(child, (), problems)
            _check_leaf(child, problems)
            if uuid is not None:
                problems.add(child, "more than one <uuid>")
            try:
                uuid = normalise_uuid(child.text or "")
            except ValueError as error:
                problems.add(child, str(error))
        elif child.tag == "rule":
            rules += 1
            entries.append(_parse_rule(child, problems, rules))
        elif child.tag == "filterref":
            entries.append(parse_filterref(child, problems))
        else:
            problems.add(child, "unknown element (expected <uuid>, <rule> or <filterref>)")
    return uuid, entries


def _enum_attr(node, name: str, enum_type, problems: Problems):
    text = node.get(name)
    if text is None:
        problems.add(node, f"attribute '{name}' is required")
        return None
    try:
        return enum_type(text)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        problems.add(node, f"attribute '{name}': '{text}' is not one of {allowed}")
        return None


def _parse_statematch(node, problems: Problems) -> bool:
    text = node.get("statematch")
    if text is None or text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    problems.add(node, f"attribute 'statematch': '{text}' is not one of true, false, 1, 0")
    return True


def _parse_rule(node, problems: Problems, number: int) -> Rule:
    check_attributes(node, ("action", "direction", "priority", "statematch"), problems)
    _check_text(node, problems)
    action = _enum_attr(node, "action", Action, problems)
    direction = _enum_attr(node, "direction", Direction, problems)
    priority = _int_attr(node, "priority", problems, DEFAULT_RULE_PRIORITY)
    statematch = _parse_statematch(node, problems)
    elements = element_children(node)
    match = None
    if elements:
        match = _parse_match(elements, problems)
    if match is not None and direction is not None:
        for problem in match_problems(match, direction):
            problems.add(elements[0], f"rule {number}: {problem}")
    return Rule(action or Action.DROP, direction or Direction.INOUT, priority, statematch, match)


def _parse_match(elements, problems: Problems) -> Match | None:
    protocol = elements[0].tag
    if protocol not in PROTOCOLS:
        problems.add(elements[0], f"unknown protocol element{_hint(protocol, PROTOCOLS)}")
        return None
    merged: dict[str, Attr] = {}
    for element in elements:
        if element.tag not in PROTOCOLS:
            problems.add(element, f"unknown element inside <rule>{_hint(element.tag, PROTOCOLS)}")
            continue
        if element.tag != protocol:
            problems.add(element, f"all protocol elements of a rule must be <{protocol}>")
            continue
        _parse_element(element, merged, problems)
    order = ATTR_ORDER[protocol]
    attrs = tuple(sorted(merged.values(), key=lambda a: order[a.name]))
    return _normalise_negation(Match(protocol, attrs), elements[0], problems)


def _parse_element(element, merged: dict[str, Attr], problems: Problems) -> None:
    spec = PROTOCOLS[element.tag]
    _check_leaf(element, problems)
    match_text = element.get("match", "yes")
    if match_text not in ("yes", "no"):
        problems.add(element, f"attribute 'match': '{match_text}' is not 'yes' or 'no'")
    negated = match_text == "no"
    for qualified, text in element.attrib.items():
        name = _attribute_name(qualified)
        if name == "match":
            continue
        attr_spec = spec.attr(name)
        if attr_spec is None:
            known = [a.name for a in spec.attrs]
            problems.add(element, f"unknown attribute '{name}'{_hint(name, known)}")
            continue
        if negated and attr_spec.negation is Negation.REFUSED:
            problems.add(element, f"attribute '{name}' cannot be negated (match='no')")
        if name == "state" and "state" in merged:
            problems.add(element, "attribute 'state' may appear only once per rule")
        value = _parse_value(attr_spec, text, element, problems)
        if value is not None:
            merged[name] = Attr(name, value, negated)


def _parse_value(attr_spec, text: str, element, problems: Problems):
    if text.startswith("$") and attr_spec.vtype is not ValueType.COMMENT:
        if not attr_spec.variables:
            problems.add(element, f"attribute '{attr_spec.name}': variables are not allowed here ('{text}')")
            return None
        try:
            return parse_varref(text)
        except ValueError as error:
            problems.add(element, f"attribute '{attr_spec.name}': '{text}': {error}")
            return None
    try:
        return parse_literal(attr_spec, text)
    except ValueError as error:
        problems.add(element, f"attribute '{attr_spec.name}': '{text}': {error}")
        return None


def _normalise_negation(match: Match, element, problems: Problems) -> Match:
    """Companions take their base's negation; the ipv6 ICMPv6 group shares one negation."""
    spec = match.spec
    by_name = {attr.name: attr for attr in match.attrs}
    group_negation = None
    if match.protocol == "ipv6":
        present = [by_name[name] for name in ICMPV6_GROUP if name in by_name]
        if "type" in by_name:
            group_negation = by_name["type"].negated
        elif present:
            group_negation = present[0].negated
            if any(attr.negated != group_negation for attr in present):
                problems.add(element, "typeend, code and codeend must share one negation when 'type' is absent")
    attrs = []
    for attr in match.attrs:
        negated = attr.negated
        if match.protocol == "ipv6" and attr.name in ICMPV6_GROUP:
            negated = group_negation
        elif spec.attr(attr.name).negation is Negation.FOLLOWS and spec.attr(attr.name).base in by_name:
            negated = by_name[spec.attr(attr.name).base].negated
        attrs.append(Attr(attr.name, attr.value, negated))
    return Match(match.protocol, tuple(attrs))


def parse_filterref(node, problems: Problems) -> FilterRef:
    """Parse a ``<filterref>`` with its ``<parameter>`` children (shared with bindings/metadata)."""
    check_attributes(node, ("filter",), problems)
    _check_text(node, problems)
    name = node.get("filter")
    if not name:
        problems.add(node, "attribute 'filter' is required (the name of the referenced filter)")
        name = ""
    elif not FILTER_NAME_RE.match(name):
        problems.add(node, f"attribute 'filter': '{name}' is not a valid filter name")
    params: dict[str, list[str]] = {}
    for child in element_children(node):
        if child.tag != "parameter":  # a namespaced <x:parameter> is another element
            problems.add(child, "unknown element (expected <parameter>)")
            continue
        check_attributes(child, ("name", "value"), problems)
        _check_leaf(child, problems)
        pname, pvalue = child.get("name"), child.get("value")
        if not pname or not PARAM_NAME_RE.match(pname):
            problems.add(child, f"parameter name '{pname or ''}' is invalid (allowed: A-Z a-z 0-9 _)")
        elif not pvalue or not PARAM_VALUE_RE.match(pvalue):
            problems.add(child, f"parameter '{pname}': value '{pvalue or ''}' is invalid (allowed: A-Z a-z 0-9 _ . :)")
        else:
            params.setdefault(pname, []).append(pvalue)
    return FilterRef(name, make_params(params))


# ------------------------------------------------------------------------------------------
# Formatting


_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;",
                          "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"})


def escape(text: str) -> str:
    """Attribute text escaped for single-quoted output, TAB/LF/CR as character references."""
    return text.translate(_ESCAPES)


def _format_match(match: Match, indent: str) -> list[str]:
    if not match.attrs:
        return [f"{indent}<{match.protocol}/>"]
    lines, current, negated = [], [], None
    for attr in match.attrs:
        if current and attr.negated != negated:
            lines.append(_element_line(match.protocol, negated, current, indent))
            current = []
        negated = attr.negated
        current.append(f"{attr.name}='{escape(str(attr.value))}'")
    lines.append(_element_line(match.protocol, negated, current, indent))
    return lines


def _element_line(protocol: str, negated: bool, attrs: list[str], indent: str) -> str:
    prefix = ["match='no'"] if negated else []
    return f"{indent}<{protocol} " + " ".join(prefix + attrs) + "/>"


def _format_rule(rule: Rule, indent: str) -> list[str]:
    head = f"<rule action='{rule.action.value}' direction='{rule.direction.value}' priority='{rule.priority}'"
    if not rule.statematch:
        head += " statematch='false'"
    if rule.match is None:
        return [f"{indent}{head}/>"]
    return [f"{indent}{head}>", *_format_match(rule.match, indent + "  "), f"{indent}</rule>"]


def format_rule(rule: Rule) -> str:
    """One ``<rule>`` element as ``format_filter`` prints it (without indentation)."""
    return "\n".join(_format_rule(rule, ""))


def format_filterref(ref: FilterRef, indent: str = "  ", tag: str = "filterref") -> list[str]:
    if not ref.params:
        return [f"{indent}<{tag} filter='{escape(ref.filter)}'/>"]
    lines = [f"{indent}<{tag} filter='{escape(ref.filter)}'>"]
    for name, values in ref.params:
        lines += [f"{indent}  <parameter name='{name}' value='{escape(value)}'/>" for value in values]
    return lines + [f"{indent}</{tag}>"]


def uses_extensions(flt: Filter) -> bool:
    """Whether a rule of ``flt`` has an attribute of ours (docs/filter-language-extensions.md)."""
    return any(attr.name.startswith(EXTENSION_PREFIX) for entry in flt.entries
               if isinstance(entry, Rule) and entry.match for attr in entry.match.attrs)


def format_filter(flt: Filter) -> str:
    """The canonical XML of a filter, as libvirt's ``nwfilter-dumpxml`` prints it; a filter
    using our extension attributes declares their namespace on ``<filter>``, last."""
    head = f"<filter name='{flt.name}' chain='{flt.chain}'"
    if flt.printed_priority:
        head += f" priority='{flt.printed_priority}'"
    if uses_extensions(flt):
        head += f" xmlns:nwf='{NWF_NAMESPACE}'"
    lines = [head + ">"]
    if flt.uuid:
        lines.append(f"  <uuid>{flt.uuid}</uuid>")
    for entry in flt.entries:
        lines += _format_rule(entry, "  ") if isinstance(entry, Rule) else format_filterref(entry)
    lines.append("</filter>")
    return "\n".join(lines) + "\n"

