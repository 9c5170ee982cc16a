"""Shared fixtures.

Kernel tests (``tests/kernel``, marker ``kernel``) need root, ``nft`` and network namespaces
(so do the Debian package tests in ``tests/package``, which carry the same marker);
libvirt tests (``tests/libvirt``, markers ``libvirt`` and ``kernel``) also need libvirtd and
QEMU. They are never skipped silently: when something is missing they *fail*. To leave them
out on purpose set ``LIBVIRT_NWFILTER_SKIP_KERNEL=1`` (skips both kinds) or
``LIBVIRT_NWFILTER_SKIP_LIBVIRT=1``.

Fixtures (see tests/netlab.py and tests/libvirtd.py for the objects):

``lab``            function scope: a fresh :class:`netlab.Lab`, deleted afterwards.
``kernel_env``     session scope: checks root, ``nft``, ``ip netns``, br_netfilter sysctls;
                   deletes lab namespaces left by test processes that were killed.
``libvirtd_hook``  module scope: hook script text installed before libvirtd starts (default
                   None); override it in a test module to test a hook.
``libvirtd``       module scope: a running :class:`libvirtd.Libvirtd` (own namespace).
``libvirt_lab``    function scope: the libvirtd's lab (``lab.host_ns`` is libvirtd's
                   namespace); VMs, guests and bindings the test adds are removed afterwards.
``rng``            function scope: a :class:`random.Random` for a test's random schedule; its
                   seed (``rng.seed_value``) is printed (shown when the test fails) and
                   recorded in the report; ``NWFT_SEED=N`` replays a run.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

import libvirtd as libvirtd_mod
import netlab

TESTS_DIR = Path(__file__).resolve().parent
SKIP_KERNEL = os.environ.get("LIBVIRT_NWFILTER_SKIP_KERNEL") == "1"
SKIP_LIBVIRT = os.environ.get("LIBVIRT_NWFILTER_SKIP_LIBVIRT") == "1"
# Under pytest-xdist (scripts/test runs ``-n N``) the tests of each of these directories stay on
# one worker: only one libvirtd can run per host (its tests share module-scoped daemons), and
# the package tests share one Debian root. Every other test goes wherever a worker is free.
SERIAL_DIRECTORIES = ("libvirt", "package")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath)).resolve()
        parts = path.relative_to(TESTS_DIR).parts if path.is_relative_to(TESTS_DIR) else ()
        if parts[:1] in (("kernel",), ("package",)):
            item.add_marker(pytest.mark.kernel)
        if parts[:1] == ("libvirt",):
            item.add_marker(pytest.mark.libvirt)
            item.add_marker(pytest.mark.kernel)
        if SKIP_KERNEL and item.get_closest_marker("kernel"):
            item.add_marker(pytest.mark.skip(reason="LIBVIRT_NWFILTER_SKIP_KERNEL=1"))
        elif SKIP_LIBVIRT and item.get_closest_marker("libvirt"):
            item.add_marker(pytest.mark.skip(reason="LIBVIRT_NWFILTER_SKIP_LIBVIRT=1"))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler by scope, a scope being one of :data:`SERIAL_DIRECTORIES` or
    else the test itself (its ``xdist_group`` markers do not work with this pytest)."""
    from xdist.scheduler import LoadScopeScheduling

    class SerialDirectories(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.split("/", 2)
            return parts[1] if len(parts) == 3 and parts[0] == "tests" and parts[1] in SERIAL_DIRECTORIES else nodeid

    return SerialDirectories(config, log)


def pytest_sessionfinish(session, exitstatus):
    leftovers = netlab.cleanup_all()
    if leftovers:
        print(f"\nnetlab: deleted leftover namespaces {leftovers}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(f"{message} (set LIBVIRT_NWFILTER_SKIP_KERNEL=1 to leave kernel tests out)",
                    pytrace=False)


@pytest.fixture(scope="session")
def kernel_env():
    """Check once that kernel tests can run here; fail (never skip) when they cannot."""
    _require(os.geteuid() == 0, "kernel tests need root")
    for tool in ("ip", "nft", "bridge", "sysctl", "ping", "strace"):
        _require(shutil.which(tool) is not None, f"kernel tests need {tool!r} (scripts/bootstrap)")
    reaped = netlab.reap_orphans()
    if reaped:
        print(f"netlab: deleted namespaces left by killed test runs: {reaped}")
    probe = netlab.new_ns_name("probe")
    try:
        netlab.create_namespace(probe)
        netlab.run_in(probe, ["nft", "list", "ruleset"])
        _require(Path("/proc/sys/net/bridge").is_dir() or
                 netlab.run(["modprobe", "br_netfilter"], check=False).returncode == 0,
                 "kernel tests need br_netfilter (/proc/sys/net/bridge)")
    except netlab.NetlabError as exc:
        _require(False, f"network namespaces or nft do not work: {exc}")
    finally:
        netlab.delete_namespace(probe)


@pytest.fixture
def lab(kernel_env):
    """A fresh lab (host namespace with br0); every namespace is deleted afterwards."""
    with netlab.Lab() as the_lab:
        yield the_lab


@pytest.fixture
def fresh_ns(kernel_env):
    """A factory of fresh, empty network namespaces (reference kernels); every one it made is
    deleted afterwards, also when the test fails."""
    made: list[str] = []

    def make() -> str:
        name = netlab.new_ns_name("ref")
        netlab.create_namespace(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        failures = []
        for name in made:
            try:
                netlab.delete_namespace(name)
            except Exception as error:  # noqa: BLE001 - delete the others, then report
                failures.append(error)
        if failures:
            raise failures[0]


@pytest.fixture(scope="module")
def libvirtd_hook():
    """Hook script text installed in /etc/libvirt/hooks/qemu.d before libvirtd starts.
    Override this fixture in a test module (e.g. with ``libvirtd.hook_wrapper(...)``)."""
    return None


@pytest.fixture(scope="module")
def libvirtd(kernel_env, libvirtd_hook):
    """A private libvirtd in its own namespace (one per module; stopped afterwards)."""
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.fail(f"libvirt tests need {tool!r} (scripts/bootstrap; set "
                        "LIBVIRT_NWFILTER_SKIP_LIBVIRT=1 to leave them out)", pytrace=False)
    daemon = libvirtd_mod.start_libvirtd(libvirtd_hook)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def libvirt_lab(libvirtd):
    """The libvirtd's lab, cleaned after the test: VMs, guests and bindings it added go."""
    lab = libvirtd.lab
    vms_before = set(lab.vms)
    guests_before = set(libvirtd.guests)
    try:
        yield lab
    finally:
        for port in libvirtd.bindings():
            libvirtd.delete_binding(port, missing_ok=True)
        for name in set(libvirtd.guests) - guests_before:
            libvirtd.remove_guest(name)
        for name in set(lab.vms) - vms_before:
            lab.remove_vm(name)


class SeededRandom(random.Random):
    """A :class:`random.Random` that remembers the seed it was made with."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.seed_value = seed


@pytest.fixture
def rng(request) -> SeededRandom:
    """The test's random schedule: seeded from ``NWFT_SEED`` when set (a replay), else at random."""
    replay = os.environ.get("NWFT_SEED")
    seed = int(replay) if replay else random.SystemRandom().randrange(1 << 30)
    print(f"random schedule seed {seed} (replay: NWFT_SEED={seed} pytest '{request.node.nodeid}')")
    request.node.user_properties.append(("seed", seed))
    return SeededRandom(seed)
