"""The ``ebiptables`` compatibility backend: libvirt's ebtables/iptables layout, our own names.

Everything here turns :class:`~libvirt_nwfilter.ir.PortRuleset` values into a
:class:`~libvirt_nwfilter.backends.base.Plan` of ``*-restore --noflush`` invocations (argv and
stdin) and per-port records, and reads ``*-save`` outputs it is given. Nothing here runs a
process or reads the system.

=============== =====================================================================
module          what it holds
=============== =====================================================================
``names``       chain names and prefixes, the global chains, links, port names
``tools``       ebtables, iptables, ip6tables: one frozen description each
``render``      one IR rule → ebtables or iptables arguments
``plan``        port changes → the two-phase plan (apply, commit, rollback) and records
``listing``     ``*-save`` outputs → what the kernel holds; inventory, purge, global repair
``digest``      per-port digests of a survey (verify, reapply, reconnect)
``backend``     :class:`EbiptablesBackend`: the ``Backend`` contract over the modules above
=============== =====================================================================
"""

from .backend import EbiptablesBackend

__all__ = ["EbiptablesBackend"]
