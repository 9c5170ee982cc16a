"""Manual pages in roff (man(7) macros) from the commands' help; see the package docstring.

:data:`PAGES` lists every page: ``libvirt-nwfilter(8)`` from the CLI's parser and
``libvirt-nwfilter-hook(8)`` from ``hook.HELP`` plus the install-hook verbs. A new console
script (the resident service, say) is one more entry built with :func:`command_page`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from .. import __version__
from . import Command, Option, Section, command, split_help

PACKAGE = "libvirt-nwfilter"
MANUAL = "System Administration"


def escape(text: str) -> str:
    """Text for a roff text line: backslashes, hyphen-minus (copy-pastable ``\\-``), and a
    leading control character neutralised."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _whatis(paragraph: str) -> str:
    """The first sentence, as the NAME line wants it: lower case start, no final period."""
    first = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0].rstrip(".")
    return first[:1].lower() + first[1:] if first[1:2].islower() else first


def _date() -> str:
    """The build's date (``SOURCE_DATE_EPOCH`` for reproducible builds), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch else None))


def header(name: str, section: int, source: str) -> list[str]:
    return [
        f'.\\" {name}({section}), generated from {source} by "python3 -m libvirt_nwfilter.docgen":',
        '.\\" change the source, not this file.',
        f'.TH {escape(name.upper())} {section} {_date()} "{escape(PACKAGE)} {__version__}" "{MANUAL}"',
        ".nh",  # no hyphenation: option names and paths stay whole
        ".ad l",
    ]


def paragraphs(texts: Iterable[str]) -> list[str]:
    lines: list[str] = []
    for text in texts:
        lines += [".PP", escape(text)]
    return lines


def sections(parts: Iterable[Section]) -> list[str]:
    """Help-text sections as ``.SH``: entries become tagged paragraphs."""
    lines: list[str] = []
    for part in parts:
        lines.append(f".SH {escape(part.heading.upper())}")
        for term, description in part.entries:
            lines += [".TP", bold(term), escape(description)]
        lines += paragraphs(part.paragraphs)
    return lines


def _option_tag(option: Option) -> str:
    if option.positional:
        return italic(option.usage_value())
    flags = ", ".join(bold(flag) for flag in option.flags)
    return f"{flags} {italic(option.usage_value())}" if option.metavar else flags


def options(items: Iterable[Option]) -> list[str]:
    lines: list[str] = []
    for option in items:
        lines += [".TP", _option_tag(option), escape(option.help)]
    return lines


def _is_help(option: Option) -> bool:
    return "--help" in option.flags


def synopsis(prog: str, verb: Command | None = None) -> str:
    """One usage line: ``prog [OPTION]... verb [--opt VALUE]... ARG...``."""
    words = [bold(prog), f"[{italic('OPTION')}]..."]
    if verb is None:
        return " ".join(words + [italic("COMMAND"), f"[{italic('ARGUMENT')}]..."])
    words.append(bold(verb.name))
    for option in verb.optionals:
        if _is_help(option):
            continue
        flag = bold(max(option.flags, key=len))
        words.append(f"[{flag} {italic(option.metavar)}]" if option.metavar else f"[{flag}]")
    words += [italic(option.usage_value()) for option in verb.positionals]
    return " ".join(words)


def _verb_lines(prog: str, verb: Command) -> list[str]:
    intro, _ = split_help(verb.description)
    if verb.summary and (not intro or intro[0] != verb.summary):
        intro.insert(0, verb.summary)
    lines = [f".SS {escape(verb.name)}", synopsis(prog, verb)]
    lines += paragraphs(intro)
    shown = [option for option in verb.options if not _is_help(option)]
    return lines + options(shown)


def command_page(prog: str, cmd: Command, see_also: Iterable[str] = ()) -> str:
    """The page of a command with verbs: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, COMMANDS, then
    the epilog's sections (exit status, environment, files, ...), SEE ALSO."""
    intro, _ = split_help(cmd.description)
    _, epilog = split_help(cmd.epilog)
    lines = header(prog, 8, "its argument parser")
    lines += [".SH NAME", f"{escape(prog)} \\- {escape(_whatis(intro[0]))}"]
    lines += [".SH SYNOPSIS", synopsis(prog)]
    lines += [".SH DESCRIPTION"] + paragraphs(intro)[1:]
    lines += [".SH OPTIONS"] + options(cmd.optionals)
    if cmd.verbs:
        lines += [".SH COMMANDS",
                  f"Options go before the command; every command also takes {bold('-h')}, "
                  f"{bold('--help')}."]
        for verb in cmd.verbs:
            lines += _verb_lines(prog, verb)
    lines += sections(epilog)
    lines += see_also_lines(see_also)
    return "\n".join(lines) + "\n"


def see_also_lines(pages: Iterable[str]) -> list[str]:
    """``.BR name (section),`` lines for references written ``name(section)``."""
    refs = [re.fullmatch(r"(.+)\((\w+)\)", page).groups() for page in pages]
    if not refs:
        return []
    lines = [".SH SEE ALSO"]
    for index, (name, section) in enumerate(refs):
        lines.append(f".BR {escape(name)} ({section}){',' if index < len(refs) - 1 else ''}")
    return lines


def hook_page() -> str:
    """``libvirt-nwfilter-hook(8)``: ``hook.HELP``, then the install-hook and uninstall-hook verbs."""
    from .. import cli, hook
    from ..install import DEFAULT_HOOKS_DIR

    intro, parts = split_help(hook.HELP)
    usage, intro = intro[0].removeprefix("usage: "), intro[1:]
    words = usage.split()
    parser = cli.build_parser()
    verbs = [v for v in command(parser).verbs if v.name in ("install-hook", "uninstall-hook")]
    lines = header("libvirt-nwfilter-hook", 8, "libvirt_nwfilter.hook.HELP and the install-hook verbs")
    lines += [".SH NAME", f"libvirt\\-nwfilter\\-hook \\- {escape(_whatis(intro[0]))}"]
    lines += [".SH SYNOPSIS",
              " ".join(bold(w) if i == 0 else italic(w) if w.isupper() else escape(w) for i, w in enumerate(words))]
    lines += [".SH DESCRIPTION"] + paragraphs(intro)
    lines += sections(parts)
    lines += [".SH INSTALLATION",
              f"libvirtd runs every executable in {bold(f'{DEFAULT_HOOKS_DIR}/qemu.d/')} as a qemu hook. "
              f"The hook is installed there (and removed) with:"]
    for verb in verbs:
        lines += _verb_lines(parser.prog, verb)
    lines += see_also_lines(["libvirt-nwfilter(8)", "virsh(1)", "libvirtd(8)"])
    return "\n".join(lines) + "\n"


def cli_page() -> str:
    from .. import cli

    parser = cli.build_parser()
    return command_page(parser.prog, command(parser),
                        ["libvirt-nwfilter-hook(8)", "virsh(1)", "nft(8)", "ebtables(8)", "iptables(8)"])


def daemon_page() -> str:
    from ..daemon import main

    parser = main.build_parser()
    return command_page(parser.prog, command(parser), ["libvirt-nwfilter(8)", "libvirt-nwfilter-hook(8)", "systemctl(1)"])


@dataclass(frozen=True)
class Page:
    name: str
    section: int
    render: Callable[[], str]

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


PAGES = (
    Page("libvirt-nwfilter", 8, cli_page),
    Page("libvirt-nwfilter-hook", 8, hook_page),
    Page("libvirt-nwfilterd", 8, daemon_page),
)
