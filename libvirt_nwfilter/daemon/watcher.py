"""The watcher process: IP address learning, libvirt events and self-healing, forked by the
request server before any thread exists; it has threads of its own and never forks (processes
it runs are spawned by the executor).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from ..config import Config
from .status import Report

log = logging.getLogger(__name__)


class Watcher:
    def __init__(self, config: Config, options: argparse.Namespace, started: float):
        self.config = config
        self.options = options
        self.started = started
        self.service_pid = os.getpid()

    def run(self) -> int:
        """Body of the watcher process; returns at SIGTERM."""
        stop = threading.Event()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        report = Report(self.config.rundir, self.service_pid, self.started)
        report.update()
        from .learner import Learner

        workers = [Learner(self.config, report)]
        if not self.options.no_heal:
            from .healing import make_healer

            workers.append(make_healer(self.config, report, self.options.heal_interval))
        if not self.options.no_libvirt:
            from .events import Events

            workers.append(Events(self.config, report, self.options.connect))
        for worker in workers:
            worker.start()
        while not stop.wait(3600):
            pass
        for worker in workers:
            worker.stop()
        return 0
