"""The only module that imports ``libvirt`` (python3-libvirt): what the CLI asks of libvirtd.

Never used by the hook (libvirtd waits for the hook; calling back would deadlock). Every
libvirt failure becomes an :class:`NwfilterError` with libvirt's one-line message.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

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


# ------------------------------------------------------------------------------------------
# Events (the resident service)

RECONNECT_DELAYS = (1, 2, 5, 10, 30)  # seconds between connection attempts (the last repeats)
_event_loop_started = False


def _start_event_loop() -> None:
    """libvirt's default event loop, in a thread of its own (once per process)."""
    global _event_loop_started
    if _event_loop_started:
        return
    _require()
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _event_loop_started = True


class DomainEvents:
    """A connection that reports domain events, reconnecting with back-off when libvirtd goes.

    ``handler`` gets ``(kind, DomainRef, detail)`` from libvirt's event thread: kind
    ``device-added``/``device-removed`` (detail: the device alias) or ``metadata`` (detail: the
    namespace URI); keep it short (queue the work). ``on_state`` gets one line whenever the
    connection comes or goes."""

    def __init__(self, uri: str, handler: Callable[[str, DomainRef, str], None], on_state: Callable[[str], None]):
        self.uri = uri
        self.handler = handler
        self.on_state = on_state
        self.client: LibvirtClient | None = None
        self._closed = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Connect, and again after each loss, until ``stop`` is set."""
        _start_event_loop()
        attempt = 0
        while not stop.is_set():
            try:
                self._connect()
            except NwfilterError as error:
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                attempt += 1
                self.on_state(f"not connected to {self.uri} ({error}); next attempt in {delay} s")
                stop.wait(delay)
                continue
            attempt = 0
            self.on_state(f"connected to {self.uri}")
            while not stop.is_set() and not self._closed.wait(1):
                pass
            if not stop.is_set():
                self.on_state(f"connection to {self.uri} lost; reconnecting")
        if self.client is not None:
            self.client.close()

    def _connect(self) -> None:
        self._closed.clear()
        client = LibvirtClient(self.uri)
        conn = client.conn
        with _errors(f"cannot watch the events of {self.uri}"):
            conn.registerCloseCallback(lambda *_: self._closed.set(), None)
            conn.setKeepAlive(5, 3)
            for event, kind in ((libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, "device-added"),
                                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, "device-removed")):
                conn.domainEventRegisterAny(None, event, self._device(kind), None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._metadata, None)
        if self.client is not None:
            self.client.close()
        self.client = client

    def _device(self, kind: str):
        return lambda _conn, dom, alias, _opaque: self.handler(kind, LibvirtClient._ref(dom), alias)

    def _metadata(self, _conn, dom, kind, uri, _opaque) -> None:
        if kind == libvirt.VIR_DOMAIN_METADATA_ELEMENT:
            self.handler("metadata", LibvirtClient._ref(dom), uri or "")


def detach_live(client: LibvirtClient, dom: DomainRef, device_xml: str) -> None:
    """Detach a device from the running guest (its XML as the live definition shows it)."""
    with _errors(f"cannot detach the device from domain '{dom.name}'"):
        dom.handle.detachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
