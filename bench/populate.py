"""Pre-population child: ``python -m bench.populate CONF RUNDIR BACKEND START END FILTER`` binds
the benchmark's ports START..END to FILTER in one batch (``Service.bind_owner``), inside the lab
namespace, with the venv's Python (set-up, not timed)."""

from __future__ import annotations

import sys
from pathlib import Path

from libvirt_nwfilter.config import Config
from libvirt_nwfilter.model import Binding, FilterRef
from libvirt_nwfilter.service import Service

from .documents import prepop_ip, prepop_mac, prepop_port, prepop_uuid


def main(argv: list[str]) -> int:
    conf, rundir, backend, start, end, filter_name = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]
    service = Service(Config(Path(conf), Path(rundir), backend))
    bindings = [Binding(owner_name=f"bench-{i}", owner_uuid=prepop_uuid(i), portdev=prepop_port(i),
                        mac=prepop_mac(i), filterref=FilterRef(filter_name, (("IP", (prepop_ip(i),)),)))
                for i in range(start, end)]
    service.bind_owner(bindings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
