"""Benchmark of libvirt-nwfilter, with libvirt's own nwfilter engine as the reference.

Run it through ``bench/run`` (as root): that script bootstraps ``.venv`` and runs
``python -m bench`` with ``.venv/bin/python`` (method and figures: bench/README.md).

================ =====================================================================
module           what it holds
================ =====================================================================
``__main__``     the arguments, the checks, one run, always cleaned up, then the report
``scenarios``    what is measured and in which order; the lab, our engine, libvirt's
``measure``      processes spawned inside a namespace and timed; measurements; the machine
``documents``    the ports, addresses and XML documents the scenarios use
``populate``     the child that binds hundreds of ports in one batch (set-up)
``profiling``    ``--profile``: import times, cProfile, strace phases
``service``      the resident service in the lab: requests through it, flush repair, hot-plug
``report``       goals, the table, the plot, results.json (and ``--replot``)
================ =====================================================================
"""
