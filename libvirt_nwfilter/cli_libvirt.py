"""CLI verbs that deal with libvirt: re-applying guests' filters, editing a guest's references,
importing libvirt's filters and converting native references (the hook's installation is in
:mod:`cli_install`).

Registered into ``libvirt-nwfilter`` by :func:`register`; handlers are ``func(service, args)``
returning the exit status. Only :mod:`libvirt_client` talks to libvirtd (imported when a verb
needs it, so the other verbs work without python3-libvirt).
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import TYPE_CHECKING, Callable

from .errors import NwfilterError, ValidationError
from .model import Binding, FilterRef, make_params

if TYPE_CHECKING:
    from .libvirt_client import DomainRef, LibvirtClient
    from .service import Service

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
DEFAULT_URI = "qemu:///system"


def _client(args: argparse.Namespace) -> "LibvirtClient":
    from .libvirt_client import LibvirtClient

    return LibvirtClient(args.connect)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# reapply


def _port_exists(port: str) -> bool:
    try:
        socket.if_nametoindex(port)
        return True
    except OSError:
        return False


def _sync(service: "Service", client: "LibvirtClient", dom: "DomainRef") -> list[str]:
    """Re-bind one running domain from its live XML; returns its tap names."""
    from .domain import parse_domain
    from .hook import sync_domain

    domain = parse_domain(client.xml(dom), f"domain '{dom.name}'")
    bound, removed = sync_domain(service, domain, repair=True)
    if bound:
        print(f"domain '{domain.name}': filtered {', '.join(bound)}")
    else:
        print(f"domain '{domain.name}': no interface filtered by libvirt-nwfilter")
    for port in removed:
        print(f"domain '{domain.name}': removed the binding on {port}")
    for interface in domain.interfaces:
        if interface.native_filterref:
            print(f"domain '{domain.name}': interface {interface.mac} has libvirt's own <filterref> "
                  "(left to libvirt)")
    return [i.target for i in domain.interfaces if i.target]


def cmd_reapply(service: "Service", args: argparse.Namespace) -> int:
    if args.all and args.domains:
        _error("give domains or --all, not both")
        return EXIT_USAGE
    if not args.all and not args.domains:
        applied = service.reapply()
        ports = [a.binding.portdev for a in applied]
        print(f"Re-instantiated {len(ports)} binding(s)" + (f": {', '.join(ports)}" if ports else ""))
        return EXIT_OK
    status = EXIT_OK
    with _client(args) as client:
        if args.all:
            targets = client.running_domains()
        else:
            targets = []
            for name in args.domains:
                try:
                    dom = client.domain(name)
                    if not client.is_active(dom):
                        raise NwfilterError(f"domain '{dom.name}' is not running")
                    targets.append(dom)
                except NwfilterError as error:
                    _error(str(error))
                    status = EXIT_REFUSED
        taps: set[str] = set()
        for dom in targets:
            try:
                taps.update(_sync(service, client, dom))
            except NwfilterError as error:
                _error(f"domain '{dom.name}': {error}")
                status = EXIT_REFUSED
        if args.all:
            status = max(status, _remove_orphans(service, client, {d.uuid for d in targets}, taps))
    return status


def _remove_orphans(service: "Service", client: "LibvirtClient", running: set[str], taps: set[str]) -> int:
    """Bindings whose owner is not a running domain: removed when the owner is a domain libvirt
    knows, the port is gone, or the port is a running guest's tap; otherwise kept (bindings
    the CLI made on other ports, e.g. a container's veth)."""
    status = EXIT_OK
    for applied in service.list_bindings():
        binding = applied.binding
        if binding.owner_uuid in running:
            continue
        try:
            known = True
            client.domain(binding.owner_uuid)
        except NwfilterError:
            known = False
        if known or binding.portdev in taps or not _port_exists(binding.portdev):
            try:
                service.delete_binding(binding.portdev)
                print(f"removed the binding on {binding.portdev} (owner '{binding.owner_name}' is not running)")
            except NwfilterError as error:
                _error(f"port {binding.portdev}: {error}")
                status = EXIT_REFUSED
        else:
            print(f"kept the binding on {binding.portdev}: its owner '{binding.owner_name}' is not a libvirt "
                  "domain and the port exists (binding-delete removes it)")
    return status


# ------------------------------------------------------------------------------------------
# attach-filter / detach-filter


def _views(client: "LibvirtClient", dom: "DomainRef", args: argparse.Namespace) -> list[bool]:
    """Which configurations to change: [True] live, [False] persistent (live first)."""
    active, persistent = client.is_active(dom), client.is_persistent(dom)
    if args.live and not active:
        raise NwfilterError(f"domain '{dom.name}' is not running (--live)")
    if args.config and not persistent:
        raise NwfilterError(f"domain '{dom.name}' is transient: it has no persistent configuration (--config)")
    if args.live or args.config:
        return [view for view, wanted in ((True, args.live), (False, args.config)) if wanted]
    return [True, False] if active and persistent else [True] if active else [False]


def _view_name(live: bool) -> str:
    return "live" if live else "persistent"


def _parse_mac(text: str) -> str:
    from .schema import PROTOCOLS, parse_literal

    try:
        return parse_literal(PROTOCOLS["mac"].attr("srcmacaddr"), text)
    except ValueError:
        raise NwfilterError(f"'{text}' is not a MAC address like 52:54:00:12:34:56") from None


def _interface(client: "LibvirtClient", dom: "DomainRef", live: bool, mac: str):
    from .domain import FILTERABLE_TYPES, parse_domain

    domain = parse_domain(client.xml(dom, inactive=not live), f"domain '{dom.name}'", metadata=False)
    found = [i for i in domain.interfaces if i.mac == mac]
    if not found:
        raise NwfilterError(f"domain '{dom.name}' has no {'/'.join(FILTERABLE_TYPES)} interface with MAC {mac} "
                            f"in its {_view_name(live)} configuration")
    return domain, found[0]


def _entries(client: "LibvirtClient", dom: "DomainRef", live: bool) -> dict[str, FilterRef]:
    from .domain import parse_metadata

    text = client.get_metadata(dom, live)
    return parse_metadata(text, f"metadata of domain '{dom.name}'") if text else {}


def _apply_live(service: "Service", client: "LibvirtClient", dom: "DomainRef", text: str | None,
                old: str | None) -> tuple[list[str], list[str]]:
    """Set the live metadata and make the kernel match; on failure the old metadata returns."""
    from .domain import parse_domain
    from .hook import sync_domain

    client.set_metadata(dom, text, live=True)
    try:
        return sync_domain(service, parse_domain(client.xml(dom), f"domain '{dom.name}'"), repair=True)
    except NwfilterError:
        client.set_metadata(dom, old, live=True)
        raise


def _parse_params(values: list[str]) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise NwfilterError(f"--param '{item}': expected NAME=VALUE")
        params.setdefault(name, []).append(value)
    return params


def cmd_attach_filter(service: "Service", args: argparse.Namespace) -> int:
    from .domain import metadata_xml, parse_metadata

    mac = _parse_mac(args.mac)
    ref = FilterRef(args.filter, make_params(_parse_params(args.param or [])))
    # Validate the reference as the hook will read it (names, values), then resolve it here.
    parse_metadata(metadata_xml({mac: ref}), "--param/FILTER")
    done = []
    with _client(args) as client:
        dom = client.domain(args.domain)
        views = _views(client, dom, args)
        service.check([Binding(dom.name, dom.uuid, "", mac, ref)])
        bound: list[str] = []
        for live in views:
            _, interface = _interface(client, dom, live, mac)
            if interface.native_filterref:
                raise NwfilterError(f"interface {mac} of domain '{dom.name}' has libvirt's own <filterref>; "
                                    "remove it or move it with 'convert-domain' first")
            entries = _entries(client, dom, live)
            entries[mac] = ref
            text = metadata_xml(entries)
            if live:
                bound, _ = _apply_live(service, client, dom, text, client.get_metadata(dom, True))
            else:
                client.set_metadata(dom, text, live=False)
            done.append(_view_name(live))
    print(f"Filter '{args.filter}' attached to interface {mac} of domain '{dom.name}' "
          f"({' and '.join(done)} configuration)")
    if bound:
        print(f"Filtering {', '.join(bound)} now")
    return EXIT_OK


def cmd_detach_filter(service: "Service", args: argparse.Namespace) -> int:
    from .domain import metadata_xml

    mac = _parse_mac(args.mac)
    done, missing, removed = [], [], []
    with _client(args) as client:
        dom = client.domain(args.domain)
        for live in _views(client, dom, args):
            entries = _entries(client, dom, live)
            if entries.pop(mac, None) is None:
                missing.append(_view_name(live))
                continue
            text = metadata_xml(entries) if entries else None
            if live:
                _, removed = _apply_live(service, client, dom, text, client.get_metadata(dom, True))
            else:
                client.set_metadata(dom, text, live=False)
            done.append(_view_name(live))
    if not done:
        raise NwfilterError(f"domain '{dom.name}' has no libvirt-nwfilter filter on interface {mac} "
                            f"({' and '.join(missing)} configuration)")
    print(f"Filter detached from interface {mac} of domain '{dom.name}' ({' and '.join(done)} configuration)")
    for view in missing:
        print(f"note: the {view} configuration had no filter on {mac}")
    if removed:
        print(f"Removed the binding on {', '.join(removed)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# import-libvirt / convert-domain


def _same_content(a, b) -> bool:
    from dataclasses import replace

    from .xml import format_filter

    return format_filter(replace(a, uuid=None)) == format_filter(replace(b, uuid=None))


def cmd_import_libvirt(service: "Service", args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .xml import format_filter, parse_filter

    with _client(args) as client:
        filters = client.nwfilters()
    status = EXIT_OK
    counts = {"imported": 0, "identical": 0, "failed": 0}
    for name, text in filters:
        source = f"libvirt filter '{name}'"
        try:
            flt = parse_filter(text, source)
            current = service.store.lookup(flt.name)
            if current is not None and _same_content(current, flt):
                print(f"{name}: identical, skipped")
                counts["identical"] += 1
                continue
            if current is not None and current.uuid != flt.uuid:
                if not service.store.origin(flt.name).shipped:
                    raise NwfilterError(f"defined here with another content and UUID {current.uuid}; "
                                        "not replaced (undefine it first to import libvirt's)")
                # libvirt's (changed) copy of a built-in filter: it overrides ours, under our UUID.
                flt = replace(flt, uuid=None)
            service.define(format_filter(flt).encode(), source)
            what = "imported (overrides the built-in filter)" if current is not None else "imported"
            print(f"{name}: {what}")
            counts["imported"] += 1
        except NwfilterError as error:
            print(f"{name}: not imported: {' '.join(str(error).split())}")
            counts["failed"] += 1
            status = EXIT_REFUSED
    print(f"{len(filters)} filter(s) in libvirt: {counts['imported']} imported, {counts['identical']} identical, "
          f"{counts['failed']} not imported")
    return status


def cmd_convert_domain(service: "Service", args: argparse.Namespace) -> int:
    from .domain import convert_native

    with _client(args) as client:
        dom = client.domain(args.domain)
        if not client.is_persistent(dom):
            raise NwfilterError(f"domain '{dom.name}' is transient: it has no persistent definition to convert")
        conversion = convert_native(client.xml(dom, inactive=True), f"domain '{dom.name}'")
        for note in conversion.left:
            print(f"domain '{dom.name}': {note}")
        if not conversion.converted:
            print(f"domain '{dom.name}': no native <filterref> to convert")
            return EXIT_OK
        problems = []
        for mac, ref in conversion.converted:
            try:
                service.check([Binding(dom.name, dom.uuid, "", mac, ref)])
            except NwfilterError as error:
                problems.append(f"interface {mac}: {' '.join(str(error).split())}")
        if problems:
            raise ValidationError([f"domain '{dom.name}' not converted: " + "; ".join(problems)
                                   + " (filters only libvirt has can be copied with 'import-libvirt')"])
        client.define_xml(conversion.xml)
        active = client.is_active(dom)
    for mac, ref in conversion.converted:
        print(f"domain '{dom.name}': interface {mac}: filter '{ref.filter}' moved into the libvirt-nwfilter metadata")
    print("The persistent definition changed. "
          + ("The running guest keeps libvirt's own filters until it is shut down and started again "
             "(a reboot inside the guest is not enough); then the hook applies ours."
             if active else "The hook applies the filters at the next start."))
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# Registration

CONNECT_HELP = f"libvirt connection URI (default {DEFAULT_URI})"


def _connect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--connect", metavar="URI", default=DEFAULT_URI, help=CONNECT_HELP)


def _live_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--live", action="store_true", help="change the running guest (and its ports now)")
    parser.add_argument("--config", action="store_true", help="change the persistent definition")


def register(sub, verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the libvirt verbs to the ``libvirt-nwfilter`` sub-command parser ``sub``."""
    from . import cli_install

    cli_install.register(sub, verb)
    p = verb(sub, "reapply", cmd_reapply, "Make the firewall match the guests again.",
             "With DOMAIN arguments (name, UUID or id of running guests): rebuilds each guest's\n"
             "bindings from its live XML, one transaction per guest: every interface with a\n"
             "libvirt-nwfilter reference is filtered on its tap, bindings of interfaces the guest no\n"
             "longer has are removed. Use it after hot-plugging or unplugging an interface (libvirt\n"
             "runs no hook for that) or when rules were lost.\n\n"
             "With --all: the same for every running guest; then bindings whose owner is not a\n"
             "running guest are removed when the owner is a domain libvirt knows, the port no longer\n"
             "exists or is a running guest's tap (other bindings, e.g. made with binding-create on a\n"
             "container's port, are kept and listed).\n\n"
             "Without arguments: re-instantiates every recorded binding from the state, without\n"
             "asking libvirt, in one transaction that also removes every kernel object of ours no\n"
             "record names (what verify reports as orphans). A port whose record cannot be read\n"
             "keeps its rules exactly as they are (verify names it with its repair).\n\n"
             "Run it in libvirtd's network namespace (the one its taps live in).")
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="running guest (name, UUID or id)")
    p.add_argument("--all", action="store_true", help="every running guest, and remove orphaned bindings")
    _connect(p)

    p = verb(sub, "attach-filter", cmd_attach_filter, "Filter a guest's interface.",
             "Sets the libvirt-nwfilter reference of the interface with MAC in the guest's metadata\n"
             "(namespace http://libvirt-nwfilter.org/xmlns/nwfilter/1.0, through libvirt's metadata\n"
             "API) to FILTER with the given parameters, replacing any previous one. The MAC parameter\n"
             "defaults to the interface's MAC; repeat --param for list values (--param IP=10.0.0.1 --param\n"
             "IP=10.0.0.2). The filter is resolved first: an unknown filter or a missing variable\n"
             "refuses the change.\n\n"
             "--live changes the running guest and filters its tap at once; --config changes the\n"
             "persistent definition (used at the next start). Default: both when the guest runs,\n"
             "else the persistent definition. An interface with libvirt's own <filterref> is\n"
             "refused (see convert-domain).")
    p.add_argument("domain", metavar="DOMAIN", help="guest name, UUID or id")
    p.add_argument("mac", metavar="MAC", help="MAC address of the guest's interface")
    p.add_argument("filter", metavar="FILTER", help="name of the filter to apply")
    p.add_argument("--param", metavar="NAME=VALUE", action="append", help="filter parameter (repeatable)")
    _live_config(p)
    _connect(p)

    p = verb(sub, "detach-filter", cmd_detach_filter, "Stop filtering a guest's interface.",
             "Removes the libvirt-nwfilter reference of the interface with MAC from the guest's\n"
             "metadata. --live also removes the tap's rules at once; --config changes the persistent\n"
             "definition. Default: both when the guest runs, else the persistent definition. A MAC\n"
             "the guest no longer has can be detached too.")
    p.add_argument("domain", metavar="DOMAIN", help="guest name, UUID or id")
    p.add_argument("mac", metavar="MAC", help="MAC address of the guest's interface")
    _live_config(p)
    _connect(p)

    p = verb(sub, "import-libvirt", cmd_import_libvirt, "Copy the filters defined in libvirt.",
             "Reads every filter of libvirt's own nwfilter driver ('virsh nwfilter-list') and defines\n"
             "it here, reporting each: identical filters are skipped; libvirt's changed copy of a\n"
             "built-in filter is imported as an override (with our UUID); a filter defined here with\n"
             "other content is not replaced. Exit status 1 when any filter was not imported.")
    _connect(p)

    p = verb(sub, "convert-domain", cmd_convert_domain, "Move a guest's native <filterref>s to our metadata.",
             "Rewrites the persistent definition of DOMAIN: the <filterref> inside each bridge,\n"
             "network or ethernet <interface> (applied by libvirt's own nwfilter driver) moves into\n"
             "the libvirt-nwfilter metadata, unchanged. Every filter must exist here and resolve with\n"
             "its parameters (copy libvirt's with import-libvirt first); otherwise nothing changes.\n"
             "A running guest keeps libvirt's filters until it is shut down and started again.")
    p.add_argument("domain", metavar="DOMAIN", help="guest name, UUID or id")
    _connect(p)
