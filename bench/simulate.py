"""Figures for ``libvirt-nwfilter simulate`` (not part of ``bench/run``).

    .venv/bin/python bench/simulate.py                   # offline engine throughput (no root)
    .venv/bin/python bench/simulate.py --differential    # + offline vs kernel at scale (root)

Offline: packets per CPU-second (the machine may be shared) through the engine for clean-traffic and for the largest of a set
of generated filters (pre-parsed packets, one conversation, connection tracking on), and the
cost of parsing packet words and of writing explanations. Differential: the comparison of
tests/kernel/test_simulate_differential.py with more packets and more generated filters
(``--packets``, ``--filters``, ``--seed``: the same seed gives the same filters and packets),
on both backends; prints how many packets and filters were compared, the time, and every
disagreement with its filters and packet seed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hypothesis  # noqa: E402
import hypothesis.strategies  # noqa: E402

from libvirt_nwfilter.errors import FirewallError, NwfilterError  # noqa: E402
from libvirt_nwfilter.simulate.evaluate import Simulator  # noqa: E402
from libvirt_nwfilter.simulate.explain import json_report, text_report  # noqa: E402
from libvirt_nwfilter.simulate.packet import parse_packets  # noqa: E402
from simdiff import BUILTIN_PARAMS, BUILTINS, compare, ruleset_of  # noqa: E402
from simgen import ADDRESSES, PacketGenerator, filter_trees  # noqa: E402


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f}/s"


# clean-traffic plus stateful L3 rules (semantics.md §6.9): every stage has work to do
STATEFUL = """<filter name='bench-l3' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='accept' direction='in' priority='100'><tcp dstportstart='22'/></rule>
  <rule action='accept' direction='out' priority='200'><icmp type='8'/></rule>
  <rule action='accept' direction='in' priority='250'><all state='NEW'/></rule>
  <rule action='accept' direction='out' priority='260'><udp srcipaddr='$IP' dstportstart='53'/></rule>
  <rule action='accept' direction='out' priority='300'><tcp-ipv6 dstportstart='80'/></rule>
  <rule action='drop' direction='inout' priority='1000'><all/></rule>
</filter>"""


def offline(count: int, seed: int) -> None:
    params = BUILTIN_PARAMS["clean-traffic"]
    rulesets = {"clean-traffic": ruleset_of("clean-traffic", params),
                "clean-traffic + stateful L3 rules": ruleset_of("bench-l3", params, {"bench-l3": STATEFUL})}
    rng = random.Random(seed)
    for name, ruleset in rulesets.items():
        words = PacketGenerator(ruleset, rng).words(count)
        started = time.process_time()
        packets = parse_packets(words, ADDRESSES)
        parsed = time.process_time() - started
        best = float("inf")
        for _ in range(3):
            fresh = parse_packets(words, ADDRESSES)
            started = time.process_time()  # CPU time: the machine may be shared
            results = Simulator(ruleset).run(fresh)
            best = min(best, time.process_time() - started)
        started = time.process_time()
        for number, result in enumerate(results[:5000], 1):
            text_report(number, result)
            json_report(result)
        explained = time.process_time() - started
        rules = len(ruleset.fi) + len(ruleset.fo) + len(ruleset.hi) + sum(
            len(s.root) + sum(len(c.rules) for c in s.subchains) for s in (ruleset.from_vm, ruleset.to_vm))
        print(f"{name} ({rules} IR rules, {len(packets)} packets, "
              f"{sum(r.passed for r in results)} pass):")
        print(f"  evaluate (best of 3) {_rate(len(packets), best)}")
        print(f"  parse packet words   {_rate(len(packets), parsed)}")
        print(f"  text + JSON report   {_rate(min(5000, len(results)), explained)}")


def differential(packets: int, filters: int, seed: int) -> int:
    started = time.monotonic()
    compared = kernel_packets = 0
    problems: list[str] = []
    for index, name in enumerate(BUILTINS):
        ruleset = ruleset_of(name, BUILTIN_PARAMS.get(name, {}))
        words = PacketGenerator(ruleset, random.Random(seed + index)).words(packets)
        _, found = compare(ruleset, words)
        problems += [f"{name}: {p}" for p in found]
        compared += 1
        kernel_packets += 2 * len(words)
    counts = {"generated": 0, "refused": 0}

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=filters, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(trees=filter_trees(), packet_seed=hypothesis.strategies.integers(0, 2 ** 32 - 1))
    def generated(trees, packet_seed):
        try:
            ruleset = ruleset_of("gen-root", {}, trees)
            words = PacketGenerator(ruleset, random.Random(packet_seed)).words(packets)
            _, found = compare(ruleset, words)
        except FirewallError:
            counts["refused"] += 1
            return
        except NwfilterError:
            return
        problems.extend(f"generated (packet seed {packet_seed}): {p}\n{trees}" for p in found)
        counts["generated"] += 1

    generated()
    compared += counts["generated"]
    refused = counts["refused"]
    kernel_packets += 2 * packets * counts["generated"]
    print(f"differential: {compared} filters ({len(BUILTINS)} reference, {compared - len(BUILTINS)} generated; "
          f"{refused} generated filters refused by a backend's tools), {kernel_packets // 2} packets offline, "
          f"{kernel_packets} through the kernel (both backends), {time.monotonic() - started:.0f} s, "
          f"{len(problems)} disagreement(s)")
    for problem in problems:
        print("  " + problem)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50000, help="packets for the offline figures")
    parser.add_argument("--differential", action="store_true", help="also compare with the kernel (root)")
    parser.add_argument("--packets", type=int, default=1000, help="packets per filter (differential)")
    parser.add_argument("--filters", type=int, default=50, help="generated filters (differential)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    offline(args.count, args.seed)
    return differential(args.packets, args.filters, args.seed) if args.differential else 0


if __name__ == "__main__":
    sys.exit(main())
