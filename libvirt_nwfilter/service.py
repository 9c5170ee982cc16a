"""Use cases: the only layer that sequences parse -> resolve -> compile -> apply -> state."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import BACKENDS, Config
from .errors import NwfilterError
from .model import Filter
from .store import FilterStore, Origin
from .xml import format_filter, parse_filter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterInfo:
    uuid: str
    name: str
    origin: Origin


class Service:
    """Entry point for the CLI and the hook; one instance per process."""

    def __init__(self, config: Config):
        if config.backend not in BACKENDS:
            raise NwfilterError(f"unknown backend '{config.backend}' (expected {' or '.join(BACKENDS)})")
        self.config = config
        self.store = FilterStore(config.confdir)

    # -- filters ------------------------------------------------------------------------
    def list_filters(self) -> list[FilterInfo]:
        return [FilterInfo(flt.uuid or "", name, self.store.origin(name)) for name, flt in self.store.all().items()]

    def dumpxml(self, name_or_uuid: str) -> str:
        return format_filter(self.store.find(name_or_uuid))

    def define(self, data: bytes, source: str) -> tuple[Filter, bool]:
        """Define a filter from XML; returns it and whether the stored definition changed."""
        flt = self.store.prepare(parse_filter(data, source))
        current = self.store.lookup(flt.name)
        changed = current is None or format_filter(current) != format_filter(flt)
        if changed:
            self.store.write(flt)
            log.info("filter '%s' defined", flt.name)
        return flt, changed

    def undefine(self, name_or_uuid: str) -> Filter:
        flt = self.store.remove(self.store.find(name_or_uuid).name)
        log.info("filter '%s' undefined", flt.name)
        return flt
