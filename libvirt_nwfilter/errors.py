"""Error types: every refusal the tool makes is one of these, printed as one line."""

from __future__ import annotations


class NwfilterError(Exception):
    """Base of every error this package raises on purpose (exit status 1)."""


class ValidationError(NwfilterError):
    """Input that does not follow the filter language; carries every problem found.

    Each problem is one line naming where it is (file, line, element, attribute) and what is
    wrong. ``str()`` joins them with ``; `` so the CLI can still print one line.
    """

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class UnknownFilterError(NwfilterError):
    """A filter name that is not defined."""


class ConflictError(NwfilterError):
    """A definition that clashes with the store (name/UUID conflicts, loops)."""


class InUseError(NwfilterError):
    """An operation refused because bindings still use the object."""


class MissingVariablesError(NwfilterError):
    """A filter tree needs variables (or list elements) that were not supplied; ``missing``
    names each access as printed (``IP``, ``A[3]``, ``B[@2]``)."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()):
        super().__init__(message)
        self.missing = missing


class ExpansionLimitError(NwfilterError):
    """A filter tree whose list parameters would expand to more rules than allowed."""


class BindingError(NwfilterError):
    """A binding that cannot be created, found or removed."""


class FirewallError(NwfilterError):
    """The kernel (through nft, ebtables or iptables) refused a change."""


class PartialChange(FirewallError):
    """A change whose outcome in the kernel is unknown or partial (a later step of a multi-step
    plan was refused, or a tool did not finish): the kernel may be neither before nor after it."""


class UnsupportedError(NwfilterError):
    """A rule the chosen backend cannot express faithfully."""
