"""What the kernel supports, probed once per boot and cached in the run directory."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from . import executor
from .backends.base import Backend
from .config import Config
from .errors import NwfilterError
from .files import write_atomically

log = logging.getLogger(__name__)

BRIDGE_NF_SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


@dataclass(frozen=True)
class Capabilities:
    """Kernel facts that decide how the backends render."""

    boot: str
    bridge_conntrack: bool  # ct expressions in bridge tables (nf_conntrack_bridge)
    bridge_reject: bool  # reject in bridge tables

    @property
    def conntrack_mode(self) -> str:
        return "bridge" if self.bridge_conntrack else "inet"


def _boot_key() -> str:
    return f"{executor.read_text('/proc/sys/kernel/random/boot_id')}/{executor.kernel_release()}"


def _probe(text: str) -> bool:
    ok, _ = executor.query(("nft", "-c", "-f", "-"), text)
    return ok


def capabilities(rundir: Path) -> Capabilities:
    """The cached capabilities of this boot, probing the kernel when there are none yet."""
    from .backends import nftables

    path = Path(rundir) / "probe.json"
    boot = _boot_key()
    try:
        cached = Capabilities(**json.loads(path.read_text(encoding="utf-8")))
        if cached.boot == boot:
            return cached
    except (OSError, ValueError, TypeError):
        pass
    found = Capabilities(boot, _probe(nftables.probe_bridge_conntrack_text()),
                         _probe(nftables.probe_l2_reject_text()))
    log.info("kernel probed: bridge conntrack %s, bridge reject %s", found.bridge_conntrack, found.bridge_reject)
    try:
        write_atomically(path, json.dumps(asdict(found)) + "\n")
    except NwfilterError as error:
        log.warning("probe results not cached: %s", error)
    return found


def make_backend(config: Config) -> Backend:
    """The configured backend, set up for this kernel."""
    if config.backend == "ebiptables":
        from .backends.ebiptables import EbiptablesBackend

        return EbiptablesBackend()
    from .backends.nftables import NftablesBackend

    caps = capabilities(config.rundir)
    return NftablesBackend(conntrack=caps.conntrack_mode, l2_reject=caps.bridge_reject)
