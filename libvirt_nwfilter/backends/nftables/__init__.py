"""nftables backend (the default): :class:`~libvirt_nwfilter.ir.PortRuleset` → one ``nft -f -``.

=============== =====================================================================
module          what it holds (all pure; only ``executor.py`` runs ``nft``)
=============== =====================================================================
``names``       tables, maps, per-port chain and set names and how they read back, mark ids
``render``      one IR rule → the text of one nft rule
``plan``        port changes → one batch (ids, generations, the ensure block), base chains,
                teardown and kernel probes
``listing``     the survey (``nft -j list table``) → a view of our tables; per-port inventory
``digest``      per-port digests of a view (verify, reapply, reconnect)
``backend``     :class:`NftablesBackend`: the ``Backend`` contract over the modules above
=============== =====================================================================
"""

from .backend import NftablesBackend
from .plan import probe_bridge_conntrack_text, probe_l2_reject_text

__all__ = ["NftablesBackend", "probe_bridge_conntrack_text", "probe_l2_reject_text"]
