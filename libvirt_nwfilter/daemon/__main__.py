"""``python -m libvirt_nwfilter.daemon``: the same as the ``libvirt-nwfilterd`` command."""

import sys

from .main import main

sys.exit(main())
