"""What is measured, in order (details and figures: bench/README.md):

1. baselines: the bare interpreter, and importing the CLI and the hook modules;
2. a lab namespace (tests/netlab.py: ``nwft-<random>`` with bridge ``br0``) holding one veth pair
   per binding (both ends in the namespace; the bridge end is the filtered port);
3. per backend (nftables, ebiptables), with 0, 100 and 1000 clean-traffic bindings present
   (pre-populated in one batch through ``Service.bind_owner`` inside the namespace): fresh-process
   ``libvirt-nwfilter binding-create`` (and ``binding-delete``) per binding, the qemu hook
   ``hooks/qemu GUEST start begin -`` / ``stopped end`` with a one-interface domain XML on stdin,
   the ``nft`` process alone (nftables), and at the largest count ``reapply`` and ``verify``;
4. per backend: a clean-traffic-like filter of our own used by 1000 bindings, redefined (one rule
   changed) with ``libvirt-nwfilter define``;
5. nftables through the resident service (:mod:`.service`): the same requests from fresh client
   processes at 0 and 1000 bindings present, hook ``reconnect``, ``nft flush ruleset`` until
   repaired, ``reapply`` and ``define`` of 1000, with the CPU of the service's process tree;
6. libvirt's engine (``virsh nwfilter-binding-create`` against a private libvirtd started in its
   own namespace by tests/libvirtd.py) on the same kernel in the same run, when libvirtd is
   installed: at 0 bindings present (and 100 with ``--full``); then the hot-plug window with
   the service connected to that libvirtd.

The run directory is on tmpfs as ``/run`` is on Debian. Namespaces and the libvirtd it started
are always removed (:meth:`Bench.cleanup`, SIGTERM/SIGHUP handlers, and netlab's atexit net).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .documents import (CUSTOM_FILTER, FILTER, GUEST, HOOK_PORT, MEAS_PORTS, binding_xml, custom_filter_xml,
                        domain_xml, meas_mac, meas_port, prepop_port)
from .measure import (CLI, TESTS, VENV_PY, BenchError, Measurement, Results, Run, base_env, fmt_rss,
                      fmt_time, is_tmpfs, lock_busy, machine_info, memory_runs, sh, spawn)
from .ours import Ours
from .profiling import profile_cli, profile_state
from .service import ServiceScenario, hotplug

BACKENDS = ("nftables", "ebiptables")


class Bench:
    """One run: the lab, our engine per backend, libvirt's engine; its results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.reps: int = args.reps
        self.slow_reps: int = args.slow_reps
        self.sizes: tuple[int, ...] = (0, 100) if args.quick else (0, 100, 1000)
        self.max_present = max(self.sizes)
        self.results = Results(max_present=self.max_present)
        self.lab = None
        self.daemon = None
        self.work = Path(tempfile.mkdtemp(prefix="nwfilter-bench-"))
        shm = Path("/dev/shm") if is_tmpfs(Path("/dev/shm")) else Path("/run")
        self.shm = Path(tempfile.mkdtemp(prefix="nwfilter-bench-", dir=shm))
        self.profile_dir = self.out / "profile"
        self.with_service = "nftables" in args.backends and not args.no_service
        self.started = time.time()
        self.t0 = time.monotonic()

    # -- helpers -----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}] {message}", flush=True)

    def guarded(self, what: str, measurement: Measurement | None, func: Callable[[], None]) -> bool:
        """Run one measurement group; an error is recorded (and printed), the run goes on."""
        try:
            func()
            return True
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - recorded in the results
            text = f"{type(error).__name__}: {error}"
            self.log(f"ERROR in {what}: {text}")
            if self.args.debug:
                traceback.print_exc()
            if measurement is not None:
                measurement.error = text
            else:
                self.results.notes.append(f"{what}: {text}")
            return False

    def repeat(self, m: Measurement, reps: int, once: Callable[[int], Run | None], min_reps: int = 3,
               budget: float | None = None) -> int:
        """``reps`` timed runs (``once(i)`` returns the Run to record); when ``budget`` seconds
        are used up, stop after ``min_reps``. Then one more run (``once(n)`` after ``n`` timed
        ones) for the peak memory of every process it spawns (:func:`memory_runs`; none for
        libvirt's engine, whose memory is libvirtd's). Returns how many runs were made."""
        began = time.monotonic()
        done = 0
        for i in range(reps):
            run = once(i)
            done += 1
            if run is not None:
                m.add(run)
            if budget is not None and i + 1 >= min_reps and time.monotonic() - began > budget:
                m.note = (m.note + "; " if m.note else "") + f"{i + 1} of {reps} runs (time budget)"
                break
        if m.engine != "libvirt":
            with memory_runs():
                run = once(done)
            done += 1
            if run is not None:
                m.add(run)
        return done

    # -- lab -----------------------------------------------------------------------------------
    def make_lab(self):
        import netlab

        self.log("creating the lab namespace and ports")
        self.lab = netlab.Lab()
        ns = self.lab.host_ns
        names = [prepop_port(i) for i in range(self.max_present)] + [meas_port(k) for k in range(MEAS_PORTS)]
        names.append(HOOK_PORT)
        self.add_ports(ns, names)
        self.log(f"lab {ns}: bridge br0 with {len(names)} veth ports")

    @staticmethod
    def add_ports(ns: str, names: Sequence[str]) -> None:
        lines = []
        for i, port in enumerate(names):
            peer = f"bq{i}x{port}"[:15]
            lines += [f"link add {port} type veth peer name {peer}", f"link set {port} master br0",
                      f"link set {port} up", f"link set {peer} up"]
        for start in range(0, len(lines), 2000):
            sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines[start:start + 2000]) + "\n")

    def flush_firewall(self) -> None:
        sh(["ip", "netns", "exec", self.lab.host_ns, "nft", "flush", "ruleset"])

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        info = self.results.info
        info.update(machine_info(self.shm))
        self.log(f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, "
                 f"load {info['loadavg_start'][0]:.2f}")
        if self.args.profile:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.guarded("baselines", None, self.baselines)
        self.make_lab()
        for backend in self.args.backends:
            self.guarded(f"{backend} scenario", None, lambda b=backend: self.scenario(b))
            self.guarded(f"{backend} redefinition", None, lambda b=backend: self.redefine_scenario(b))
        if self.with_service:
            self.log("== nftables through the resident service (libvirt-nwfilterd)")
            self.guarded("service", None, lambda: ServiceScenario(self, self.max_present).run())
        self.log("deleting the lab")
        self.lab.close()
        self.lab = None
        if self.args.no_libvirt:
            self.results.notes.append("libvirt's engine not measured (--no-libvirt)")
        elif not (shutil.which("libvirtd") and shutil.which("virsh")):
            self.results.notes.append("libvirt's engine not measured: libvirtd/virsh not installed")
        else:
            self.guarded("libvirt", None, self.libvirt_phase)
        info["loadavg_end"] = os.getloadavg()

    # -- baselines ------------------------------------------------------------------------------
    def baselines(self) -> None:
        env = base_env()
        for key, label, argv in (
                ("python-bare", "interpreter start-up (python -c pass)", [VENV_PY, "-c", "pass"]),
                ("python-bare-S", "interpreter start-up without site (python -S -c pass)", [VENV_PY, "-S", "-c", "pass"]),
                ("import-cli", "python -c 'import libvirt_nwfilter.cli'", [VENV_PY, "-c", "import libvirt_nwfilter.cli"]),
                ("import-hook", "python -c 'import libvirt_nwfilter.hook'", [VENV_PY, "-c", "import libvirt_nwfilter.hook"]),
                ("import-service", "python -c 'import libvirt_nwfilter.service'",
                 [VENV_PY, "-c", "import libvirt_nwfilter.service, libvirt_nwfilter.backends.nftables"]),
                ("cli-help", "libvirt-nwfilter --help (argparse, all verbs)", [CLI, "--help"])):
            m = self.results.new(key, label, "python")
            spawn(argv, env).check(label)  # warm-up: writes the .pyc files
            self.repeat(m, self.reps, lambda i, a=argv: spawn(a, env).check(key))
        self.log("baselines: " + ", ".join(f"{m.key} {fmt_time(m.median)}" for m in self.results.measurements))

    def scenario(self, backend: str) -> None:
        self.log(f"== {backend}: clean-traffic bindings")
        self.flush_firewall()
        ours = Ours(self.lab.host_ns, self.work, self.shm, backend, "main")
        ours.cli("status").check("status (warm-up, kernel probe)")
        present = 0
        for size in self.sizes:
            if size > present:
                m = self.results.new("populate", f"set-up: bulk bind of {size - present} more (bind_owner, one batch)",
                             "ours", backend, size)
                run = ours.populate(present, size, FILTER)
                m.add(run)
                present = size
                self.log(f"{backend}: {present} bindings present (bulk bind {fmt_time(run.wall)})")
            self.guarded(f"{backend} binding-create at {size}", None, lambda: self.measure_create(ours, size))
            self.guarded(f"{backend} hook at {size}", None, lambda: self.measure_hook(ours, size))
            if backend == "nftables":
                self.guarded(f"nft alone at {size}", None, lambda: self.measure_nft_alone(ours, size))
            if self.args.profile and backend == "nftables" and size in (0, self.max_present):
                self.guarded(f"profile at {size}", None, lambda: self.profile_state(ours, size))
        size = self.max_present
        m = self.results.new("reapply", f"reapply of {size} bindings (fresh process)", "ours", backend, size)
        ours.cli("reapply").check("reapply (warm-up)")
        self.guarded(f"{backend} reapply", m, lambda: self.repeat(
            m, self.slow_reps, lambda i: ours.cli("reapply").check("reapply"), budget=self.args.slow_budget))
        self.log(f"{backend}: reapply of {size}: {fmt_time(m.median)}, peak {fmt_rss(max(m.rss_kb, default=0))}")
        m = self.results.new("verify", f"verify of {size} bindings (fresh process)", "ours", backend, size)
        self.guarded(f"{backend} verify", m, lambda: self.repeat(
            m, self.slow_reps, lambda i: ours.cli("verify").check("verify"), budget=self.args.slow_budget))
        self.log(f"{backend}: verify of {size}: {fmt_time(m.median)}")
        if self.args.profile and backend == "nftables":
            self.guarded("profile reapply", None,
                         lambda: profile_cli(ours, self.profile_dir, f"reapply-{size}", lambda i: ["reapply"]))
        self.flush_firewall()

    def profile_state(self, ours: Ours, present: int) -> None:
        profile_state(ours, present, self.profile_dir)
        self.log(f"profile @{present}: written to {self.profile_dir}")

    def measure_create(self, ours: Ours, present: int) -> None:
        files = [ours.binding_file(meas_port(k), meas_mac(k), f"10.2.0.{k + 1}") for k in range(MEAS_PORTS)]
        # warm-up (not timed): first run after a change of the code writes .pyc files
        ours.cli("binding-create", files[0]).check("binding-create (warm-up)")
        ours.cli("binding-delete", meas_port(0)).check("binding-delete (warm-up)")
        create = self.results.new("binding-create", "binding-create clean-traffic (fresh process)", "ours",
                          ours.backend, present)
        delete = self.results.new("binding-delete", "binding-delete (fresh process)", "ours", ours.backend, present)

        def once(k: int) -> Run:
            port = meas_port(k % MEAS_PORTS)
            run = ours.cli("binding-create", files[k % MEAS_PORTS]).check("binding-create")
            if ours.state_has(port) is False:
                raise BenchError(f"binding-create exited 0 but no state for {port}")
            delete.add(ours.cli("binding-delete", port).check("binding-delete"))
            return run

        self.repeat(create, self.reps, once)
        self.log(f"{ours.backend} @{present}: binding-create {fmt_time(create.median)} "
                 f"[{fmt_time(min(create.walls))}-{fmt_time(max(create.walls))}], "
                 f"delete {fmt_time(delete.median)}")

    def measure_hook(self, ours: Ours, present: int) -> None:
        start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
        ours.hook("start", "begin", start_xml).check("hook start (warm-up)")
        ours.hook("stopped", "end", stop_xml).check("hook stopped (warm-up)")
        start = self.results.new("hook-start", "hook: qemu GUEST start begin - (1 interface)", "ours", ours.backend, present)
        stop = self.results.new("hook-stopped", "hook: qemu GUEST stopped end -", "ours", ours.backend, present)

        def once(k: int) -> Run:
            run = ours.hook("start", "begin", start_xml).check("hook start")
            if ours.state_has(HOOK_PORT) is False:
                raise BenchError("hook start exited 0 but the port has no binding")
            run2 = ours.hook("stopped", "end", stop_xml).check("hook stopped")
            if ours.state_has(HOOK_PORT):
                raise BenchError("hook stopped exited 0 but the binding is still there")
            stop.add(run2)
            return run

        self.repeat(start, self.reps, once)
        self.log(f"{ours.backend} @{present}: hook start {fmt_time(start.median)}, "
                 f"stopped {fmt_time(stop.median)}, peak {fmt_rss(max(start.rss_kb + stop.rss_kb, default=0))}")
        if ours.backend == "nftables" and present in (0, self.max_present):
            self.guarded("hook via installed wrapper", None, lambda: self.measure_wrapper(ours, present))

    def measure_wrapper(self, ours: Ours, present: int) -> None:
        """The hook as libvirtd runs it once installed: /bin/sh wrapper, then python -I -m."""
        hooks_dir = ours.files / "hooks"
        ours.cli("install-hook", "--no-service", "--hooks-dir", hooks_dir).check("install-hook")
        wrappers = [p for p in (hooks_dir / "qemu.d").glob("*") if os.access(p, os.X_OK)]
        if not wrappers:
            raise BenchError("install-hook wrote no executable wrapper")
        wrapper = wrappers[0]
        env = base_env()  # the wrapper carries the configuration
        start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
        m = self.results.new("hook-start-wrapper", "hook start via the install-hook wrapper (sh, python -I -S -c)",
                     "ours", ours.backend, present)

        def once(k: int) -> Run:
            run = spawn([wrapper, GUEST, "start", "begin", "-"], env, ours.ns, start_xml).check("wrapper start")
            spawn([wrapper, GUEST, "stopped", "end", "-"], env, ours.ns, stop_xml).check("wrapper stopped")
            return run

        self.repeat(m, self.reps, once)

    def measure_nft_alone(self, ours: Ours, present: int) -> None:
        """The nft process by itself, for one binding's batch (check mode: nothing is changed),
        with and without echo, and the full listing reapply/verify read."""
        rendered = ours.cli("render", ours.binding_file(meas_port(0), meas_mac(0), "10.2.0.1")).check("render")
        lines = rendered.stdout.splitlines(keepends=True)
        if not lines or not lines[0].startswith("# "):
            raise BenchError("unexpected render output")
        argv = shlex.split(lines[0][2:])
        batch = ours.files / "batch.nft"
        batch.write_text("".join(line for line in lines[1:] if not line.startswith("# /")))
        nft = argv[0]
        variants = [("nft-check", "nft -c -f (one binding's batch, no echo)", [nft, "-c", "-f", batch])]
        if "-e" in argv or "--echo" in argv:
            variants.append(("nft-check-echo", "nft -c -e -f (the same with echo, as the backend runs it)",
                             [nft, "-c", "-e", "-f", batch]))
        variants.append(("nft-list", "nft -j list ruleset bridge (our bridge tables: most of what verify reads)",
                         [nft, "-j", "list", "ruleset", "bridge"]))
        for key, label, cmd in variants:
            m = self.results.new(key, label, "tool", "nftables", present)
            spawn(cmd, base_env(), ours.ns).check(label)
            self.repeat(m, self.reps, lambda i, c=cmd, lb=label: spawn(c, base_env(), ours.ns).check(lb))
        self.log(f"nft alone @{present}: " + ", ".join(
            f"{key} {fmt_time(self.results.find(key, 'tool', 'nftables', present).median)}" for key, _, _ in variants))

    # -- redefinition of a filter used by many bindings -----------------------------------------
    def redefine_scenario(self, backend: str) -> None:
        size = self.max_present
        self.log(f"== {backend}: redefinition of a filter used by {size} bindings")
        self.flush_firewall()
        ours = Ours(self.lab.host_ns, self.work, self.shm, backend, "redefine")
        ours.cli("status").check("status (warm-up)")
        variants = []
        for v in (0, 1, 2):
            path = ours.files / f"{CUSTOM_FILTER}-{v}.xml"
            path.write_text(custom_filter_xml(v))
            variants.append(path)
        ours.cli("define", variants[0]).check("define (initial)")
        m = self.results.new("populate", f"set-up: bulk bind of {size} to {CUSTOM_FILTER} (one batch)", "ours", backend, size,
                     note="redefinition set-up")
        m.add(ours.populate(0, size, CUSTOM_FILTER))
        m = self.results.new("redefine", f"define: one rule changed in a filter used by {size} bindings", "ours",
                     backend, size)
        ours.cli("define", variants[1]).check("define (warm-up)")

        def once(i: int) -> Run:
            # alternate between two variants that differ from the definition in place
            return ours.cli("define", variants[2 if i % 2 == 0 else 1]).check("define")

        self.guarded(f"{backend} redefine", m, lambda: self.repeat(m, self.slow_reps, once,
                                                                    budget=self.args.slow_budget))
        self.log(f"{backend}: redefinition with {size} users: {fmt_time(m.median)}, "
                 f"peak {fmt_rss(max(m.rss_kb, default=0))}")
        if self.args.profile and backend == "nftables":
            # continue the alternation so that every profiled define changes the filter
            done = len(m.walls) + len(m.rss_kb) + 1  # after the warm-up (variant 1), the timed and memory runs alternated
            self.guarded("profile define", None, lambda: profile_cli(
                ours, self.profile_dir, f"define-{size}", lambda i: ["define", variants[1 + (done + i) % 2]]))
        self.flush_firewall()

    # -- libvirt's engine --------------------------------------------------------------------------
    def libvirt_phase(self) -> None:
        sys.path.insert(0, str(TESTS))
        import libvirtd as lvd  # tests/libvirtd.py: private libvirtd in a lab namespace

        lvd.LOCK_WAIT = float(self.args.libvirt_lock_wait)
        self.log("== libvirt's engine: starting a private libvirtd (tests/libvirtd.py)")
        if lock_busy(lvd.LOCK_FILE):
            self.log(f"waiting for {lvd.LOCK_FILE} (a test run is using libvirtd), up to {lvd.LOCK_WAIT:.0f} s")
        began = time.monotonic()
        self.daemon = lvd.start_libvirtd()
        if time.monotonic() - began > 30:
            self.results.notes.append(f"waited {time.monotonic() - began:.0f} s for the test-libvirtd lock")
        ns = self.daemon.lab.host_ns
        sizes = (0, 100) if self.args.full else (0,)
        extra = max(sizes)
        ports = [f"lv{k}" for k in range(self.args.libvirt_reps)]
        fill = [f"lq{i}" for i in range(extra)]
        self.add_ports(ns, ports + fill)
        self.log(f"libvirtd pid {self.daemon.pid} in {ns}; {len(ports) + len(fill)} ports")
        files = self.work / "libvirt"
        files.mkdir(exist_ok=True)
        env = base_env()
        virsh = [shutil.which("virsh"), "-c", "qemu:///system"]

        def xml_file(port: str, i: int, base: int) -> Path:
            path = files / f"{port}.xml"
            path.write_text(binding_xml(port, f"52:54:00:{base:02x}:{i >> 8:02x}:{i & 0xFF:02x}",
                                        f"10.{base}.{i >> 8}.{i & 0xFF}", owner="bench-libvirt"))
            return path

        spawn([*virsh, "version"], env).check("virsh version")
        present = 0
        for size in sizes:
            if size > present:
                m = self.results.new("populate", f"set-up: virsh nwfilter-binding-create, {present} to {size} present",
                             "libvirt", None, size)
                began = time.monotonic()
                for i in range(present, size):
                    m.add(spawn([*virsh, "nwfilter-binding-create", xml_file(fill[i], i, 5)], env)
                          .check("virsh nwfilter-binding-create"))
                present = size
                self.log(f"libvirt: {size} bindings present ({time.monotonic() - began:.0f} s)")
            create = self.results.new("binding-create", "virsh nwfilter-binding-create clean-traffic", "libvirt",
                              None, size)
            delete = self.results.new("binding-delete", "virsh nwfilter-binding-delete", "libvirt", None, size)

            def once(k: int) -> Run:
                run = spawn([*virsh, "nwfilter-binding-create", xml_file(ports[k], k, 4)], env) \
                    .check("virsh nwfilter-binding-create")
                delete.add(spawn([*virsh, "nwfilter-binding-delete", ports[k]], env)
                           .check("virsh nwfilter-binding-delete"))
                return run

            self.repeat(create, self.args.libvirt_reps, once)
            self.log(f"libvirt @{size}: binding-create {fmt_time(create.median)} "
                     f"[{fmt_time(min(create.walls))}-{fmt_time(max(create.walls))}]")
        if self.with_service:
            self.guarded("hot-plug", None, lambda: hotplug(self, self.daemon, self.args.libvirt_reps))
        if not self.args.full:
            self.results.notes.append("libvirt's engine measured at 0 bindings present only (100 present: --full, "
                              "about 2 more minutes)")
        self.stop_libvirtd()

    def stop_libvirtd(self) -> None:
        if self.daemon is not None:
            daemon, self.daemon = self.daemon, None
            self.log(f"stopping libvirtd (pid {daemon.pid}) and deleting its namespace")
            daemon.stop()

    def cleanup(self) -> None:
        """Always: libvirtd stopped by pid, namespaces deleted, temporary directories removed."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish cleaning up whatever arrives now
        problems = []
        try:
            self.stop_libvirtd()
        except Exception as error:  # noqa: BLE001
            problems.append(f"libvirtd: {error}")
        if self.lab is not None:
            try:
                self.lab.close()
            except Exception as error:  # noqa: BLE001
                problems.append(f"lab: {error}")
            self.lab = None
        with contextlib.suppress(Exception):
            import netlab

            left = netlab.cleanup_all()
            if left:
                problems.append(f"namespaces removed late: {left}")
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)
        for problem in problems:
            print(f"bench: cleanup: {problem}", file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
