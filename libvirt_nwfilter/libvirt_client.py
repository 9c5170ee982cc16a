"""The only module that imports ``libvirt`` (python3-libvirt): what the CLI asks of libvirtd.

Never used by the hook (libvirtd waits for the hook; calling back would deadlock). Every
libvirt failure becomes an :class:`NwfilterError` with libvirt's one-line message.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from .domain import METADATA_KEY, NAMESPACE
from .errors import NwfilterError

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the machine
    libvirt = None

DEFAULT_URI = "qemu:///system"


class LibvirtError(NwfilterError):
    """libvirtd refused or failed a request."""


def _require() -> None:
    if libvirt is None:
        raise NwfilterError("the libvirt Python binding is not installed (Debian: python3-libvirt); "
                            "it is needed to talk to libvirtd")


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as error:
        message = " ".join(str(error.get_error_message() or error).split())
        raise LibvirtError(f"{what}: {message}") from None


def _ignore_errors(_context, _error) -> None:
    """libvirt prints every error to stderr unless a handler is registered."""


@dataclass(frozen=True)
class DomainRef:
    """A domain as the CLI handles it: the handle and its identity."""

    handle: object
    name: str
    uuid: str


class LibvirtClient:
    """A connection to libvirtd (``-c URI``)."""

    def __init__(self, uri: str = DEFAULT_URI):
        _require()
        libvirt.registerErrorHandler(_ignore_errors, None)
        self.uri = uri
        with _errors(f"cannot connect to {uri}"):
            self.conn = libvirt.open(uri)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> "LibvirtClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- domains --------------------------------------------------------------------------
    @staticmethod
    def _ref(handle) -> DomainRef:
        return DomainRef(handle, handle.name(), handle.UUIDString())

    def domain(self, name_or_uuid: str) -> DomainRef:
        """Look a domain up by name, UUID or (running) id, as virsh does."""
        lookups = []
        if name_or_uuid.isdigit():
            lookups.append(lambda: self.conn.lookupByID(int(name_or_uuid)))
        if len(name_or_uuid) == 36:
            lookups.append(lambda: self.conn.lookupByUUIDString(name_or_uuid))
        lookups.append(lambda: self.conn.lookupByName(name_or_uuid))
        for lookup in lookups:
            try:
                return self._ref(lookup())
            except libvirt.libvirtError:
                continue
        raise LibvirtError(f"domain '{name_or_uuid}' not found")

    def running_domains(self) -> list[DomainRef]:
        with _errors("cannot list domains"):
            handles = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return sorted((self._ref(h) for h in handles), key=lambda d: d.name)

    def is_active(self, dom: DomainRef) -> bool:
        with _errors(f"domain '{dom.name}'"):
            return bool(dom.handle.isActive())

    def is_persistent(self, dom: DomainRef) -> bool:
        with _errors(f"domain '{dom.name}'"):
            return bool(dom.handle.isPersistent())

    def xml(self, dom: DomainRef, inactive: bool = False) -> str:
        """The live XML, or the persistent definition (``inactive``; secure: for redefining)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE if inactive else 0
        with _errors(f"cannot get the XML of domain '{dom.name}'"):
            return dom.handle.XMLDesc(flags)

    def define_xml(self, xml: str) -> DomainRef:
        """Redefine a domain's persistent configuration."""
        with _errors("cannot define the domain"):
            return self._ref(self.conn.defineXML(xml))

    # -- our metadata -----------------------------------------------------------------------
    @staticmethod
    def _flags(live: bool) -> int:
        return libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG

    def get_metadata(self, dom: DomainRef, live: bool) -> str | None:
        """Our metadata element (namespace stripped by libvirt), None when absent."""
        try:
            return dom.handle.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, self._flags(live))
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise LibvirtError(f"cannot read the metadata of domain '{dom.name}': "
                               f"{error.get_error_message()}") from None

    def set_metadata(self, dom: DomainRef, xml: str | None, live: bool) -> None:
        """Replace our metadata element (``xml`` without namespace; None removes it)."""
        with _errors(f"cannot change the metadata of domain '{dom.name}'"):
            dom.handle.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, METADATA_KEY if xml else None,
                                   NAMESPACE, self._flags(live))

    # -- libvirt's own nwfilter driver -----------------------------------------------------------
    def nwfilters(self) -> list[tuple[str, str]]:
        """(name, XML) of every filter defined in libvirt's nwfilter driver, sorted by name."""
        with _errors("cannot list libvirt's network filters"):
            filters = self.conn.listAllNWFilters(0)
            found = [(f.name(), f.XMLDesc(0)) for f in filters]
        return sorted(found, key=lambda item: (item[0].lower(), item[0]))
