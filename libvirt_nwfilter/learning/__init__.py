"""IP address learning (semantics.md §10): a binding whose filter tree needs ``IP``, given no
value, with ``CTRL_IP_LEARNING`` ``any`` (the default) or ``dhcp``.

Pure modules (no I/O): :mod:`.spec` (modes, parameters, the learned ``IP`` values),
:mod:`.rules` (the learning-time rules, as a ruleset IR), :mod:`.record` (the learned state in
a binding record), :mod:`.frames` (Ethernet/VLAN/ARP/IPv4/UDP/DHCP parsing), :mod:`.snoop`
(what an observed frame teaches, lease bookkeeping, rate limiting) and :mod:`.bpf` (the kernel
socket filters). The resident service watches the ports (``daemon/learner.py``) and applies
what it learns through :meth:`Service.update_learned <libvirt_nwfilter.service.Service>`.
"""
