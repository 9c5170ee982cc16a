"""The filter store: user filters under ``$CONFDIR/filters`` over the shipped built-in filters.

Two sets are built in: libvirt's 24 filters (``filters/``, exactly as libvirt ships them) and
ours (``own_filters/``: IPv6 first-hop security, README "IPv6 first-hop security"); their names
never overlap, and ``list`` tells them apart.

Lookups read only the files they need (the hook must stay fast); defining checks libvirt's
conflict rules and loops against every defined filter and writes atomically.
"""

from __future__ import annotations

import enum
import logging
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .errors import ConflictError, NwfilterError, UnknownFilterError, ValidationError
from .files import write_atomically
from .model import Filter
from .syntax import FILTER_NAME_RE
from .xml import MAX_DOCUMENT_BYTES, format_filter, parse_filter

log = logging.getLogger(__name__)

# Built-in filters carry no UUID in their files; they get a stable one derived from the name.
_BUILTIN_UUID_NAMESPACE = "6f2c4c1e-3d55-4c8e-9a51-5b0f0b7d1a24"
FILE_HEADER = "<!-- managed by libvirt-nwfilter: change it with 'libvirt-nwfilter edit {name}' -->\n"


class Origin(enum.Enum):
    BUILTIN = "builtin"  # one of libvirt's filters
    OWN = "builtin (libvirt-nwfilter)"  # one of ours
    USER = "user"
    OVERRIDE = "user (overrides builtin)"

    @property
    def shipped(self) -> bool:
        """Built in and not overridden (a user definition does not exist)."""
        return self in (Origin.BUILTIN, Origin.OWN)


def builtin_dir() -> Path:
    """libvirt's filters."""
    return Path(__file__).resolve().parent / "filters"


def own_dir() -> Path:
    """The filters of ours that are built in."""
    return Path(__file__).resolve().parent / "own_filters"


class FilterStore:
    """Filters by name, user definitions taking precedence over built-in ones."""

    def __init__(self, confdir: Path):
        self.user_dir = Path(confdir) / "filters"
        self.builtin_dir = builtin_dir()
        self.own_dir = own_dir()
        self._cache: dict[str, Filter | None] = {}

    # -- reading ------------------------------------------------------------------------
    def _user_path(self, name: str) -> Path:
        return self.user_dir / f"{name}.xml"

    def _load(self, name: str) -> Filter | None:
        if not FILTER_NAME_RE.match(name):
            return None
        for path in (self._user_path(name), *self._shipped_paths(name)):
            if path.is_file():
                return self._read(path, name)
        return None

    def _shipped_paths(self, name: str) -> tuple[Path, Path]:
        return self.builtin_dir / f"{name}.xml", self.own_dir / f"{name}.xml"

    def _read(self, path: Path, name: str) -> Filter:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise NwfilterError(f"{path}: cannot read: {error.strerror}") from None
        flt = _parsed(data, str(path))
        if flt.name != name:
            raise NwfilterError(f"{path}: file name does not match filter name '{flt.name}'")
        return flt

    def source(self, name: str) -> Filter | None:
        """The filter called ``name`` as its file says (a built-in one without its UUID), or
        None: what the resolver needs, without the cost of generating UUIDs."""
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def lookup(self, name: str) -> Filter | None:
        """The filter called ``name`` (built-in ones with their stable UUID), or None."""
        flt = self.source(name)
        if flt is not None and flt.uuid is None:
            import uuid  # only here: the module costs the hook's start-up time

            flt = _with_uuid(flt, str(uuid.uuid5(uuid.UUID(_BUILTIN_UUID_NAMESPACE), name)))
        return flt

    def get(self, name: str) -> Filter:
        flt = self.lookup(name)
        if flt is None:
            raise UnknownFilterError(f"no filter named '{name}'")
        return flt

    def names(self) -> list[str]:
        found = {p.stem for p in self.builtin_dir.glob("*.xml")} | {p.stem for p in self.own_dir.glob("*.xml")}
        if self.user_dir.is_dir():
            found |= {p.stem for p in self.user_dir.glob("*.xml") if FILTER_NAME_RE.match(p.stem)}
        return sorted(found, key=lambda n: (n.lower(), n))

    def origin(self, name: str) -> Origin:
        user = self._user_path(name).is_file()
        libvirt, own = (path.is_file() for path in self._shipped_paths(name))
        if user:
            return Origin.OVERRIDE if libvirt or own else Origin.USER
        return Origin.OWN if own else Origin.BUILTIN

    def all(self) -> dict[str, Filter]:
        """Every readable filter; unreadable user files are logged and skipped."""
        filters = {}
        for name in self.names():
            try:
                flt = self.lookup(name)
            except (ValidationError, NwfilterError) as error:
                log.warning("skipping unreadable filter '%s': %s", name, error)
                continue
            if flt is not None:
                filters[name] = flt
        return filters

    def find(self, name_or_uuid: str) -> Filter:
        """Look up by name, or by UUID (a 36-character argument is tried as a UUID first)."""
        if len(name_or_uuid) == 36:
            for flt in self.all().values():
                if flt.uuid == name_or_uuid.lower():
                    return flt
        return self.get(name_or_uuid)

    # -- writing ------------------------------------------------------------------------
    def prepare(self, flt: Filter) -> Filter:
        """The definition as it will be stored (UUID settled); ConflictError on libvirt's rules."""
        existing = self.all()
        current = existing.get(flt.name)
        if flt.uuid is None:
            import uuid

            flt = _with_uuid(flt, current.uuid if current else str(uuid.uuid4()))
        elif current is not None and current.uuid != flt.uuid:
            raise ConflictError(f"filter '{flt.name}' already exists with uuid {current.uuid}")
        for other in existing.values():
            if other.uuid == flt.uuid and other.name != flt.name:
                raise ConflictError(f"filter with same UUID but different name ('{other.name}') already exists")
        existing[flt.name] = flt
        _check_loops(flt.name, existing)
        size = len(_file_text(flt).encode())
        if size > MAX_DOCUMENT_BYTES:  # it could not be read back
            raise ValidationError([f"filter '{flt.name}' is too large: its stored form has {size} bytes "
                                   f"(at most {MAX_DOCUMENT_BYTES})"])
        return flt

    def write(self, flt: Filter) -> None:
        write_atomically(self._user_path(flt.name), _file_text(flt))
        self._cache[flt.name] = flt

    def remove(self, name: str) -> Filter:
        """Delete the user definition of ``name`` (a built-in one cannot be removed)."""
        flt = self.get(name)
        path = self._user_path(name)
        if not path.is_file():
            raise ConflictError(f"filter '{name}' is built in and cannot be undefined "
                                "(define a filter of the same name to override it)")
        path.unlink()
        self._cache.pop(name, None)
        return flt


@lru_cache(maxsize=1024)
def _parsed(data: bytes, source: str) -> Filter:
    """A filter file's content, parsed once per process (and once for the processes the resident
    service forks): the same content gives the same :class:`Filter` object."""
    return parse_filter(data, source)


def _file_text(flt: Filter) -> str:
    return FILE_HEADER.format(name=flt.name) + format_filter(flt)


def _with_uuid(flt: Filter, uuid: str) -> Filter:
    return Filter(flt.name, flt.chain, flt.priority, uuid, flt.entries)


def _check_loops(start: str, filters: dict[str, Filter]) -> None:
    """ConflictError if ``start`` can reach itself through references (undefined ones skipped).

    Each filter is visited once: walking every path would take exponential time on a tree of
    shared sub-filters (diamonds).
    """
    parent: dict[str, str] = {}
    stack = [start]
    while stack:
        name = stack.pop()
        flt = filters.get(name)
        for ref in flt.references() if flt else ():
            if ref == start:
                raise ConflictError(f"filter '{start}' would introduce a loop: {_loop_path(parent, start, name)}")
            if ref not in parent:
                parent[ref] = name
                stack.append(ref)


def _loop_path(parent: dict[str, str], start: str, last: str) -> str:
    names = [last]
    while names[-1] != start:
        names.append(parent[names[-1]])
    return " -> ".join(reversed(names)) + f" -> {start}"


def referencing(filters: dict[str, Filter], roots: Iterable[str], target: str) -> bool:
    """True if any filter in ``roots`` is ``target`` or reaches it through references."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name == target:
            return True
        if name in seen:
            continue
        seen.add(name)
        flt = filters.get(name)
        stack.extend(flt.references() if flt else ())
    return False
