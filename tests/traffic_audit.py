"""Counts the negative traffic checks a test run executes, and which had a positive twin.

    .venv/bin/python -m pytest -p traffic_audit tests/kernel tests/libvirt

A pytest plugin (opt-in with ``-p traffic_audit``; ``tests/`` is on the module path). It wraps
the lab's traffic checks and records every negative check or observation that reported "did not
pass" (a frame not seen, a connection or ping that failed) in a run, with how its wait was
vouched for:

``awaited twin``
    tests/traffic.py batches: its positive twin passed in the batch, and the batch waited for it
    (plus a settle time) before judging the negative;
``positive in the window``
    a batch of an older helper (``bindings_helpers.verdicts``, ``Lab.deliveries``) had such a
    check that passed in the same capture window, but the window was a fixed time;
``no twin``
    a check on its own (``Lab.frame_delivered``/``tcp_connect``/``udp_exchange``/``ping`` and
    the like), judged after its own timeout only.

At the end it prints the totals and the files they come from. It works on the current tree and
on older ones (it wraps only what exists), so counts can be compared across commits.

Without running anything, ``python tests/traffic_audit.py TESTS_DIR...`` counts the negative
checks written in the test files of each tree (:func:`written_negatives`): single checks negated
(no twin), and the ``Probe``/``Conn`` checks whose expectation is not a literal ``True``/``None``
(a literal ``False`` or computed), by the module they come from (``traffic``: a twin is required
and awaited; the older ``bindings_helpers``: judged after a fixed window, no twin required).
"""

from __future__ import annotations

import ast
import collections
import functools
import os
import sys
from pathlib import Path

import pytest

SINGLE_CHECKS = {"frame_delivered", "tcp_connect", "udp_exchange", "ping"}
EXPECT_POSITION = {"Probe": 4, "Conn": 5}
AWAITED, WINDOW, NONE = "awaited twin", "positive in the window", "no twin"
_records: list[tuple[str, str]] = []  # (test file, category)
_current = {"file": "?"}


def _record(category: str, count: int = 1) -> None:
    _records.extend([(_current["file"], category)] * count)


def _shares(a, b) -> bool:
    return a[0] == b[0] or a[1] == b[1]


def _batch(outcomes: list[tuple[tuple, bool]], category: str) -> None:
    """``outcomes``: ((sender, receiver), passed) per check of one batch."""
    for ends, passed in outcomes:
        if not passed:
            twin = any(ok and _shares(ends, other) for other, ok in outcomes if other is not ends)
            _record(category if twin else NONE)


def _wrap(owner, name: str, after) -> None:
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_audited", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result

    wrapper._audited = True
    setattr(owner, name, wrapper)


def _single(result, *args, **kwargs) -> None:
    if not (result[0] if isinstance(result, tuple) else result):
        _record(NONE)


def _old_verdicts(result, lab, probes, *args, **kwargs) -> None:
    _batch([((lab.where(p.src), lab.where(p.dst)), result[p.name]) for p in probes], WINDOW)


def _deliveries(result, lab, src, frame, to, *args, **kwargs) -> None:
    _batch([(("src", key), ok) for key, ok in result.items()], WINDOW)


def _new_batch(result, lab, checks, *args, **kwargs) -> None:
    verdicts, inconclusive = result
    failed = [c.name for c in checks if c.expect is not True and not verdicts[c.name]]
    _record(AWAITED, len([name for name in failed if name not in inconclusive]))
    _record(NONE, len([name for name in failed if name in inconclusive]))


def pytest_sessionstart(session):
    import netlab
    for name in ("tcp_connect", "udp_exchange", "ping"):
        _wrap(netlab.Lab, name, _single)
    _wrap(netlab.Lab, "deliveries", _deliveries)  # frame_delivered goes through it
    for module_name, hooks in (("bindings_helpers", {"verdicts": _old_verdicts, "exchange": _single}),
                               ("traffic", {"run_frames": _new_batch, "run_connections": _new_batch})):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name, after in hooks.items():
            _wrap(module, name, after)


def pytest_collection_modifyitems(session, config, items):
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        _wrap(module, "ping_from", _single)  # tests/kernel/test_bindings_reference.py had its own


def pytest_runtest_setup(item):
    _current["file"] = os.path.relpath(str(item.fspath))


def pytest_terminal_summary(terminalreporter):
    totals = collections.Counter(category for _, category in _records)
    by_file = collections.defaultdict(collections.Counter)
    for path, category in _records:
        by_file[path][category] += 1
    write = terminalreporter.write_line
    write("")
    write(f"negative traffic checks executed: {len(_records)}  "
          + ", ".join(f"{category}: {totals[category]}" for category in (AWAITED, WINDOW, NONE)))
    for path in sorted(by_file):
        write(f"  {path}: " + ", ".join(f"{category} {count}" for category, count in by_file[path].items()))
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------
# Written in the files (no run)


def _single_check(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SINGLE_CHECKS


def lone_negatives(source: str) -> list[int]:
    """Line numbers where a single check's result is negated or compared with False."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and _single_check(node.operand):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and _single_check(node.left) and any(
                isinstance(c, ast.Constant) and c.value is False for c in node.comparators):
            lines.append(node.lineno)
    return sorted(lines)


def _check_origin(tree: ast.Module) -> str | None:
    """Where the file's ``Probe``/``Conn`` come from: ``traffic`` or ``bindings_helpers``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("traffic", "bindings_helpers") and any(
                alias.name in EXPECT_POSITION for alias in node.names):
            return node.module
        if isinstance(node, ast.Import) and any(alias.name == "traffic" for alias in node.names):
            return "traffic"
    return None


def _may_expect_failure(call: ast.Call) -> bool:
    name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
    if name not in EXPECT_POSITION:
        return False
    expect = next((k.value for k in call.keywords if k.arg == "expect"), None)
    if expect is None and len(call.args) > EXPECT_POSITION[name]:
        expect = call.args[EXPECT_POSITION[name]]
    return expect is not None and not (isinstance(expect, ast.Constant) and expect.value in (True, None))


def written_negatives(path: Path) -> collections.Counter:
    """``lone`` single checks negated; ``traffic`` / ``bindings_helpers`` checks that may
    expect a failure, by their module."""
    tree = ast.parse(path.read_text())
    found = collections.Counter(lone=len(lone_negatives(path.read_text())))
    origin = _check_origin(tree)
    if origin:
        found[origin] = sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and _may_expect_failure(node))
    return found


def main(roots: list[str]) -> None:
    for root in roots:
        totals = collections.Counter()
        for path in sorted(Path(root).rglob("test_*.py")):
            totals.update(written_negatives(path))
        print(f"{root}: single checks negated (no twin) {totals['lone']}; "
              f"tests/traffic.py checks that may expect failure (twin required) {totals['traffic']}; "
              f"bindings_helpers checks that may expect failure (fixed window) {totals['bindings_helpers']}")


if __name__ == "__main__":
    main(sys.argv[1:])
