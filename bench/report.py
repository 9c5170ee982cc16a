"""The report: goals, the table, the plot, results.json; and the same again from a results.json
(``--replot``)."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from .measure import Measurement, Results, fmt_rss, fmt_time

# Goals of the issue (nftables backend).
GOAL_LIBVIRT_RATIO = 20.0
GOAL_SCALING = 1.5
GOAL_REAPPLY_S = 3.0
GOAL_REDEFINE_S = 3.0
GOAL_HOOK_START_S = 0.100
# Goals of the resident service (issue 10, nftables backend, fresh client processes, wall).
GOAL_SERVICE_REQUEST_S = 0.040
GOAL_SERVICE_SCALING = 1.3
GOAL_SERVICE_LIBVIRT_RATIO = 25.0
GOAL_SERVICE_RECONNECT_S = 0.030
GOAL_SERVICE_FLUSH_S = 2.0
GOAL_SERVICE_BULK_S = 1.5


def goals(results: Results) -> list[dict]:
    goals = []
    nft = "nftables"

    def goal(name: str, target: str, measured: str | None, met: bool | None, detail: str = "") -> None:
        goals.append({"goal": name, "target": target, "measured": measured or "not measured",
                      "met": met, "detail": detail})

    for size in (0, 100):
        lv, ours = results.find("binding-create", "libvirt", None, size), results.find("binding-create", "ours", nft, size)
        if size == 0 or lv:
            ratio = lv.median / ours.median if lv and ours else None
            goal(f"per binding vs libvirt's engine ({size} present)", f">= {GOAL_LIBVIRT_RATIO:.0f}x faster",
                 f"{ratio:.1f}x ({fmt_time(lv.median)} / {fmt_time(ours.median)})" if ratio else None,
                 ratio >= GOAL_LIBVIRT_RATIO if ratio else None)
    base, top = results.find("binding-create", "ours", nft, 0), results.find("binding-create", "ours", nft, 1000)
    ratio = top.median / base.median if base and top else None
    goal("per binding with 1000 present vs none", f"<= {GOAL_SCALING}x",
         f"{ratio:.2f}x ({fmt_time(top.median)} / {fmt_time(base.median)})" if ratio else None,
         ratio <= GOAL_SCALING if ratio else None)
    m = results.find("reapply", "ours", nft, 1000)
    goal("reapply of 1000", f"<= {GOAL_REAPPLY_S:.0f} s", fmt_time(m.median) if m else None,
         m.median <= GOAL_REAPPLY_S if m else None)
    m = results.find("redefine", "ours", nft, 1000)
    goal("update of a filter used by 1000", f"<= {GOAL_REDEFINE_S:.0f} s", fmt_time(m.median) if m else None,
         m.median <= GOAL_REDEFINE_S if m else None)
    for size in sorted({0, results.max_present}):
        m = results.find("hook-start", "ours", nft, size)
        goal(f"hook start, wall ({size} present)", f"<= {GOAL_HOOK_START_S * 1000:.0f} ms",
             fmt_time(m.median) if m else None, m.median <= GOAL_HOOK_START_S if m else None)
    service_goals(results, goal)
    return goals


def _figure(m: Measurement | None) -> str | None:
    """Median (minimum) wall, and the CPU of the whole process tree likewise."""
    if m is None:
        return None
    cpu = f"; CPU {fmt_time(statistics.median(m.cpu))} ({fmt_time(min(m.cpu))})" if m.cpu else ""
    return f"{fmt_time(m.median)} (min {fmt_time(min(m.walls))}){cpu}"


def service_goals(results: Results, goal) -> None:
    """Issue 10: the requests through the resident service, each given to ``goal``."""
    nft, top = "nftables", results.max_present
    for key, what in (("hook-start", "hook start"), ("binding-create", "binding-create")):
        zero, full = results.find(key, "service", nft, 0), results.find(key, "service", nft, top)
        goal(f"{what} through the service, 0 present", f"<= {GOAL_SERVICE_REQUEST_S * 1000:.0f} ms",
             _figure(zero), zero.median <= GOAL_SERVICE_REQUEST_S if zero else None)
        ratio = full.median / zero.median if zero and full else None
        goal(f"{what} through the service, {top} present vs 0", f"<= {GOAL_SERVICE_SCALING}x",
             f"{ratio:.2f}x ({_figure(full)})" if ratio else None,
             ratio <= GOAL_SERVICE_SCALING if ratio else None)
    lv, ours = results.find("binding-create", "libvirt", None, 0), results.find("binding-create", "service", nft, 0)
    ratio = lv.median / ours.median if lv and ours else None
    goal("binding-create through the service vs libvirt's engine (same run)", f">= {GOAL_SERVICE_LIBVIRT_RATIO:.0f}x faster",
         f"{ratio:.1f}x ({fmt_time(lv.median)} / {fmt_time(ours.median)})" if ratio else None,
         ratio >= GOAL_SERVICE_LIBVIRT_RATIO if ratio else None)
    for key, what, target in (("hook-reconnect", f"hook reconnect of an intact guest, {top} present",
                               GOAL_SERVICE_RECONNECT_S),
                              ("flush-restored", f"nft flush ruleset -> {top} ports restored", GOAL_SERVICE_FLUSH_S),
                              ("reapply", f"reapply of {top} through the service", GOAL_SERVICE_BULK_S),
                              ("redefine", f"define of a filter {top} bindings use, through the service",
                               GOAL_SERVICE_BULK_S)):
        m = results.find(key, "service", nft, top)
        goal(what, f"<= {fmt_time(target)}", _figure(m), m.median <= target if m else None)
    m = results.find("hotplug", "service", nft, 0)
    goal("hot-plug: the new tap appeared -> its rules in place (unfiltered window)", "measured (median, max)",
         f"{fmt_time(m.median)}, max {fmt_time(max(m.walls))}; {m.note}" if m else None, None)


def ratio_text(results: Results, m: Measurement) -> str:
    if not m.walls:
        return ""
    parts = []
    if m.engine == "service" and m.key not in ("populate", "hotplug", "flush-restored"):
        alone = results.find(m.key, "ours", m.backend, m.present)
        if alone:
            parts.append(f"in-process/this {alone.median / m.median:.1f}x")
    if m.key == "binding-create" and m.engine in ("ours", "service"):
        lv = results.find("binding-create", "libvirt", None, m.present) or results.find("binding-create", "libvirt", None, 0)
        if lv:
            parts.append(f"libvirt/this {lv.median / m.median:.1f}x"
                         + ("" if lv.present == m.present else f" (libvirt @{lv.present})"))
    if m.engine in ("ours", "tool", "service") and m.present and m.key not in ("populate", "reapply", "verify",
                                                                             "redefine", "hook-reconnect",
                                                                             "flush-restored"):
        base = results.find(m.key, m.engine, m.backend, 0)
        if base:
            parts.append(f"vs 0 present {m.median / base.median:.2f}x")
    if m.engine == "ours" and m.backend == "ebiptables" and m.key != "populate":
        nft = results.find(m.key, "ours", "nftables", m.present)
        if nft:
            parts.append(f"vs nftables {m.median / nft.median:.2f}x")
    if m.key.startswith(("hook-start", "binding-create")) and m.engine in ("ours", "service"):
        bare = results.find("python-bare", "python")
        if bare:
            parts.append(f"interpreter {100 * bare.median / m.median:.0f}%")
    return "; ".join(parts)


def table(results: Results) -> str:
    rows = [("measurement", "backend", "present", "median", "min-max", "n", "CPU med", "CPU min", "peak RSS",
             "ratio to reference")]
    for m in results.measurements:
        if m.error and not m.walls:
            rows.append((m.label, m.backend or m.engine, "" if m.present is None else str(m.present),
                         "ERROR", m.error[:60], "0", "-", "-", "-", ""))
            continue
        if not m.walls:
            continue
        engine = {"ours": m.backend or "", "libvirt": "libvirt", "tool": f"{m.backend} (tool)",
                  "python": "python", "service": f"{m.backend} (service)"}[m.engine]
        label = m.label
        cpu = m.cpu and m.engine != "libvirt" and any(m.cpu)
        rows.append((label, engine, "" if m.present is None else str(m.present), fmt_time(m.median),
                     f"{fmt_time(min(m.walls))}-{fmt_time(max(m.walls))}", str(len(m.walls)),
                     fmt_time(statistics.median(m.cpu)) if cpu else "-", fmt_time(min(m.cpu)) if cpu else "-",
                     fmt_rss(max(m.rss_kb)) if m.rss_kb else "-", ratio_text(results, m)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in (2, 3, 4, 5, 6, 7, 8) else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def goals_text(goals: list[dict]) -> str:
    lines = ["Goals (nftables backend; through the service: median wall (minimum), CPU of the process tree):"]
    for g in goals:
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[g["met"]]
        lines.append(f"  {mark} {g['goal']}: target {g['target']}, measured {g['measured']}")
    return "\n".join(lines)


def plot(results: Results, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not importable: no plot (bench/run installs it into .venv)"
    sizes = sorted({m.present for m in results.measurements if m.key == "binding-create" and m.walls})
    if not sizes:
        return "no binding-create figures: no plot"
    xs = {s: i for i, s in enumerate(sizes)}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    series = [("ours", "nftables", "libvirt-nwfilter, nftables", dict(color="tab:blue", marker="o")),
              ("ours", "ebiptables", "libvirt-nwfilter, ebiptables", dict(color="tab:green", marker="s")),
              ("libvirt", None, "libvirt's engine (virsh nwfilter-binding-create)",
               dict(color="tab:red", marker="^"))]
    drawn = []
    for engine, backend, label, style in series:
        pts = sorted(((xs[m.present], m) for m in results.measurements
                      if m.key == "binding-create" and m.engine == engine and m.walls
                      and (backend is None or m.backend == backend)), key=lambda p: p[0])
        if pts:
            drawn.append((label, style, pts))
    for label, style, pts in drawn:
        x = [p[0] for p in pts]
        y = [p[1].median * 1000 for p in pts]
        lo = [(p[1].median - min(p[1].walls)) * 1000 for p in pts]
        hi = [(max(p[1].walls) - p[1].median) * 1000 for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], label=label, capsize=4, linewidth=1.8, **style)
        for xi, yi in zip(x, y):
            near = [q[1].median * 1000 for lb, _, qs in drawn for q in qs
                    if q[0] == xi and ("libvirt's" in lb) == ("libvirt's" in label)]
            dy = 8 if yi >= max(near) else -14  # of our two lines at x: the higher labelled above
            ax.annotate(f"{yi:.0f} ms", (xi, yi), textcoords="offset points", xytext=(7, dy), fontsize=8,
                        color=style["color"])
    lv = results.find("binding-create", "libvirt", None, 0)
    if lv:
        goal = lv.median * 1000 / GOAL_LIBVIRT_RATIO
        ax.axhline(goal, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"goal: {GOAL_LIBVIRT_RATIO:.0f}x faster than libvirt ({goal:.0f} ms)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_xlim(-0.3, len(sizes) - 0.5)
    ax.set_xlabel("bindings already present")
    ax.set_ylabel("wall time per binding, ms (log scale)")
    ax.set_title("Time per clean-traffic binding, one fresh process each\n"
                 f"median of runs, bars min-max; {results.info.get('cores')} cores, kernel {results.info.get('kernel')}",
                 fontsize=10)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write(results: Results, out: Path, started: float, settings: dict, error: str | None = None) -> int:
    """Print the table, goals and notes, write results.json, table.txt and the plot into ``out``;
    the exit status of the run (1 when ``error``)."""
    out.mkdir(parents=True, exist_ok=True)
    info = results.info
    goal_list, text = goals(results), table(results)
    print()
    print(f"libvirt-nwfilter benchmark, {datetime.datetime.fromtimestamp(started):%Y-%m-%d %H:%M}, "
          f"{info.get('cpu')} ({info.get('cores')} cores, {info.get('memory_gib')} GiB), "
          f"kernel {info.get('kernel')}, {info.get('nft')}, libvirt {info.get('libvirt')}, "
          f"commit {info.get('commit')}")
    print(text)
    print()
    print(goals_text(goal_list))
    load = info.get("loadavg_start"), info.get("loadavg_end")
    if load[0]:
        print(f"Load average at start {load[0][0]:.2f}, at end {(load[1] or load[0])[0]:.2f} "
              f"(other work on the machine inflates the figures)")
    for note in results.notes:
        print(f"note: {note}")
    plot_note = plot(results, out / "per-binding.png")
    if plot_note:
        results.notes.append(plot_note)
        print(f"note: {plot_note}")
    data = {
        "generated": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join(map(shlex.quote, sys.argv)),
        "settings": settings,
        "machine": info, "goals": goal_list, "notes": results.notes,
        "measurements": [m.to_json() for m in results.measurements],
    }
    if error:
        data["error"] = error
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "table.txt").write_text(text + "\n\n" + goals_text(goal_list) + "\n")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}" + ("" if plot_note else f", {out / 'per-binding.png'}"))
    print(f"total time {time.time() - started:.0f} s")
    return 1 if error else 0


def replot(out: Path) -> int:
    """Table, goals and plot again from OUT/results.json (no measuring; no root needed)."""
    data = json.loads((out / "results.json").read_text())
    results = Results(info=data.get("machine", {}), max_present=max(data.get("settings", {}).get("sizes", [1000])))
    for item in data["measurements"]:
        m = Measurement(item["key"], item["label"], item["engine"], item.get("backend"), item.get("present"),
                        walls=list(item.get("walls_s", [])), note=item.get("note", ""), error=item.get("error"))
        if "peak_rss_kb" in item:
            m.rss_kb = [item["peak_rss_kb"]]
        m.cpu = list(item.get("cpu_s") or ([item["cpu_median_s"]] if item.get("cpu_median_s") is not None else []))
        results.measurements.append(m)
    text, goal_text = table(results), goals_text(goals(results))
    print(text)
    print()
    print(goal_text)
    (out / "table.txt").write_text(text + "\n\n" + goal_text + "\n")
    note = plot(results, out / "per-binding.png")
    print(note or f"wrote {out / 'per-binding.png'}")
    return 0
