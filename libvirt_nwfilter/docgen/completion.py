"""Bash completion for ``libvirt-nwfilter``, generated from its argument parser.

Verbs and options come from the parser; what a value is comes from its metavar or choices
(:func:`kind`): filter names (``libvirt-nwfilter -q list``) for ``FILTER``, bound ports
(``-q binding-list``) for ``PORTDEV``, guests (``virsh list``, with the line's ``--connect``
URI) for ``DOMAIN``, files and directories for ``FILE``/``PATH``/``...DIR``. The options given
before the verb (``--confdir``, ``--rundir``, ``--backend``) are passed on to the listing
commands, so the names offered are those of the store the line addresses. The script needs
nothing but bash (bash-completion loads it from its completions directory when present).
"""

from __future__ import annotations

import shlex

from . import Command, Option, command

FUNCTION = "_libvirt_nwfilter"


def kind(option: Option) -> str:
    """What the value of ``option`` is: ``filter``, ``port``, ``domain``, ``file``, ``dir``,
    ``uri``, ``choice:A B`` or ``none``; ``""`` for an option without value."""
    if option.metavar is None:
        return ""
    if option.choices:
        return "choice:" + " ".join(option.choices)
    name = option.metavar.upper()
    if name.endswith("DIR"):
        return "dir"
    return {"FILTER": "filter", "PORTDEV": "port", "DOMAIN": "domain", "FILE": "file",
            "PATH": "file", "URI": "uri"}.get(name, "none")


def _q(text: str) -> str:
    return shlex.quote(text)


def _option_cases(cmd: Command) -> list[str]:
    lines = []
    for verb in (cmd, *cmd.verbs):
        for option in verb.optionals:
            value = kind(option)
            if value:
                patterns = "|".join(_q(f"{verb.name} {flag}") for flag in option.flags)
                lines.append(f"        {patterns}) echo {_q(value)} ;;")
    return lines


def _options_cases(cmd: Command) -> list[str]:
    lines = []
    for verb in (cmd, *cmd.verbs):
        flags = " ".join(flag for option in verb.optionals for flag in option.flags)
        lines.append(f"        {_q(verb.name)}) echo {_q(flags)} ;;")
    return lines


def _argument_cases(cmd: Command) -> list[str]:
    lines = []
    for verb in cmd.verbs:
        kinds = [kind(option) for option in verb.positionals]
        if not kinds:
            continue
        repeat = "; repeat=1" if verb.positionals[-1].nargs in ("*", "+") else ""
        lines.append(f"        {_q(verb.name)}) kinds=({' '.join(map(_q, kinds))}){repeat} ;;")
    return lines


def script(prog: str, cmd: Command) -> str:
    verbs = " ".join(verb.name for verb in cmd.verbs)
    return f"""\
# bash completion for {prog}                                  -*- shell-script -*-
# Generated from its argument parser by "python3 -m libvirt_nwfilter.docgen": change the
# parser, not this file. Completes verbs, options, filter names, bound ports, guests, files.

# VERB OPTION: what the option's value is ("" for an option without value)
{FUNCTION}_option() {{
    case "$1 $2" in
{chr(10).join(_option_cases(cmd))}
    esac
}}

# VERB: its options ("" for the options before the verb)
{FUNCTION}_options() {{
    case $1 in
{chr(10).join(_options_cases(cmd))}
    esac
}}

# VERB INDEX: what the verb's positional argument number INDEX (from 0) is
{FUNCTION}_argument() {{
    local -a kinds=()
    local repeat=0
    case $1 in
{chr(10).join(_argument_cases(cmd))}
    esac
    if (($2 < ${{#kinds[@]}})); then
        echo "${{kinds[$2]}}"
    elif ((repeat)); then
        echo "${{kinds[-1]}}"
    fi
}}

# KIND WORD: the candidates, one a line; uses the caller's cmd, globals and uri
{FUNCTION}_values() {{
    case $1 in
        filter) compgen -W "$("$cmd" "${{globals[@]}}" -q list 2>/dev/null | awk '{{print $2}}')" -- "$2" ;;
        port) compgen -W "$("$cmd" "${{globals[@]}}" -q binding-list 2>/dev/null | awk '{{print $1}}')" -- "$2" ;;
        domain) compgen -W "$(virsh ${{uri:+-c "$uri"}} -q list --all --name 2>/dev/null)" -- "$2" ;;
        file) compgen -f -- "$2" ;;
        dir) compgen -d -- "$2" ;;
        choice:*) compgen -W "${{1#choice:}}" -- "$2" ;;
    esac
}}

{FUNCTION}() {{
    local line=${{COMP_LINE:0:COMP_POINT}} cur cmd verb="" pending="" uri="" kind value
    local -a words=() globals=()
    local i n=0
    read -r -a words <<<"$line"
    if [[ -z $line || $line == *[[:space:]] ]]; then words+=(""); fi
    cur=${{words[-1]}}
    cmd=${{words[0]}}
    for ((i = 1; i < ${{#words[@]}} - 1; i++)); do
        local w=${{words[i]}}
        if [[ -n $pending ]]; then
            [[ -z $verb ]] && globals+=("$w")
            [[ $pending == uri ]] && uri=$w
            pending=""
        elif [[ $w == --*=* ]]; then
            [[ -z $verb ]] && globals+=("$w")
            [[ $({FUNCTION}_option "$verb" "${{w%%=*}}") == uri ]] && uri=${{w#*=}}
        elif [[ $w == -* ]]; then
            pending=$({FUNCTION}_option "$verb" "$w")
            [[ -n $pending && -z $verb ]] && globals+=("$w")
        elif [[ -z $verb ]]; then
            verb=$w
        else
            ((n++))
        fi
    done
    if [[ -n $pending ]]; then
        kind=$pending
    elif [[ $cur == --*=* ]]; then
        kind=$({FUNCTION}_option "$verb" "${{cur%%=*}}")
        cur=${{cur#*=}}
    elif [[ $cur == -* ]]; then
        kind="choice:$({FUNCTION}_options "$verb")"
    elif [[ -z $verb ]]; then
        kind={_q("choice:" + verbs)}
    else
        kind=$({FUNCTION}_argument "$verb" "$n")
    fi
    if [[ $kind == file || $kind == dir ]]; then compopt -o filenames 2>/dev/null; fi
    COMPREPLY=()
    while IFS= read -r value; do COMPREPLY+=("$value"); done < <({FUNCTION}_values "$kind" "$cur")
    # bash replaces only the part of the word after its last ':' (COMP_WORDBREAKS)
    if [[ $cur == *:* && $COMP_WORDBREAKS == *:* ]]; then
        local head=${{cur%"${{cur##*:}}"}}
        COMPREPLY=("${{COMPREPLY[@]#"$head"}}")
    fi
}}
complete -F {FUNCTION} {prog}
"""


def cli_script() -> str:
    from .. import cli

    parser = cli.build_parser()
    return script(parser.prog, command(parser))
