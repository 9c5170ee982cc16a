"""Where things live, which backend to use and the limits: defaults, the configuration file,
the environment, options (each overriding the one before).

The configuration file is ``CONFDIR/libvirt-nwfilter.conf`` of the configuration directory in
effect (``--confdir`` or ``LIBVIRT_NWFILTER_CONFDIR``), ``key = value`` lines, ``#`` comments:

=========================  =======================================================  ==========
key                        meaning                                                  default
=========================  =======================================================  ==========
``backend``                ``nftables`` or ``ebiptables``                           nftables
``lock-timeout``           seconds a CLI command waits for the host lock            60
``hook-lock-timeout``      seconds the libvirt hook waits for it (libvirt holds the 10
                           guest's job meanwhile and gives up other calls on it
                           after 30 s)
``max-rules-per-binding``  rules one binding may expand to (list parameters)        100000
``ipv6-learning-limit``    IPv6 addresses a port may learn (1 to 1024)              16
=========================  =======================================================  ==========
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from .errors import NwfilterError

log = logging.getLogger(__name__)

DEFAULT_CONFDIR = Path("/etc/libvirt-nwfilter")
DEFAULT_RUNDIR = Path("/run/libvirt-nwfilter")
BACKENDS = ("nftables", "ebiptables")
DEFAULT_BACKEND = "nftables"
CONFIG_FILE = "libvirt-nwfilter.conf"
DEFAULT_LOCK_TIMEOUT = 60.0
DEFAULT_HOOK_LOCK_TIMEOUT = 10.0
DEFAULT_MAX_RULES = 100_000
DEFAULT_IPV6_LEARNING_LIMIT, MAX_IPV6_LEARNING_LIMIT = 16, 1024
MAX_CONFIG_BYTES = 64 * 1024

_FILE_KEYS = {"backend": "backend", "lock-timeout": "lock_timeout", "hook-lock-timeout": "hook_lock_timeout",
              "max-rules-per-binding": "max_rules", "ipv6-learning-limit": "ipv6_learning_limit"}
_ENV_KEYS = {"LIBVIRT_NWFILTER_BACKEND": "backend", "LIBVIRT_NWFILTER_LOCK_TIMEOUT": "lock_timeout",
             "LIBVIRT_NWFILTER_HOOK_LOCK_TIMEOUT": "hook_lock_timeout",
             "LIBVIRT_NWFILTER_MAX_RULES": "max_rules"}


@dataclass(frozen=True)
class Config:
    confdir: Path = DEFAULT_CONFDIR
    rundir: Path = DEFAULT_RUNDIR
    backend: str = DEFAULT_BACKEND
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    hook_lock_timeout: float = DEFAULT_HOOK_LOCK_TIMEOUT
    max_rules: int = DEFAULT_MAX_RULES
    ipv6_learning_limit: int = DEFAULT_IPV6_LEARNING_LIMIT
    problem: str | None = None  # why the configuration is not usable (``load(strict=False)``)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, *, confdir: str | None = None,
             rundir: str | None = None, backend: str | None = None,
             lock_timeout: str | float | None = None, strict: bool = True) -> "Config":
        """The configuration in effect: defaults < the configuration file of the configuration
        directory in effect < ``LIBVIRT_NWFILTER_*`` variables < the given options.
        NwfilterError (one line naming the file or variable) for a value that is not valid;
        without ``strict`` the directories are kept and ``problem`` says what is wrong (the
        hook needs no configuration for guests it does not filter)."""
        env = os.environ if environ is None else environ
        config = cls(confdir=Path(confdir or env.get("LIBVIRT_NWFILTER_CONFDIR") or DEFAULT_CONFDIR),
                     rundir=Path(rundir or env.get("LIBVIRT_NWFILTER_RUNDIR") or DEFAULT_RUNDIR))
        try:
            settings = _read_file(config.confdir / CONFIG_FILE)
            settings.update({field: (value, name) for name, field in _ENV_KEYS.items() if (value := env.get(name))})
            options = {"backend": backend, "lock_timeout": lock_timeout}
            settings.update({field: (str(value), "option --" + field.replace("_", "-"))
                             for field, value in options.items() if value is not None})
            return replace(config, **{field: _value(field, text, where) for field, (text, where) in settings.items()})
        except NwfilterError as error:
            if strict:
                raise
            return replace(config, problem=str(error))

    def for_hook(self) -> "Config":
        """The configuration the libvirt hook works with (its own lock timeout)."""
        return replace(self, lock_timeout=self.hook_lock_timeout)


def _read_file(path: Path) -> dict[str, tuple[str, str]]:
    """field -> (text, where) from the configuration file (nothing when it does not exist)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise NwfilterError(f"cannot read {path}: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise NwfilterError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a configuration file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NwfilterError(f"{path}: not UTF-8 text") from None
    found: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        where = f"{path}:{number}"
        if not sep or not value:
            raise NwfilterError(f"{where}: expected 'key = value', not '{line}'")
        if key not in _FILE_KEYS:
            log.warning("%s: unknown setting '%s' ignored (known: %s)", where, key, ", ".join(_FILE_KEYS))
            continue
        found[_FILE_KEYS[key]] = (value, where)
    return found


def _value(field: str, text: str, where: str) -> object:
    if field == "backend":
        if text not in BACKENDS:
            raise NwfilterError(f"{where}: unknown backend '{text}' (expected {' or '.join(BACKENDS)})")
        return text
    if field == "max_rules":
        if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) < 1:
            raise NwfilterError(f"{where}: '{text}' is not a positive whole number of rules")
        return int(text)
    if field == "ipv6_learning_limit":
        if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 1 <= int(text) <= MAX_IPV6_LEARNING_LIMIT:
            raise NwfilterError(f"{where}: '{text}' is not a number of addresses (1 to {MAX_IPV6_LEARNING_LIMIT})")
        return int(text)
    try:
        seconds = float(text) if len(text) <= 20 else -1.0
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86400:
        raise NwfilterError(f"{where}: '{text}' is not a number of seconds (0 to 86400)")
    return seconds
