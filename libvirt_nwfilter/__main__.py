"""``python -m libvirt_nwfilter``: the same as the ``libvirt-nwfilter`` command."""

import sys

from .cli import main

sys.exit(main())
