"""Manual pages and shell completion generated from the commands' own help (never kept by hand).

The source of truth is what ``--help`` prints: the ``argparse`` parser of each command (verbs,
options, descriptions, epilog) and, for the hook, :data:`libvirt_nwfilter.hook.HELP`. This
package reads them into a small neutral form (:class:`Command`, :class:`Option`,
:class:`Section`) that :mod:`.manpage` renders as roff and :mod:`.completion` as a bash
completion script, so the page, the completion and ``--help`` cannot disagree.

Help text layout (the ``RawDescriptionHelpFormatter`` text of descriptions, epilogs and
``hook.HELP``): paragraphs separated by blank lines; a line ``heading:`` at column 0 starts a
section; inside a section an entry is ``  TERM  DESCRIPTION`` (two spaces at least between),
continued by lines indented deeper; other indented lines are prose.

Nothing here is imported by the CLI or the hook: generating costs their start-up nothing.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

_ENTRY = re.compile(r"^  (\S(?:.*?\S)?)\s{2,}(\S.*)$")


@dataclass(frozen=True)
class Option:
    """One argument of a command: an option (``flags``) or a positional (no flags)."""

    flags: tuple[str, ...]
    metavar: str | None  # None: an option that takes no value
    nargs: object
    help: str
    choices: tuple[str, ...] = ()

    @property
    def positional(self) -> bool:
        return not self.flags

    def usage_value(self) -> str:
        """The value as usage shows it: ``FILE``, ``[DOMAIN ...]``, ``{a,b}``."""
        name = self.metavar or ""
        if self.nargs == "?":
            return f"[{name}]"
        if self.nargs == "*":
            return f"[{name} ...]"
        if self.nargs == "+":
            return f"{name} [{name} ...]"
        return name


@dataclass(frozen=True)
class Command:
    """A command or one of its verbs: what ``--help`` says about it."""

    name: str  # the verb ('' for the command itself)
    summary: str
    description: str
    epilog: str
    options: tuple[Option, ...]
    verbs: tuple["Command", ...] = ()

    @property
    def optionals(self) -> tuple[Option, ...]:
        return tuple(o for o in self.options if not o.positional)

    @property
    def positionals(self) -> tuple[Option, ...]:
        return tuple(o for o in self.options if o.positional)


@dataclass
class Section:
    """A ``heading:`` block of help text: entries (term, description) or prose paragraphs."""

    heading: str
    entries: list[tuple[str, str]] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)


def _expand(action: argparse.Action, prog: str) -> str:
    """``action.help`` with ``%(default)s`` and friends filled in, as argparse prints it."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if action.choices is not None:
        params["choices"] = ", ".join(map(str, action.choices))
    return text % params


def _option(action: argparse.Action, prog: str) -> Option:
    choices = tuple(map(str, action.choices)) if action.choices else ()
    if action.option_strings and action.nargs == 0:
        metavar = None
    elif action.metavar is not None:
        metavar = str(action.metavar)
    elif choices:
        metavar = "{" + ",".join(choices) + "}"
    else:
        metavar = action.dest.upper() if action.option_strings else action.dest
    return Option(tuple(action.option_strings), metavar, action.nargs, _expand(action, prog), choices)


def command(parser: argparse.ArgumentParser, name: str = "", summary: str = "") -> Command:
    """The command ``parser`` describes, with its verbs (sub-parsers), recursively."""
    options: list[Option] = []
    verbs: list[Command] = []
    for action in parser._actions:  # argparse keeps no public list of its arguments
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
            verbs += [command(sub, verb, summaries[verb] or "")
                      for verb, sub in action.choices.items() if verb in summaries]
        elif action.help is not argparse.SUPPRESS:
            options.append(_option(action, parser.prog))
    return Command(name, summary, parser.description or "", parser.epilog or "", tuple(options), tuple(verbs))


def split_help(text: str) -> tuple[list[str], list[Section]]:
    """Help text as (paragraphs before the first heading, sections); see the module docstring."""
    intro: list[str] = []
    sections: list[Section] = []
    prose: list[str] = []
    entry_open = False  # deeper-indented lines continue the last entry

    def flush() -> None:
        if prose:
            (sections[-1].paragraphs if sections else intro).append(" ".join(prose))
            prose.clear()

    at_paragraph_start = True
    for line in text.strip("\n").splitlines():
        indent = len(line) - len(line.lstrip(" "))
        entry = _ENTRY.match(line)
        if not line.strip():
            flush()
            entry_open = False
        elif indent == 0 and line.endswith(":") and at_paragraph_start:
            sections.append(Section(line[:-1]))
        elif sections and indent == 2 and not prose and (entry or " " not in line.strip()):
            sections[-1].entries.append(entry.groups() if entry else (line.strip(), ""))
            entry_open = True
        elif indent > 2 and entry_open and not prose:
            term, description = sections[-1].entries[-1]
            sections[-1].entries[-1] = (term, f"{description} {line.strip()}".strip())
        else:
            prose.append(line.strip())
            entry_open = False
        at_paragraph_start = not line.strip()
    flush()
    return intro, sections
