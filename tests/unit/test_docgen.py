"""Manual pages and bash completion generated from the parsers (libvirt_nwfilter.docgen)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_nwfilter import __version__, cli, hook
from libvirt_nwfilter.docgen import __main__ as docgen_main
from libvirt_nwfilter.docgen import manpage, split_help

REPO = Path(__file__).resolve().parents[2]
USER_FILTER = "<filter name='site-web' chain='root'><rule action='accept' direction='in' priority='500'>" \
              "<tcp dstportstart='80'/></rule></filter>"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The verbs, read from argparse directly (not through docgen's walker)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def roff_flag(flag: str) -> str:
    return flag.replace("-", "\\-")


def test_cli_page_documents_every_verb_and_every_option():
    page = manpage.cli_page()
    parser = cli.build_parser()
    for verb, sub in subparsers(parser).items():
        assert f"\n.SS {roff_flag(verb)}\n" in page, verb
        for action in sub._actions:
            if action.help is not argparse.SUPPRESS:
                for flag in action.option_strings:
                    assert f"\\fB{roff_flag(flag)}\\fR" in page, (verb, flag)
    for action in parser._actions:
        for flag in action.option_strings:
            assert f"\\fB{roff_flag(flag)}\\fR" in page, flag
    assert "--python" not in page.replace("\\-", "-")  # suppressed in --help, hidden here too
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS", "ENVIRONMENT",
                    "FILES", "SEE ALSO"):
        assert f"\n.SH {heading}\n" in page


def test_cli_page_carries_the_help_texts():
    page = manpage.cli_page()
    for term, description in [entry for section in split_help(cli.EPILOG)[1] for entry in section.entries]:
        assert f".TP\n\\fB{manpage.escape(term)}\\fR\n{manpage.escape(description)}\n" in page
    assert manpage.escape("Prints the canonical form, the same as 'virsh nwfilter-dumpxml' prints") in page


def test_hook_page_documents_every_operation_and_the_install_verbs():
    _, sections = split_help(hook.HELP)
    operations = {name.strip() for term, _ in sections[0].entries for name in term.split(",")}
    assert sections[0].heading == "operations"
    assert set(hook.OPERATIONS) <= operations
    page = manpage.hook_page()
    assert "\n.SS install\\-hook\n" in page and "\n.SS uninstall\\-hook\n" in page
    assert "\\fB\\-\\-hooks\\-dir\\fR \\fIDIR\\fR" in page
    assert f"\\fB{manpage.escape(hook.LOG_FILE_VARIABLE)}\\fR" in page


@pytest.mark.parametrize("page", manpage.PAGES, ids=lambda page: page.name)
def test_pages_render_without_warnings_and_parse_for_whatis(tmp_path, page):
    path = tmp_path / page.filename
    path.write_text(page.render())
    shown = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
                           capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80"})
    assert shown.returncode == 0 and shown.stderr == ""
    whatis = subprocess.run(["lexgrog", str(path)], capture_output=True, text=True)
    assert whatis.returncode == 0 and f'"{page.name} - ' in whatis.stdout


def test_page_date_follows_source_date_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert '.TH LIBVIRT\\-NWFILTER 8 2023-11-14 "libvirt\\-nwfilter ' in manpage.cli_page()


def test_escape_neutralises_roff_syntax():
    assert manpage.escape(".SH x") == "\\&.SH x"
    assert manpage.escape("'quoted") == "\\&'quoted"
    assert manpage.escape("a\\b --c") == "a\\eb \\-\\-c"


def test_split_help_reads_entries_continuations_and_prose():
    text = ("Intro line one\nline two.\n\nfirst:\n  TERM  its text\n        continued\n"
            "  /a/very/long/term\n        described below\n\nsecond:\n  Some prose  with  spaces? no:\n"
            "  just prose here.\n")
    intro, sections = split_help(text)
    assert intro == ["Intro line one line two."]
    assert [s.heading for s in sections] == ["first", "second"]
    assert sections[0].entries == [("TERM", "its text continued"), ("/a/very/long/term", "described below")]


def test_hook_help_is_printed_only_for_a_lone_option(tmp_path):
    env = {"PATH": os.environ["PATH"], "LIBVIRT_NWFILTER_CONFDIR": str(tmp_path / "conf"),
           "LIBVIRT_NWFILTER_RUNDIR": str(tmp_path / "run")}
    shown = subprocess.run([sys.executable, "-m", "libvirt_nwfilter.hook", "--help"], capture_output=True,
                           text=True, env=env)
    assert (shown.returncode, shown.stdout) == (0, hook.HELP + "\n")
    guest = subprocess.run([sys.executable, "-m", "libvirt_nwfilter.hook", "--help", "prepare", "begin", "-"],
                           input="<domain><name>--help</name><uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>"
                                 "</domain>", capture_output=True, text=True, env=env)
    assert (guest.returncode, guest.stdout) == (0, "")  # a guest named --help is a guest


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"libvirt-nwfilter {__version__}\n"


def test_package_versions_agree():
    changelog = subprocess.run(["dpkg-parsechangelog", "-l", REPO / "debian/changelog", "-S", "Version"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert changelog == __version__  # a native package: no Debian revision
    assert importlib.metadata.version("libvirt-nwfilter") == __version__


def test_docgen_writes_pages_and_completion(tmp_path, capsys):
    assert docgen_main.main([str(tmp_path)]) == 0
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "bash-completion/completions/libvirt-nwfilter", "man/man8/libvirt-nwfilter-hook.8",
        "man/man8/libvirt-nwfilter.8", "man/man8/libvirt-nwfilterd.8"]
    capsys.readouterr()
    assert docgen_main.main(["--print", "completion"]) == 0
    assert capsys.readouterr().out == (tmp_path / "bash-completion/completions/libvirt-nwfilter").read_text()


# ------------------------------------------------------------------------------------------
# Bash completion, with the real command of this environment


@pytest.fixture
def completion(tmp_path):
    script = tmp_path / "completion.bash"
    from libvirt_nwfilter.docgen.completion import cli_script

    script.write_text(cli_script())
    confdir = tmp_path / "conf"
    (confdir / "filters").mkdir(parents=True)
    (confdir / "filters/site-web.xml").write_text(USER_FILTER)
    (tmp_path / "work").mkdir()
    (tmp_path / "work/binding.xml").write_text("")
    (tmp_path / "work/bindings").mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LIBVIRT_NWFILTER_RUNDIR": str(tmp_path / "run"), "HOME": str(tmp_path)}

    def complete(line: str) -> list[str]:
        code = (f'source {script}; COMP_LINE=$1; COMP_POINT=${{#COMP_LINE}}; _libvirt_nwfilter; '
                'printf "%s\\n" "${COMPREPLY[@]}"')
        proc = subprocess.run(["bash", "-c", code, "bash", line.replace("CONFDIR", str(confdir))],
                              capture_output=True, text=True, env=env, cwd=tmp_path / "work", check=True)
        return sorted(word for word in proc.stdout.splitlines() if word)

    return complete


def test_completion_offers_verbs_and_options(completion):
    verbs = sorted(subparsers(cli.build_parser()))
    assert completion("libvirt-nwfilter ") == verbs
    assert completion("libvirt-nwfilter binding-d") == ["binding-delete", "binding-dumpxml"]
    assert completion("libvirt-nwfilter --ba") == ["--backend"]
    assert completion("libvirt-nwfilter --backend ") == ["ebiptables", "nftables"]
    assert completion("libvirt-nwfilter --backend=n") == ["nftables"]
    assert completion("libvirt-nwfilter --backend nftables -q li") == ["list"]
    assert completion("libvirt-nwfilter install-hook --") == ["--help", "--hooks-dir", "--log-file", "--no-service",
                                                              "--single-file", "--unit-dir"]


def test_completion_offers_filter_names_of_the_addressed_store(completion):
    assert completion("libvirt-nwfilter dumpxml clean") == ["clean-traffic", "clean-traffic-dualstack",
                                                          "clean-traffic-gateway"]
    assert completion("libvirt-nwfilter --confdir CONFDIR undefine si") == ["site-web"]
    assert completion("libvirt-nwfilter --confdir=CONFDIR edit si") == ["site-web"]
    assert completion("libvirt-nwfilter undefine si") == []  # not in the default store
    # a MAC's colons are word breaks for bash: the filter is still the third argument
    assert completion("libvirt-nwfilter --confdir CONFDIR attach-filter guest 52:54:00:12:34:56 si") == ["site-web"]


def test_completion_offers_files_and_directories(completion):
    assert completion("libvirt-nwfilter define bin") == ["binding.xml", "bindings"]
    assert completion("libvirt-nwfilter install-hook --hooks-dir bin") == ["bindings"]
    assert completion("libvirt-nwfilter binding-list ") == []
