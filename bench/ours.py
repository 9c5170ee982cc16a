"""Our engine in the lab: one configuration of the CLI and the hook, run as libvirtd would."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .documents import FILTER, GUEST, binding_xml
from .measure import CLI, HOOK, VENV_PY, Run, base_env, spawn


class Ours:
    """One configuration (conf dir, run dir on tmpfs, backend) of our CLI and hook in the lab."""

    def __init__(self, ns: str, work: Path, tmpfs: Path, backend: str, tag: str):
        """In namespace ``ns``, with its files under ``work`` and its run directory on ``tmpfs``."""
        self.ns, self.backend = ns, backend
        self.conf = work / f"{backend}-{tag}-conf"
        self.rundir = tmpfs / f"{backend}-{tag}-run"
        self.files = work / f"{backend}-{tag}-files"
        for d in (self.conf, self.files):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**base_env(), "LIBVIRT_NWFILTER_CONFDIR": str(self.conf),
                    "LIBVIRT_NWFILTER_RUNDIR": str(self.rundir), "LIBVIRT_NWFILTER_BACKEND": backend}

    def cli(self, *args: object, stdin: bytes = b"", prefix: Sequence[object] = (), timeout: float = 900) -> Run:
        argv = [*prefix, CLI, *args] if prefix else [CLI, *args]
        return spawn(argv, self.env, self.ns, stdin, timeout)

    def py(self, *args: object, stdin: bytes = b"", timeout: float = 900) -> Run:
        return spawn([VENV_PY, *args], self.env, self.ns, stdin, timeout)

    def hook(self, operation: str, subop: str, stdin: bytes) -> Run:
        return spawn([VENV_PY, HOOK, GUEST, operation, subop, "-"], self.env, self.ns, stdin)

    def binding_file(self, port: str, mac: str, ip: str, filter_name: str = FILTER) -> Path:
        path = self.files / f"binding-{port}-{filter_name}.xml"
        if not path.exists():
            path.write_text(binding_xml(port, mac, ip, filter_name))
        return path

    def state_has(self, port: str) -> bool | None:
        """Whether our state records a binding on ``port`` (None: layout unknown)."""
        bindings = self.rundir / "bindings"
        if not bindings.is_dir():
            return None
        return any(bindings.glob(f"{port}.*"))

    def populate(self, start: int, end: int, filter_name: str) -> Run:
        """Bind ports ``start``..``end`` to ``filter_name`` in one batch (bench/populate.py)."""
        return self.py("-m", "bench.populate", self.conf, self.rundir, self.backend, start, end, filter_name,
                       timeout=1800).check(f"populate {start}..{end}")
