"""The only module that runs firewall tools: plans from the backends, probes and listings.

Tools are run with argument lists (never a shell), a fixed minimal environment, and found in
the sbin directories themselves (libvirtd runs hooks with a short ``PATH``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from functools import lru_cache

from .backends.base import Plan, Step
from .errors import FirewallError

log = logging.getLogger(__name__)

TOOL_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin"
_ENV = {"LC_ALL": "C", "PATH": TOOL_PATH}
TIMEOUT_SECONDS = 120


@lru_cache(maxsize=None)
def tool(name: str) -> str:
    """Absolute path of a tool, searched in the sbin and bin directories."""
    if name.startswith("/"):
        return name
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        raise FirewallError(f"'{name}' not found in {TOOL_PATH}; is it installed?")
    return found


def run(step: Step) -> subprocess.CompletedProcess:
    """Run one step and return the finished process (no exception on a non-zero exit)."""
    argv = [tool(step.argv[0]), *step.argv[1:]]
    log.debug("running %s (%d bytes of input)", " ".join(argv), len(step.stdin))
    try:
        return subprocess.run(argv, input=step.stdin, capture_output=True, text=True, env=_ENV,
                              timeout=TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FirewallError(f"could not run {argv[0]}: {error}") from None


def _failure(step: Step, result: subprocess.CompletedProcess) -> FirewallError:
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    detail = " | ".join(lines[:3]) or f"exit status {result.returncode}"
    return FirewallError(f"{step.argv[0]} refused the change: {detail}")


def execute(plan: Plan) -> list[str]:
    """Run a plan: apply (rolled back on failure), then commit. FirewallError on failure.

    Returns the standard output of every apply and commit step, in order (backends read
    what the kernel echoed back from it)."""
    outputs = []
    for step in plan.apply:
        result = run(step)
        if result.returncode != 0 and not step.ignore_errors:
            error = _failure(step, result)
            for undo in plan.rollback:
                run(undo)
            raise error
        outputs.append(result.stdout)
    for step in plan.commit:
        result = run(step)
        if result.returncode != 0 and not step.ignore_errors:
            raise _failure(step, result)
        outputs.append(result.stdout)
    return outputs


def survey(steps: tuple[Step, ...]) -> list[str]:
    """Run read-only listing steps; the stdout of each ("" where one failed)."""
    outputs = []
    for step in steps:
        result = run(step)
        outputs.append(result.stdout if result.returncode == 0 else "")
    return outputs


def query(argv: tuple[str, ...], stdin: str = "") -> tuple[bool, str]:
    """Run a read-only command (probe, listing); returns (succeeded, stdout or stderr)."""
    result = run(Step(argv, stdin))
    return result.returncode == 0, result.stdout if result.returncode == 0 else result.stderr


def read_text(path: str) -> str:
    """A small kernel file (procfs), stripped; empty when absent."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def kernel_release() -> str:
    return os.uname().release


def read_sysctl(name: str) -> str | None:
    """A sysctl such as ``net/bridge/bridge-nf-call-iptables``, None when it does not exist."""
    value = read_text(f"/proc/sys/{name}")
    return value or None


def write_sysctl(name: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{name}", "w", encoding="ascii") as handle:
            handle.write(value)
    except OSError as error:
        raise FirewallError(f"cannot set {name.replace('/', '.')} = {value}: {error.strerror}") from None


def load_module(name: str) -> bool:
    """modprobe a kernel module; True when it is loaded afterwards."""
    return run(Step(("modprobe", name))).returncode == 0
