"""Applied bindings under the run directory, their index, and the host-wide lock.

One JSON file per port (``bindings/<port>.json``) holds the binding XML, the backend and its
record of what is in the kernel, and a hash of the applied ruleset. Files are written only after
the kernel accepted a change, atomically, so a crash leaves the old or the new file.

Every file is validated when read: a record that cannot be used (a symbolic link, empty,
truncated, not the expected shape, a binding XML that does not parse, another port's binding)
is a :class:`RecordError` naming the file, the problem and the repair; it is never skipped
silently, and callers never treat it as "no binding".

``index.json`` maps each port to its owner UUID, mark id, backend and learning mode (ports that
learn their address), so that a change or a guest's teardown reads only the files it needs. It
is kept a superset of the files: entries are added before a record is written and removed after
one is deleted, so a crash in between leaves an entry without a file (harmless), never a file
without an entry (``stopped`` would miss it). An
index that is missing or damaged is rebuilt from the files under the lock (and computed from
them, without writing, by readers that do not hold it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import BACKENDS
from .errors import NwfilterError
from .files import FileProblem, read_json, write_atomically
from .lock import host_lock
from .model import Binding
from .syntax import PORT_NAME_RE
from .bindingxml import format_binding, parse_binding

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 4 << 20
MAX_INDEX_BYTES = 64 << 20
INDEX = "index.json"


@dataclass(frozen=True)
class AppliedBinding:
    """What is instantiated on one port."""

    binding: Binding
    backend: str
    record: dict[str, Any]
    ruleset_hash: str  # hash of the compiled ruleset: changes when the filters change


class RecordError(NwfilterError):
    """A binding record that cannot be used: the file, the problem and the repair."""

    def __init__(self, path: Path, port: str, problem: str):
        self.path, self.port, self.problem = path, port, problem
        if valid_port(port):
            text = f"binding record {path} {problem}; its port's rules are left as they are; {repair([port])}"
        else:
            text = f"{path} {problem}; remove the file"
        super().__init__(text)


def repair(ports: list[str]) -> str:
    """The repair of unreadable records of ``ports``."""
    return (f"repair: 'libvirt-nwfilter binding-delete --force {' '.join(ports)}' (removes the rules and the "
            "record) or, for a running guest's port, 'libvirt-nwfilter reapply GUEST' (binds it again from the "
            "guest)")


def valid_port(port: str) -> bool:
    return bool(PORT_NAME_RE.match(port)) and port not in (".", "..")


class State:
    """The run directory: binding records, their index and the lock."""

    def __init__(self, rundir: Path):
        self.rundir = Path(rundir)
        self.bindings_dir = self.rundir / "bindings"
        self.partial_dir = self.bindings_dir / ".partial"  # records being written
        self._locked = False
        self._index: dict[str, dict[str, Any]] | None = None  # read under the lock (not to be changed)
        self.index_problem: str | None = None  # what was wrong with the index this run

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the host-wide lock (waiting at most ``timeout`` s) for the duration of the block."""
        try:
            self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise NwfilterError(f"cannot create the run directory {self.rundir}: {error.strerror}") from None
        with host_lock(self.rundir / "lock", timeout):
            self._locked, self._index = True, None
            try:
                self._remove_partial_writes()
                yield
            finally:
                self._locked, self._index = False, None

    def _remove_partial_writes(self) -> None:
        """Temporary files of writes a killed process left: of the files written under the lock
        only (nobody else writes those now); the service's report and knowledge files are
        written without it, at any time. Records are written through ``bindings/.partial`` (not
        to list a thousand records under every lock); versions before it wrote them beside the
        records, looked at until ``.partial`` exists."""
        places = [(self.rundir, _partial_run_file), (self.partial_dir, _partial_record)]
        if not self.partial_dir.is_dir():
            places.append((self.bindings_dir, _partial_record))
        for directory, partial in places:
            try:
                with os.scandir(directory) as entries:
                    leftovers = [entry.path for entry in entries if partial(entry.name)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for leftover in leftovers:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    # -- records --------------------------------------------------------------------------
    def path(self, port: str) -> Path:
        if not valid_port(port):
            raise NwfilterError(f"'{port}' is not a valid port (interface) name")
        return self.bindings_dir / f"{port}.json"

    def get(self, port: str) -> AppliedBinding | None:
        """The record of ``port``; None when there is none, RecordError when it is unusable."""
        return self._read(self.path(port), port)

    def _read(self, path: Path, port: str) -> AppliedBinding | None:
        """A usable record is kept per process (:class:`_KeptFiles`)."""
        identity, kept = _kept_files.get(path)
        if kept is not None:
            return kept
        try:
            data = read_json(path, MAX_RECORD_BYTES)
        except FileProblem as problem:
            raise RecordError(path, port, str(problem)) from None
        if data is None:
            return None
        applied = _applied_from(data, path, port)
        _kept_files.keep(path, identity, applied)
        return applied

    def files(self) -> list[Path]:
        try:
            with os.scandir(self.bindings_dir) as entries:
                names = [e.name for e in entries if e.name.endswith(".json") and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [self.bindings_dir / name for name in sorted(names, key=lambda n: (n[:-5].lower(), n[:-5]))]

    def scan(self) -> tuple[list[AppliedBinding], list[RecordError]]:
        """Every record: the usable ones, and one RecordError per file that is not."""
        found, damaged = [], []
        for path in self.files():
            try:
                if not valid_port(path.stem):
                    raise RecordError(path, path.stem, "is not named after a valid port")
                applied = self._read(path, path.stem)
            except RecordError as error:
                damaged.append(error)
                continue
            if applied is not None:
                found.append(applied)
        return found, damaged

    def all(self) -> list[AppliedBinding]:
        """The usable records; each unusable one is logged as a warning."""
        found, damaged = self.scan()
        for error in damaged:
            log.warning("%s", error)
        return found

    def write(self, applied: Iterable[AppliedBinding], removed: Iterable[str] = ()) -> None:
        """Record the bindings of ``applied`` and forget the ports ``removed``, keeping the index
        a superset of the files at every instant."""
        applied, removed = list(applied), set(removed)
        index = self.index()
        changed = {port: entry for port, entry in ((a.binding.portdev, _index_entry(a)) for a in applied)
                   if index.get(port) != entry}
        wider = {**index, **changed} if changed else index
        if changed:
            self._write_index(wider)
        if applied:
            self._mkdir(self.bindings_dir)
        for item in applied:
            data = {"binding": format_binding(item.binding), "backend": item.backend,
                    "record": item.record, "hash": item.ruleset_hash}
            write_atomically(self.path(item.binding.portdev), json.dumps(data, sort_keys=True) + "\n", mode=0o600,
                             scratch=self.partial_dir)
        for port in sorted(removed):
            self.forget(port)
        if any(port in wider for port in removed):
            self._write_index({port: entry for port, entry in wider.items() if port not in removed})

    def forget(self, port: str) -> None:
        """Delete the record file of ``port`` (whatever it holds); the index entry stays."""
        path = self.path(port)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise NwfilterError(f"cannot remove {path}: {error.strerror}") from None

    # -- the index: owner, mark id and backend per port ---------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.rundir / INDEX

    def index(self) -> dict[str, dict[str, Any]]:
        """Port -> {"owner": owner UUID, "id": mark id or None, "backend": name}. A missing or damaged index is
        rebuilt from the files (written back only under the lock). Under the lock it is read once
        (nobody else changes it then); callers do not change what they get."""
        if self._index is not None:
            return self._index
        problem = self._index_problem()
        if isinstance(problem, dict) and self._locked:
            self._index = problem
        if problem is None or isinstance(problem, dict):
            return problem or {}
        if self.index_problem is None:
            self.index_problem = problem
            log.warning("%s %s; %s from the binding files", self.index_path, problem,
                        "rebuilt" if self._locked else "read")
        index = {a.binding.portdev: _index_entry(a) for a in self.scan()[0]}
        if self._locked:
            self._write_index(index)
        return index

    def _index_problem(self) -> dict[str, dict[str, Any]] | str | None:
        """The valid index, or what is wrong with it (None: absent with no bindings). A valid
        index is kept per process (:class:`_KeptFiles`)."""
        identity, kept = _kept_files.get(self.index_path)
        if kept is not None:
            return kept
        try:
            data = read_json(self.index_path, MAX_INDEX_BYTES)
        except FileProblem as problem:
            return str(problem)
        if data is None:
            return "is missing" if self.files() else None
        if not _valid_index(data):
            return "does not have the expected shape"
        _kept_files.keep(self.index_path, identity, data)
        return data

    def rebuild_index(self) -> dict[str, dict[str, Any]]:
        """The index made anew from the files (entries of unreadable records are kept)."""
        records, damaged = self.scan()
        old = self._index_problem()
        kept = {e.port: old[e.port] for e in damaged if isinstance(old, dict) and e.port in old}
        index = {**kept, **{a.binding.portdev: _index_entry(a) for a in records}}
        self._write_index(index)
        return index

    def index_matches(self, records: Iterable[AppliedBinding], damaged: Iterable[RecordError]) -> bool:
        """Whether the index holds exactly the entries of ``records`` (and perhaps entries of
        the unreadable records' ports)."""
        index = self.index()
        unreadable = {e.port for e in damaged}
        return {p: e for p, e in index.items() if p not in unreadable} == {a.binding.portdev: _index_entry(a)
                                                                           for a in records}

    def ids(self) -> dict[str, int]:
        """Port -> mark id of every binding that has one."""
        return {port: int(entry["id"]) for port, entry in self.index().items() if entry.get("id") is not None}

    def backends(self) -> set[str]:
        """The backends that made the recorded bindings."""
        return {entry["backend"] for entry in self.index().values()}

    def learning_ports(self) -> dict[str, str]:
        """Port -> learning mode of every binding that learns its address."""
        return {port: entry["learning"] for port, entry in self.index().items() if entry.get("learning")}

    def owned_ports(self, owner_uuid: str) -> list[str]:
        return sorted(port for port, entry in self.index().items() if entry.get("owner") == owner_uuid)

    def spell_index(self) -> None:
        """Spell the index's text ahead (the request server's warm-up): a forked process that
        then rewrites it spells only the entries it changed (:class:`_IndexText`)."""
        _index_text.spell(self.index())

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        self._mkdir(self.rundir)
        write_atomically(self.index_path, _index_text.spell(index), mode=0o600)
        if self._locked:
            self._index = index

    @staticmethod
    def _mkdir(path: Path) -> None:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise NwfilterError(f"cannot create {path}: {error.strerror}") from None


def _applied_from(data: object, path: Path, port: str) -> AppliedBinding:
    """A record's content, validated (RecordError naming what is wrong)."""
    if not isinstance(data, dict):
        raise RecordError(path, port, "does not hold a JSON object")
    for key, kind in (("binding", str), ("backend", str), ("record", dict), ("hash", str)):
        if key not in data:
            raise RecordError(path, port, f"has no '{key}' field")
        if not isinstance(data[key], kind):
            raise RecordError(path, port, f"has a '{key}' field that is not a {kind.__name__}")
    if data["backend"] not in BACKENDS:
        raise RecordError(path, port, f"names an unknown backend '{data['backend']}'")
    try:
        binding = _parsed_binding(data["binding"], str(path))
    except NwfilterError as error:
        raise RecordError(path, port, f"holds a binding that does not parse ({' '.join(str(error).split())})") from None
    if binding.portdev != port:
        raise RecordError(path, port, f"holds the binding of port '{binding.portdev}'")
    return AppliedBinding(binding, data["backend"], data["record"], data["hash"])


@lru_cache(maxsize=1 << 14)
def _parsed_binding(text: str, source: str) -> Binding:
    """A record's binding (records are read more than once by one command; XML parsing is what
    reading one costs)."""
    return parse_binding(text, source, stored=True)


class _KeptFiles:
    """What valid files of the run directory hold (the index, records), kept per process with
    the identity of each file (inode, size, times: they change whenever it is replaced or
    written) and read again only when the file changed; callers do not change what they get."""

    MOST = 1 << 16  # files kept before the memory starts anew

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[int, ...], Any]] = {}

    def get(self, path: Path) -> tuple[tuple[int, ...] | None, Any]:
        """The file's identity now (None: absent), and what it held if kept with that identity."""
        try:
            info = os.lstat(path)
        except OSError:
            return None, None
        identity = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        kept = self._kept.get(str(path))
        return identity, kept[1] if kept is not None and kept[0] == identity else None

    def keep(self, path: Path, identity: tuple[int, ...] | None, content: Any) -> None:
        """Keep ``content``, read from ``path`` after :meth:`get` gave ``identity``."""
        if identity is None:
            return
        if len(self._kept) >= self.MOST:
            self._kept.clear()
        self._kept[str(path)] = (identity, content)


_kept_files = _KeptFiles()


class _IndexText:
    """The index file's text: one line per port, each kept with the entry object it spells
    (entries are never changed in place: a changed entry is a new object), so that rewriting the
    index after a change of a few ports spells only those (~1 ms for 1000 entries otherwise)."""

    def __init__(self) -> None:
        self._lines: dict[str, tuple[dict[str, Any], str]] = {}

    def spell(self, index: dict[str, dict[str, Any]]) -> str:
        lines = {}
        for port in sorted(index):
            entry = index[port]
            kept = self._lines.get(port)
            if kept is None or kept[0] is not entry:
                kept = (entry, f"{json.dumps(port)}: {json.dumps(entry, sort_keys=True)}")
            lines[port] = kept
        self._lines = lines
        return "{\n" + ",\n".join(line for _, line in lines.values()) + "\n}\n"


_index_text = _IndexText()


def _partial_run_file(name: str) -> bool:
    """A temporary file of an index or journal write (``.index.json.XXXX``)."""
    return name.startswith((f".{INDEX}.", ".journal.json."))


def _partial_record(name: str) -> bool:
    """A temporary file of a binding record write (``.PORT.json.XXXX``)."""
    return name.startswith(".") and ".json." in name


def _valid_index(data: object) -> bool:
    if not isinstance(data, dict):
        return False
    for port, entry in data.items():
        if (not valid_port(port) or not isinstance(entry, dict) or not isinstance(entry.get("owner"), str)
                or entry.get("backend") not in BACKENDS):
            return False
        pid = entry.get("id")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
            return False
        if entry.get("learning") not in (None, "any", "dhcp"):
            return False
    return True


def _index_entry(applied: AppliedBinding) -> dict[str, Any]:
    entry = {"owner": applied.binding.owner_uuid, "id": applied.record.get("id"), "backend": applied.backend}
    if applied.binding.learning is not None:
        entry["learning"] = applied.binding.learning.mode
    return entry
