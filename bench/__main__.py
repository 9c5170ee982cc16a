"""``bench/run`` runs this (``python -m bench``, as root, from the checkout): the arguments, the
checks, one :class:`~bench.scenarios.Bench` run, always cleaned up, then the report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Sequence

from . import report
from .documents import MEAS_PORTS
from .measure import CLI, REPO, SUBJECT, TESTS, VENV_PY
from .scenarios import BACKENDS, Bench


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description="Benchmark libvirt-nwfilter against libvirt's "
                                "own nwfilter engine (as root; see bench/README.md).")
    p.add_argument("--quick", action="store_true", help="0 and 100 bindings present only, 3 runs each (~3 min)")
    p.add_argument("--full", action="store_true",
                   help="also measure libvirt's engine with 100 of its bindings present (~2 more minutes)")
    p.add_argument("--profile", action="store_true",
                   help="also write OUT/profile/: -X importtime, cProfile, strace phases (nftables)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory (default bench/results)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default nftables,ebiptables)")
    p.add_argument("--reps", type=int, help="runs per fast measurement (default 7; --quick 3)")
    p.add_argument("--slow-reps", type=int, help="runs of reapply/verify/define (default 5; --quick 3)")
    p.add_argument("--slow-budget", type=float, default=90.0,
                   help="seconds after which a slow measurement stops at 3 runs (default 90)")
    p.add_argument("--libvirt-reps", type=int, help="virsh binding-creates per point (default 7; --quick 5)")
    p.add_argument("--libvirt-lock-wait", type=float, default=600.0,
                   help="seconds to wait for the test-libvirtd lock held by a test run (default 600)")
    p.add_argument("--no-libvirt", action="store_true", help="skip libvirt's engine (and the hot-plug window)")
    p.add_argument("--no-service", action="store_true", help="skip the resident service's figures")
    p.add_argument("--replot", action="store_true",
                   help="measure nothing: print the table and redraw the plot from OUT/results.json")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    args = p.parse_args(argv)
    args.out = Path(args.out).resolve()
    args.backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    for backend in args.backends:
        if backend not in BACKENDS:
            p.error(f"unknown backend {backend!r}")
    args.reps = args.reps or (3 if args.quick else 7)
    args.slow_reps = args.slow_reps or (3 if args.quick else 5)
    args.libvirt_reps = args.libvirt_reps or (5 if args.quick else 7)
    if args.reps < 1 or args.slow_reps < 1 or args.libvirt_reps < 1:
        p.error("run counts must be at least 1")
    if args.libvirt_reps > MEAS_PORTS * 4:
        p.error("too many libvirt runs")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.replot:
        return report.replot(args.out)
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces, nftables, libvirtd)", file=sys.stderr)
        return 2
    if not VENV_PY.exists() or not CLI.exists():
        print("bench: .venv is missing: run bench/run (it runs scripts/bootstrap)", file=sys.stderr)
        return 2
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        print(f"bench: note: running under {sys.executable}, not the project venv", file=sys.stderr)
    if SUBJECT != REPO:
        print(f"bench: measuring the checkout {SUBJECT} (LIBVIRT_NWFILTER_BENCH_SUBJECT)", file=sys.stderr)
    sys.path[:0] = [str(REPO), str(TESTS)]  # this benchmark and its helpers, whatever the directory
    os.chdir(SUBJECT)  # "python -m bench.populate" and the service run with the subject's package

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    bench = Bench(args)
    error = None
    try:
        bench.run()
    except KeyboardInterrupt:
        error = "interrupted"
    except SystemExit as exc:
        error = f"stopped by signal {int(exc.code) - 128}" if isinstance(exc.code, int) else str(exc)
    except Exception as exc:  # noqa: BLE001 - partial results are still written
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        bench.cleanup()
    if error:
        print(f"bench: {error}; partial results follow", file=sys.stderr)
    settings = {"quick": args.quick, "full": args.full, "reps": args.reps, "slow_reps": args.slow_reps,
                "libvirt_reps": args.libvirt_reps, "sizes": list(bench.sizes), "backends": list(args.backends)}
    status = report.write(bench.results, args.out, bench.started, settings, error)
    if args.profile:
        print(f"profiles in {bench.profile_dir}/")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
