"""libvirt events: interface hot-plug and unplug, and changes of our metadata.

* device added: an interface whose MAC the guest's metadata names is bound on its tap; when
  its filter cannot be instantiated (unknown filter, missing variable, invalid entry, kernel
  refusal) the interface is detached again and the reason logged (libvirt's own driver refuses
  such an attach);
* device removed: the guest's bindings on ports it no longer has are removed;
* our metadata changed: the guest's bindings follow its live metadata, all or nothing
  (``hook.sync_domain``); a refused change is logged and leaves the old rules.

libvirt calls back from its event thread; the work is queued to one worker thread, so events
are handled in order, one at a time (each change also takes the host lock).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..config import Config
from ..errors import NwfilterError
from ..service import Service
from .status import Report

log = logging.getLogger(__name__)


class Events:
    def __init__(self, config: Config, report: Report, uri: str):
        self.config = config
        self.report = report
        self.uri = uri
        self.work: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.stream = None

    def start(self) -> None:
        from ..libvirt_client import DomainEvents

        self.stream = DomainEvents(self.uri, lambda *event: self.work.put(event), self._state)
        threading.Thread(target=self.stream.run, args=(self.stopping,), name="libvirt", daemon=True).start()
        threading.Thread(target=self._work, name="events", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.work.put(None)

    def _state(self, text: str) -> None:
        log.info("libvirt: %s", text)
        self.report.update(libvirt=text)

    def _work(self) -> None:
        while (event := self.work.get()) is not None:
            kind, dom, detail = event
            client = self.stream.client
            if client is None:
                continue
            try:
                what = HANDLERS[kind](Service(self.config), client, dom, detail)
            except NwfilterError as error:
                what = f"domain '{dom.name}': {kind} {detail}: {' '.join(str(error).split())}"
                log.error("%s", what)
            except Exception:  # noqa: BLE001 - the worker keeps working
                log.exception("domain '%s': %s %s: internal error", dom.name, kind, detail)
                continue
            if what:
                self.report.count("events", last_event={"time": time.time(), "what": what})


def device_added(service: Service, client, dom, alias: str) -> str | None:
    from ..domain import device_xml, metadata_entry, parse_domain
    from ..model import Binding

    xml = client.xml(dom)
    domain = parse_domain(xml, f"domain '{dom.name}'", metadata=False)
    found = [i for i in domain.interfaces if i.alias == alias]
    if not found:
        return None  # not a filterable interface
    interface = found[0]
    ref, problems = metadata_entry(xml, interface.mac, f"domain '{dom.name}'")
    if ref is None and not problems:
        log.debug("domain '%s': interface %s attached without a libvirt-nwfilter entry", dom.name, interface.mac)
        return None
    try:
        if problems:
            raise NwfilterError("; ".join(problems))
        if interface.native_filterref:
            log.info("domain '%s': interface %s has libvirt's own <filterref>: left to libvirt", dom.name,
                     interface.mac)
            return None
        if not interface.target:
            raise NwfilterError("the interface has no tap (<target dev>)")
        service.bind_owner([Binding(dom.name, dom.uuid, interface.target, interface.mac, ref)])
    except NwfilterError as error:
        return _refuse(client, dom, interface, device_xml(xml, alias), error)
    what = f"domain '{dom.name}': interface {interface.mac} attached: port {interface.target} filtered by '{ref.filter}'"
    log.info("%s", what)
    return what


def _refuse(client, dom, interface, device: str | None, error: NwfilterError) -> str:
    from ..libvirt_client import detach_live

    reason = " ".join(str(error).split())
    if device is None:
        what = f"domain '{dom.name}': interface {interface.mac} cannot be filtered ({reason}) and is gone already"
    else:
        detach_live(client, dom, device)
        what = (f"domain '{dom.name}': interface {interface.mac} ({interface.target}) detached again: its filter "
                f"cannot be instantiated: {reason}")
    log.error("%s", what)
    return what


def device_removed(service: Service, client, dom, alias: str) -> str | None:
    from ..domain import parse_domain

    domain = parse_domain(client.xml(dom), f"domain '{dom.name}'", metadata=False)
    taps = {i.target for i in domain.interfaces if i.target}
    gone = [port for port in service.state.owned_ports(dom.uuid) if port not in taps]
    if not gone:
        return None
    service.remove_bindings(gone)
    what = f"domain '{dom.name}': device {alias} detached: binding on {', '.join(gone)} removed"
    log.info("%s", what)
    return what


def metadata_changed(service: Service, client, dom, uri: str) -> str | None:
    from ..domain import NAMESPACE, parse_domain
    from ..hook import sync_domain

    if uri != NAMESPACE or not client.is_active(dom):
        return None
    try:
        bound, removed = sync_domain(service, parse_domain(client.xml(dom), f"domain '{dom.name}'"), repair=True)
    except NwfilterError as error:
        what = (f"domain '{dom.name}': metadata change refused, the rules stay as they were: "
                f"{' '.join(str(error).split())}")
        log.error("%s", what)
        return what
    what = (f"domain '{dom.name}': metadata changed: filtering {', '.join(bound) or 'no port'}"
            + (f"; binding on {', '.join(removed)} removed" if removed else ""))
    log.info("%s", what)
    return what


HANDLERS = {"device-added": device_added, "device-removed": device_removed, "metadata": metadata_changed}
