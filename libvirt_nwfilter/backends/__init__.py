"""Firewall backends: pure renderers from :mod:`libvirt_nwfilter.ir` to kernel transactions.

``base`` is the contract every backend keeps and the plan the executor runs; ``text`` the value
spellings both share; ``nftables`` and ``ebiptables`` are the backends, one package each.
"""
