"""The ``libvirt-nwfilter`` command: manage filters (and, later, bindings) like ``virsh nwfilter-*``.

Exit status: 0 success, 1 refused input or failed operation, 2 usage error.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, cli_libvirt
from .config import BACKENDS, Config
from .errors import NwfilterError
from .service import Service
from .simulate import cli as simulate_cli
from .bindingxml import format_binding, parse_binding

log = logging.getLogger("libvirt_nwfilter")

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Network filtering for QEMU/KVM guests with libvirt's nwfilter language, outside libvirtd.

Filters are libvirt <filter> documents. The 24 filters libvirt ships (clean-traffic,
no-mac-spoofing, ...) are built in; filters you define are stored in CONFDIR/filters and take
precedence over a built-in filter of the same name."""

EPILOG = """\
exit status:
  0  success
  1  the input was refused or the operation failed (nothing was changed)
  2  wrong usage

configuration file:
  backend = nftables|ebiptables  firewall backend (default nftables)
  lock-timeout = SECONDS         how long a command waits for the host lock (default 60)
  hook-lock-timeout = SECONDS    the same for the libvirt hook (default 10)
  max-rules-per-binding = N      rules one binding may expand to (default 100000)
  ipv6-learning-limit = N        IPv6 addresses one port may learn (default 16, at most 1024)
CONFDIR/libvirt-nwfilter.conf holds these 'key = value' lines ('#' starts a comment); the
environment overrides it and options override both.

environment:
  LIBVIRT_NWFILTER_CONFDIR            configuration directory (default /etc/libvirt-nwfilter)
  LIBVIRT_NWFILTER_RUNDIR             run-time state directory (default /run/libvirt-nwfilter)
  LIBVIRT_NWFILTER_BACKEND            firewall backend: nftables (default) or ebiptables
  LIBVIRT_NWFILTER_LOCK_TIMEOUT       lock-timeout
  LIBVIRT_NWFILTER_HOOK_LOCK_TIMEOUT  hook-lock-timeout
  LIBVIRT_NWFILTER_MAX_RULES          max-rules-per-binding
  EDITOR, VISUAL                      editor used by 'edit' (default vi)

files:
  CONFDIR/libvirt-nwfilter.conf  configuration (the keys above)
  CONFDIR/filters/NAME.xml       filters defined with 'define' or 'edit'
  RUNDIR/                        applied bindings, their index, the host-wide lock and the journal
                                 (kept in memory: gone after a reboot, like the kernel's rules)
  /etc/libvirt/hooks/qemu.d/libvirt-nwfilter
                                 the qemu hook written by 'install-hook'"""


def one_line(text: str) -> str:
    """``text`` with line breaks shown as ``\\n`` so an error stays on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], quiet: bool = False) -> str:
    """A table laid out like virsh's: cells padded to the column width plus two spaces (line
    breaks in a cell shown as ``\\n``, so that every row stays one line)."""
    rows = [[one_line(cell) for cell in row] for row in rows]
    shown = [list(row) for row in rows] if quiet else [list(headers), *map(list, rows)]
    widths = [max((len(row[i]) for row in shown), default=0) for i in range(len(headers))]
    lines = []
    for row in shown:
        cells = [f" {cell}".ljust(widths[i] + 3) if i < len(row) - 1 else f" {cell}" for i, cell in enumerate(row)]
        lines.append("".join(cells))
    if not quiet:
        lines.insert(1, "-" * sum(width + 3 for width in widths))
    return "\n".join(lines) + "\n" if lines else ""


# ------------------------------------------------------------------------------------------
# Verbs


def cmd_list(service: Service, args: argparse.Namespace) -> int:
    rows = [(info.uuid, info.name, info.origin.value) for info in service.list_filters()]
    sys.stdout.write(format_table(("UUID", "Name", "Source"), rows, args.quiet))
    return EXIT_OK


def cmd_define(service: Service, args: argparse.Namespace) -> int:
    flt, _ = service.define(_read_input(args.file), args.file)
    print(f"Network filter {flt.name} defined from {args.file}")
    return EXIT_OK


def cmd_undefine(service: Service, args: argparse.Namespace) -> int:
    flt = service.undefine(args.filter)
    print(f"Network filter {flt.name} undefined")
    return EXIT_OK


def cmd_dumpxml(service: Service, args: argparse.Namespace) -> int:
    sys.stdout.write(service.dumpxml(args.filter))
    return EXIT_OK


def cmd_edit(service: Service, args: argparse.Namespace) -> int:
    name = service.store.find(args.filter).name
    original = service.dumpxml(name)
    with tempfile.TemporaryDirectory(prefix="libvirt-nwfilter-edit-") as tmp:
        path = Path(tmp) / f"{name}.xml"
        path.write_text(original, encoding="utf-8")
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        if subprocess.run([*shlex.split(editor), str(path)], check=False).returncode != 0:
            raise NwfilterError(f"editor '{editor}' failed; filter {name} not changed")
        edited = path.read_bytes()
    if edited.decode("utf-8", "replace") == original:
        print(f"Network filter {name} XML configuration not changed.")
        return EXIT_OK
    flt, changed = service.define(edited, f"{name}.xml (edited)")
    print(f"Network filter {flt.name} XML configuration {'edited' if changed else 'not changed'}.")
    return EXIT_OK


def cmd_binding_create(service: Service, args: argparse.Namespace) -> int:
    applied = service.create_binding(parse_binding(_read_input(args.file), args.file))
    print(f"Network filter binding on {applied.binding.portdev} created from {args.file}")
    return EXIT_OK


def cmd_binding_delete(service: Service, args: argparse.Namespace) -> int:
    if args.force:
        service.force_delete(args.ports)
        print(f"Network filter binding(s) on {', '.join(args.ports)} deleted (forced: every other binding "
              "was rebuilt)")
        return EXIT_OK
    if len(args.ports) != 1:
        print("error: give one PORTDEV (several only with --force)", file=sys.stderr)
        return EXIT_USAGE
    service.delete_binding(args.ports[0])
    print(f"Network filter binding on {args.ports[0]} deleted")
    return EXIT_OK


def cmd_binding_list(service: Service, args: argparse.Namespace) -> int:
    from .learning.record import describe

    bindings = service.list_bindings()
    rows = [(a.binding.portdev, a.binding.filterref.filter, a.binding.owner_name) for a in bindings]
    headers: tuple[str, ...] = ("Port Dev", "Filter", "Owner")
    if any(a.binding.learning is not None for a in bindings):
        headers += ("IP learning",)
        rows = [(*row, describe(a.binding.learning) if a.binding.learning else "-") for row, a in zip(rows, bindings)]
    sys.stdout.write(format_table(headers, rows, args.quiet))
    return EXIT_OK


def cmd_binding_dumpxml(service: Service, args: argparse.Namespace) -> int:
    sys.stdout.write(format_binding(service.binding(args.port).binding))
    return EXIT_OK


def cmd_render(service: Service, args: argparse.Namespace) -> int:
    sys.stdout.write(service.render(parse_binding(_read_input(args.file), args.file)))
    return EXIT_OK


def cmd_status(service: Service, args: argparse.Namespace) -> int:
    for label, value in service.status():
        print(f"{label + ':':<26}{value}")
    return EXIT_OK


def cmd_verify(service: Service, args: argparse.Namespace) -> int:
    drift = service.verify()
    for item in drift:
        print(f"{item.subject}: {one_line(item.problem)}")
    ports = len({item.subject for item in drift if not item.file})
    files = len({item.subject for item in drift if item.file})
    if ports:
        print(f"error: {ports} port(s) drifted; 'libvirt-nwfilter reapply' restores them", file=sys.stderr)
    if files:
        print(f"error: {files} file(s) of the run directory could not be used; the repair is on each line",
              file=sys.stderr)
    if drift:
        return EXIT_REFUSED
    print(f"All {len(service.list_bindings())} binding(s) match the kernel and the filters.")
    return EXIT_OK


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise NwfilterError(f"cannot read {path}: {error.strerror}") from None


# ------------------------------------------------------------------------------------------
# Parser


def _verb(sub, name: str, func: Callable, summary: str, description: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=f"{summary}\n\n{description}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--confdir, --rundir, --backend (shared with libvirt-nwfilterd)."""
    parser.add_argument("--confdir", help="configuration directory (overrides LIBVIRT_NWFILTER_CONFDIR)")
    parser.add_argument("--rundir", help="run-time state directory (overrides LIBVIRT_NWFILTER_RUNDIR)")
    parser.add_argument("--backend", choices=BACKENDS, help="firewall backend (overrides LIBVIRT_NWFILTER_BACKEND)")


@functools.lru_cache(maxsize=1)
def build_parser() -> argparse.ArgumentParser:
    """The command's parser (built once: the resident service builds it before it forks)."""
    parser = argparse.ArgumentParser(prog="libvirt-nwfilter", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    parser.add_argument("--lock-timeout", metavar="SECONDS",
                        help="how long to wait for the host lock (overrides lock-timeout; default 60)")
    parser.add_argument("-q", "--quiet", action="store_true", help="tables without headers, like virsh -q")
    parser.add_argument("--debug", action="store_true", help="log debug messages and show tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    _verb(sub, "list", cmd_list, "List defined filters.",
          "Prints UUID, name and source of every filter, sorted by name. Source is 'builtin'\n"
          "(one of libvirt's filters, shipped with the package), 'builtin (libvirt-nwfilter)'\n"
          "(one of ours: IPv6 first-hop security), 'user' (defined here) or\n"
          "'user (overrides builtin)'.")
    p = _verb(sub, "define", cmd_define, "Define (add or replace) a filter from an XML file.",
              "FILE holds one libvirt <filter> document ('-' reads standard input). The whole\n"
              "document is validated first; every problem is reported and nothing is stored if any\n"
              "is found. Without <uuid> a new filter gets a random UUID and a redefined one keeps\n"
              "its UUID. Refused: a name that exists with another UUID, a UUID that another filter\n"
              "has, and references that would form a loop. References to filters not defined yet\n"
              "are allowed.")
    p.add_argument("file", metavar="FILE", help="the filter XML ('-' for standard input)")
    p = _verb(sub, "undefine", cmd_undefine, "Remove a filter you defined.",
              "FILTER is a name or a UUID. Built-in filters cannot be removed (define your own\n"
              "filter of that name to override one); undefining an override brings the built-in\n"
              "filter back.")
    p.add_argument("filter", metavar="FILTER", help="filter name or UUID")
    p = _verb(sub, "dumpxml", cmd_dumpxml, "Print a filter's XML.",
              "Prints the canonical form, the same as 'virsh nwfilter-dumpxml' prints for the\n"
              "same filter; it can be given back to 'define' (or to virsh) unchanged.")
    p.add_argument("filter", metavar="FILTER", help="filter name or UUID")
    p = _verb(sub, "edit", cmd_edit, "Edit a filter in $VISUAL or $EDITOR.",
              "Opens the filter's XML in an editor and defines the result. If the edited XML is\n"
              "invalid, the error is printed and the old definition stays in place.")
    p.add_argument("filter", metavar="FILTER", help="filter name or UUID")
    _binding_verbs(sub)
    cli_libvirt.register(sub, _verb)
    simulate_cli.register(sub, _verb)
    return parser


BINDING_FILE_HELP = "a libvirt <filterbinding> document ('-' for standard input)"


def _binding_verbs(sub) -> None:
    p = _verb(sub, "binding-create", cmd_binding_create, "Instantiate a filter on a port.",
              "FILE is a libvirt <filterbinding> (the file 'virsh nwfilter-binding-create' takes):\n"
              "owner name and UUID, <portdev name=...>, <mac address=...> and a <filterref> with\n"
              "parameters. MAC defaults to the binding's MAC. The filter tree is resolved and\n"
              "compiled first; a missing variable or unknown filter refuses the binding and nothing\n"
              "is applied. The rules reach the kernel in one transaction. One binding per port.\n\n"
              "When IP is the only variable missing and CTRL_IP_LEARNING is any (the default) or\n"
              "dhcp, the port gets the learning-time rules and the resident service libvirt-nwfilterd\n"
              "learns its address, then applies the full filter with it (refused when the service\n"
              "does not run). CTRL_IP_LEARNING=none keeps the missing-variable error. The same holds\n"
              "for IPV6 (alone or with IP): the service learns the guest's IPv6 addresses from its\n"
              "duplicate address detection probes and from DHCPv6 replies (DHCPSERVERV6).")
    p.add_argument("file", metavar="FILE", help=BINDING_FILE_HELP)
    p = _verb(sub, "binding-delete", cmd_binding_delete, "Remove the binding of a port.",
              "Removes the port's rules from the kernel and forgets the binding.\n\n"
              "--force is the repair for a record that cannot be read (verify names them): the\n"
              "record files of the PORTDEVs are deleted whatever they hold, and every other\n"
              "binding is rebuilt from its record in one transaction, which removes whatever the\n"
              "kernel holds for the PORTDEVs. The rules of ports whose record cannot be read and\n"
              "that are not named stay exactly as they are.")
    p.add_argument("ports", metavar="PORTDEV", nargs="+", help="the port (interface) name")
    p.add_argument("--force", action="store_true",
                   help="forget the records whatever they hold, and rebuild every other binding")
    _verb(sub, "binding-list", cmd_binding_list, "List bindings.",
          "Prints port, filter and owner of every binding, sorted by port. When a binding learns\n"
          "its IP address (its filter needs IP, given no value, with CTRL_IP_LEARNING any or dhcp),\n"
          "the column 'IP learning' shows the mode, the state ('learning' while the port holds the\n"
          "learning-time rules) and the addresses learned with the end of their DHCP leases (UTC).")
    p = _verb(sub, "binding-dumpxml", cmd_binding_dumpxml, "Print a binding's XML.",
              "Prints the binding as stored after instantiation (with its MAC parameter), in the\n"
              "form 'virsh nwfilter-binding-dumpxml' uses. A binding that learns its IP address has\n"
              "an <nwf:learning> element (namespace http://libvirt-nwfilter.org/xmlns/nwfilter/1.0)\n"
              "with its mode, its state (learning, learned or leased) and one <nwf:address> per\n"
              "address learned, with the end of its DHCP lease ('expires', UTC). binding-create\n"
              "leaves that element out: a new binding learns anew.")
    p.add_argument("port", metavar="PORTDEV", help="the port (interface) name")
    p = _verb(sub, "render", cmd_render, "Print what binding-create would apply, without applying it.",
              "Resolves and compiles the binding's filter and prints the backend's transaction\n"
              "(nft script, or ebtables/iptables restore input) preceded by the command line.\n"
              "Changes no rule and no binding. The nftables backend renders for this kernel: the\n"
              "first command of a boot probes what it supports ('nft -c', which checks without\n"
              "applying) and caches the answer in RUNDIR/probe.json.")
    p.add_argument("file", metavar="FILE", help=BINDING_FILE_HELP)
    _verb(sub, "status", cmd_status, "Show the backend, what the kernel supports, and counts.",
          "Prints the backend in use and how it tracks connections of bridged traffic (the\n"
          "bridge family's conntrack where nf_conntrack_bridge exists, else the inet family\n"
          "through br_netfilter), the bridge-netfilter sysctls L3 rules need, the numbers\n"
          "of filters and bindings, and the resident service libvirt-nwfilterd: whether it runs,\n"
          "since when, its libvirt connection, self-healing, the last repair and the libvirt\n"
          "events it handled.")
    _verb(sub, "verify", cmd_verify, "Check that the kernel holds exactly the recorded rules.",
          "Compares every binding's rules in the kernel with what was applied (rules missing,\n"
          "extra or different, dispatch entries gone) and with what its filters give now, names\n"
          "the kernel objects of ours that no record names (orphans: chains, sets, dispatch\n"
          "entries and mark ids of a port without a binding, older generations and leftovers of\n"
          "a bound port), and checks the files of the run directory (binding records, index,\n"
          "journal). A change a crash interrupted is completed first. Exit status 1 and one line\n"
          "per port that drifted or holds orphans ('reapply' repairs both) or file that cannot be\n"
          "used (with its repair); a damaged index is rebuilt from the binding records. The\n"
          "rules of a port whose record cannot be read are not orphans: every rebuild keeps them\n"
          "as they are until the record is repaired.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="libvirt-nwfilter: %(levelname)s: %(message)s")
    try:
        config = Config.load(confdir=args.confdir, rundir=args.rundir, backend=args.backend,
                             lock_timeout=args.lock_timeout)
        return args.func(Service(config), args)
    except NwfilterError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:  # the system refused something not wrapped where it happened
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {one_line(error.strerror or str(error))}{where}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: still one line unless --debug
        if args.debug:
            raise
        print(f"error: internal error: {type(error).__name__}: {one_line(str(error))} "
              "(run with --debug for details)", file=sys.stderr)
        return EXIT_REFUSED
