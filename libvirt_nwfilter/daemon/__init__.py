"""The resident service ``libvirt-nwfilterd`` (:mod:`.main`), its socket protocol (:mod:`.protocol`,
standard library only: the thin clients import it) and its parts."""
