"""libvirt's network filters (nwfilter) for QEMU/KVM guests, outside libvirtd."""

__version__ = "0.1.0"
