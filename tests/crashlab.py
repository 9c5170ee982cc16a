"""SIGKILL at every step of a command: enumerate the steps with strace, then kill at each.

A *step* is a file or kernel operation of the command's own process: ``rename`` (every atomic
file write: journal, binding record, index, stored filter), ``unlink`` (a record or the journal
removed) and ``vfork`` (python's subprocess spawning ``nft``/``*-restore``/``*-save``, i.e. a
kernel transaction or listing about to start). Killing the process when it ENTERS step N leaves
every earlier step done and step N and the later ones not done; so killing at each step in turn,
plus letting it finish, covers every gap between two consecutive operations. No test hook is in
the product: strace injects the signal (``-e inject=SYSCALL:signal=KILL:when=K``, where K counts
that syscall in the command's process only: no ``-f``, so a child already started, e.g. ``nft``
after its ``vfork``, finishes on its own as it would after a real SIGKILL).

:class:`KillLab` runs a command in a lab's host namespace, snapshots and restores the "before"
state (run directory, configuration directory and the kernel's rules through the tools' own
save/restore), enumerates the steps once (:meth:`steps`, with ``-f`` to name what each ``vfork``
ran) and kills at a chosen one (:meth:`run_killed`). ``PYTHONDONTWRITEBYTECODE`` keeps python
from writing ``.pyc`` files (a ``rename`` of its own).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import netlab
from bindings_helpers import REPO, Cli, kernel_snapshot

SYSCALLS = ("rename", "unlink", "vfork")
_LINE_RE = re.compile(r"^(\d+)\s+(?:<\.\.\. vfork (resumed)>\)|(rename|unlink|vfork|execve)\((.*?)(?:\)|"
                      r" <unfinished \.\.\.>))(?:\s+= (-?\d+).*)?$")
SAVE_TOOLS = (("ebtables-save", "ebtables-restore"), ("iptables-save", "iptables-restore"),
              ("ip6tables-save", "ip6tables-restore"))


@dataclass(frozen=True)
class Step:
    """The ``nth`` call of ``syscall`` by the command's process, and what it touched."""

    syscall: str
    nth: int
    what: str

    def __str__(self) -> str:
        return f"{self.syscall} #{self.nth} ({self.what})"


class KillLab:
    """A CLI (``cli``) whose commands can be killed at any step, and whose state can be put back."""

    def __init__(self, cli: Cli):
        self.cli = cli
        self.ns = cli.ns
        self.saved = cli.workdir / "saved"
        self.kernel: dict[str, str] = {}

    # -- running ---------------------------------------------------------------------------
    def argv(self, args: Sequence[str], hook: bool) -> list[str]:
        module = "libvirt_nwfilter.hook" if hook else "libvirt_nwfilter"
        return [self.cli.python, "-m", module, *map(str, args)]

    def env(self) -> dict[str, str]:
        env = self.cli.env()
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def run(self, args: Sequence[str], hook: bool = False, stdin: bytes | None = None,
            strace: Sequence[str] = ()) -> subprocess.CompletedProcess:
        argv = ["ip", "netns", "exec", self.ns, *strace, *self.argv(args, hook)]
        return subprocess.run(argv, input=stdin or b"", capture_output=True, cwd=REPO, env=self.env(),
                              timeout=self.cli.timeout)

    def steps(self, args: Sequence[str], hook: bool = False, stdin: bytes | None = None) -> list[Step]:
        """Run the command to its end under strace and list its steps in order."""
        trace = self.cli.workdir / "strace.out"
        done = self.run(args, hook, stdin, ["strace", "-f", "-qq", "-o", str(trace), "-e", "signal=none",
                                            "-e", "trace=" + ",".join((*SYSCALLS, "execve"))])
        assert done.returncode == 0, f"{args}: {done.stderr.decode()}"
        return parse_trace(trace.read_text())

    def run_killed(self, args: Sequence[str], step: Step, hook: bool = False,
                   stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """Run the command and SIGKILL it as it enters ``step``."""
        return self.run(args, hook, stdin, ["strace", "-qq", "-o", "/dev/null", "-e", f"trace={step.syscall}",
                                            "-e", f"inject={step.syscall}:signal=KILL:when={step.nth}"])

    # -- the state before the command ------------------------------------------------------
    def save(self) -> None:
        """Remember the run and configuration directories and our rules in the kernel."""
        shutil.rmtree(self.saved, ignore_errors=True)
        for name in ("run", "conf"):
            shutil.copytree(self.cli.workdir / name, self.saved / name, symlinks=True)
        if self.cli.backend == "nftables":
            self.kernel = {"nft": netlab.run_in(self.ns, ["nft", "list", "ruleset"]).stdout}
        else:
            self.kernel = {save: netlab.run_in(self.ns, [save]).stdout for save, _ in SAVE_TOOLS}

    def restore(self) -> None:
        """Put the saved state back (the kernel with the tools' own restore, everything replaced)."""
        for name in ("run", "conf"):
            shutil.rmtree(self.cli.workdir / name)
            shutil.copytree(self.saved / name, self.cli.workdir / name, symlinks=True)
        if self.cli.backend == "nftables":
            netlab.run_in(self.ns, ["nft", "-f", "-"], input="flush ruleset\n" + self.kernel["nft"])
        else:
            netlab.run_in(self.ns, ["nft", "flush", "ruleset"])
            for save, restore in SAVE_TOOLS:
                netlab.run_in(self.ns, [restore], input=self.kernel[save])

    def snapshot(self) -> dict[str, str]:
        return kernel_snapshot(self.ns)

    @property
    def journal(self) -> Path:
        return self.cli.rundir / "journal.json"


_GENERATION_RE = re.compile(r"\b(I|O|FI|FO|HI|MO|CL)-\d+/")


def normalized(snapshot: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A kernel snapshot with nftables generation numbers blanked: two snapshots that compare
    equal hold the same rules in the same order (the same verdicts for every frame)."""
    return tuple(sorted((key, _GENERATION_RE.sub(r"\1-G/", text)) for key, text in snapshot.items()))


def side_by_side(lab: netlab.Lab, tmp_path: Path, run: Callable[[netlab.Lab, Cli], str]) -> None:
    """``run(lab, cli)`` for both backends at once (nftables in ``lab``, ebiptables in a second
    lab), each with its own directories under ``tmp_path``; their reports are printed."""
    with netlab.Lab() as second, ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(run, where, Cli(where.host_ns, tmp_path / backend, backend))
                for backend, where in (("nftables", lab), ("ebiptables", second))]
        reports = [job.result() for job in runs]
    print("\n" + "\n".join(reports))


def parse_trace(text: str) -> list[Step]:
    """The steps of the traced command's own process (the first pid in the trace), each
    ``vfork`` named by what its child executed."""
    main, steps, counts = None, [], {}
    child_of: dict[int, int] = {}  # child pid -> index of the vfork step that made it
    executed: dict[int, str] = {}  # pid -> the program it executed
    for line in text.splitlines():
        found = _LINE_RE.match(line)
        if found is None:
            continue
        pid, resumed, call, rest, result = found.groups()
        pid = int(pid)
        main = pid if main is None else main
        if call == "execve":
            executed.setdefault(pid, os.path.basename(rest.split(",")[0].strip('"')))
        elif pid == main and resumed:
            child_of[int(result)] = max(i for i, step in enumerate(steps) if step.syscall == "vfork")
        elif pid == main:
            counts[call] = counts.get(call, 0) + 1
            target = rest.split(", ")[-1].strip('"') if rest else ""
            steps.append(Step(call, counts[call], os.path.basename(target) or "spawn"))
            if call == "vfork" and result:
                child_of[int(result)] = len(steps) - 1
    for pid, index in child_of.items():
        step = steps[index]
        steps[index] = Step(step.syscall, step.nth, f"spawn {executed.get(pid, '?')}")
    return steps
