"""``--profile``: where a process's time goes (nftables backend), written to OUT/profile/:
``-X importtime`` of binding-create and the hook, cProfile summaries, strace phases (Python vs
each tool it runs) and syscall counts."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from .documents import GUEST, HOOK_PORT, domain_xml, meas_mac, meas_port
from .measure import CLI, HOOK, VENV_PY, spawn
from .ours import Ours


def profile_state(ours: Ours, present: int, out: Path) -> None:
    """Import times, cProfile and strace phases of binding-create and the hook at ``present``."""
    file = ours.binding_file(meas_port(1), meas_mac(1), "10.2.0.2")
    if present == 0:
        run = ours.py("-X", "importtime", "-m", "libvirt_nwfilter", "binding-create", file).check("importtime")
        ours.cli("binding-delete", meas_port(1)).check("binding-delete")
        (out / "importtime-binding-create.txt").write_text(run.stderr)
        (out / "importtime-binding-create-top.txt").write_text(importtime_summary(run.stderr))
        run = ours.py("-X", "importtime", HOOK, GUEST, "start", "begin", "-",
                      stdin=domain_xml(HOOK_PORT)).check("importtime hook")
        ours.hook("stopped", "end", domain_xml(None)).check("hook stopped")
        (out / "importtime-hook-start.txt").write_text(run.stderr)
        (out / "importtime-hook-start-top.txt").write_text(importtime_summary(run.stderr))
    profile_cli(ours, out, f"binding-create-{present}", lambda i: ["binding-create", file],
                     after=lambda: ours.cli("binding-delete", meas_port(1)).check("binding-delete"))
    start_argv = [HOOK, GUEST, "start", "begin", "-"]
    stop_argv = [HOOK, GUEST, "stopped", "end", "-"]
    start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
    prof = out / f"hook-start-{present}.prof"
    ours.py("-m", "cProfile", "-o", prof, *start_argv, stdin=start_xml).check("cProfile hook start")
    (out / f"hook-start-{present}.txt").write_text(pstats_summary(prof))
    ours.hook("stopped", "end", stop_xml).check("hook stopped")
    strace_phases(ours, out, f"hook-start-{present}", [VENV_PY, *start_argv], start_xml)
    prof = out / f"hook-stopped-{present}.prof"
    ours.py("-m", "cProfile", "-o", prof, *stop_argv, stdin=stop_xml).check("cProfile hook stopped")
    (out / f"hook-stopped-{present}.txt").write_text(pstats_summary(prof))
    ours.hook("start", "begin", start_xml).check("hook start")
    strace_phases(ours, out, f"hook-stopped-{present}", [VENV_PY, *stop_argv], stop_xml)


def profile_cli(ours: Ours, out: Path, name: str, make_args: Callable[[int], list],
                after: Callable[[], object] | None = None) -> None:
    """cProfile, strace phases and strace -c of one CLI call; ``make_args(i)`` gives the
    arguments of the i-th of the three runs, ``after`` undoes a run."""
    prof = out / f"{name}.prof"
    ours.py("-m", "cProfile", "-o", prof, "-m", "libvirt_nwfilter", *make_args(0)).check(f"cProfile {name}")
    if after:
        after()
    (out / f"{name}.txt").write_text(pstats_summary(prof))
    strace_phases(ours, out, name, [CLI, *make_args(1)], b"")
    if after:
        after()
    if shutil.which("strace"):
        spawn(["strace", "-f", "-c", "-o", out / f"{name}-syscalls.txt", CLI, *make_args(2)], ours.env,
              ours.ns).check(f"strace -c {name}")
        if after:
            after()


def importtime_summary(text: str, top: int = 25) -> str:
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), int(m.group(1)), len(m.group(3)), m.group(4)))
    total = sum(r[1] for r in rows)
    own = [r for r in rows if r[3].startswith("libvirt_nwfilter")]
    lines = [f"all imports: {total / 1000:.1f} ms self time in {len(rows)} modules",
             f"libvirt_nwfilter modules: {sum(r[1] for r in own) / 1000:.1f} ms self time in {len(own)} modules",
             "", f"top {top} by cumulative time (us, self us, module):"]
    for cumulative, self_us, _, name in sorted(rows, reverse=True)[:top]:
        lines.append(f"{cumulative:9d} {self_us:9d}  {name}")
    lines += ["", f"top {top} by self time:"]
    for cumulative, self_us, _, name in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"{cumulative:9d} {self_us:9d}  {name}")
    return "\n".join(lines) + "\n"


def pstats_summary(prof: Path) -> str:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.strip_dirs()
    buf.write("=== by cumulative time ===\n")
    stats.sort_stats("cumulative").print_stats(45)
    buf.write("\n=== by own time ===\n")
    stats.sort_stats("tottime").print_stats(30)
    return buf.getvalue().replace(str(prof), prof.name)  # no path of the measuring machine


def strace_phases(ours: Ours, out: Path, name: str, argv: list, stdin: bytes) -> None:
    """Where the wall time of one process goes: its own Python time vs each tool it runs
    (strace -f of execve/exit_group; strace slows everything a little)."""
    if not shutil.which("strace"):
        return
    trace = out / f"{name}-strace.txt"
    spawn(["strace", "-f", "-ttt", "-e", "trace=execve,exit_group", "-o", trace, *argv], ours.env, ours.ns,
          stdin).check(f"strace {name}")
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    names: dict[str, str] = {}
    order: list[str] = []
    for line in trace.read_text().splitlines():
        m = re.match(r"(\d+)\s+([\d.]+)\s+(.*)", line)
        if not m:
            continue
        pid, ts, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.startswith("execve(") and rest.rstrip().endswith("= 0"):
            if pid not in starts:
                starts[pid] = ts
                order.append(pid)
            names[pid] = os.path.basename(rest.split('"')[1])
        elif rest.startswith("+++ exited") or rest.startswith("exit_group("):
            ends[pid] = ts
    if not order:
        return
    root = order[0]
    total = ends.get(root, 0) - starts[root]
    lines = [f"{name}: {total * 1000:.1f} ms under strace (root process {names.get(root)})"]
    tools = 0.0
    for pid in order[1:]:
        duration = ends.get(pid, starts[pid]) - starts[pid]
        tools += duration
        lines.append(f"  {names.get(pid)}: {duration * 1000:.1f} ms (starts at +{(starts[pid] - starts[root]) * 1000:.1f} ms)")
    lines.append(f"  in tools: {tools * 1000:.1f} ms; in Python (start-up, imports, work, waiting): "
                 f"{(total - tools) * 1000:.1f} ms")
    first_tool = starts[order[1]] - starts[root] if len(order) > 1 else None
    if first_tool is not None:
        lines.append(f"  Python before the first tool: {first_tool * 1000:.1f} ms")
    (out / f"{name}-phases.txt").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# The pre-population child (runs inside the namespace with the venv's Python)
