"""Firewall backends: pure renderers from :mod:`libvirt_nwfilter.ir` to kernel transactions."""
