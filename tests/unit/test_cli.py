"""The filter verbs of the command line (libvirt-facts.md §3): output, messages, exit codes."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from libvirt_nwfilter import cli
from libvirt_nwfilter.store import FilterStore

ROOT = Path(__file__).resolve().parents[2]
OWN_FILTERS = ("clean-traffic-dualstack", "no-dhcpv6-server", "no-ipv6-ra", "no-nd-spoofing")
U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
GOOD = f"<filter name='mine' chain='ipv4'><uuid>{U1}</uuid><rule action='drop' direction='in'/></filter>"


@pytest.fixture
def env(tmp_path, monkeypatch):
    confdir = tmp_path / "conf"
    monkeypatch.setenv("LIBVIRT_NWFILTER_CONFDIR", str(confdir))
    monkeypatch.setenv("LIBVIRT_NWFILTER_RUNDIR", str(tmp_path / "run"))
    for name in ("LIBVIRT_NWFILTER_BACKEND", "VISUAL", "EDITOR"):
        monkeypatch.delenv(name, raising=False)
    return confdir


@pytest.fixture
def run(env, capsys):
    def runner(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return runner


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def one_error_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def table(headers, rows, quiet=False) -> str:
    """libvirt-facts §3.1, written out independently of the CLI's formatter."""
    shown = rows if quiet else [headers, *rows]
    widths = [max(len(r[i]) for r in shown) for i in range(len(headers))]
    lines = []
    for row in shown:
        lines.append("".join(" " + cell + " " * (widths[i] - len(cell) + 2) if i < len(row) - 1 else " " + cell
                             for i, cell in enumerate(row)))
    if not quiet:
        lines.insert(1, "-" * sum(w + 3 for w in widths))
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------
# list


def test_list_builtins_exact(run, env):
    code, out, err = run("list")
    assert (code, err) == (0, "")
    filters = FilterStore(env).all()
    rows = [(f.uuid, name, "builtin (libvirt-nwfilter)" if name in OWN_FILTERS else "builtin")
            for name, f in filters.items()]
    assert out == table(("UUID", "Name", "Source"), rows)
    lines = out.splitlines()
    assert len(lines) == 2 + 24 + 4
    assert lines[0] == " UUID" + " " * 34 + " Name" + " " * 21 + " Source"  # width + 2 after each cell
    assert lines[1] == "-" * ((36 + 3) + (23 + 3) + (26 + 3))
    assert lines[2].startswith(f" {filters['allow-arp'].uuid}   allow-arp ")
    assert [line.split()[1] for line in lines[2:]] == sorted(filters, key=str.lower)


def test_list_sources_and_case_insensitive_order(run, env, tmp_path):
    for name in ("Zeta", "alpha", "Beta"):
        assert run("define", write(tmp_path, f"{name}.xml", f"<filter name='{name}'/>"))[0] == 0
    assert run("define", write(tmp_path, "o.xml", "<filter name='allow-arp' chain='arp'/>"))[0] == 0
    code, out, _ = run("list")
    assert code == 0
    rows = [line.split(None, 2) for line in out.splitlines()[2:]]
    names = [r[1] for r in rows]
    assert names == sorted(names, key=str.lower)
    assert names.index("alpha") < names.index("Beta") < names.index("Zeta")
    source = {r[1]: r[2].strip() for r in rows}
    assert source["alpha"] == "user" and source["allow-dhcp"] == "builtin"
    assert source["allow-arp"] == "user (overrides builtin)"
    assert {source[name] for name in OWN_FILTERS} == {"builtin (libvirt-nwfilter)"}
    store = FilterStore(env)
    expected = [(f.uuid, n, store.origin(n).value) for n, f in store.all().items()]
    assert out == table(("UUID", "Name", "Source"), expected)
    assert out.splitlines()[1] == "-" * ((36 + 3) + (23 + 3) + (26 + 3))


def test_list_quiet(run, env):
    code, out, _ = run("-q", "list")
    assert code == 0
    rows = [(f.uuid, n, "builtin (libvirt-nwfilter)" if n in OWN_FILTERS else "builtin")
            for n, f in FilterStore(env).all().items()]
    assert out == table(("UUID", "Name", "Source"), rows, quiet=True)
    assert not out.startswith(" UUID") and "---" not in out


def test_list_skips_unreadable_user_files(run, env, tmp_path):
    run("define", write(tmp_path, "f.xml", GOOD))
    (env / "filters" / "broken.xml").write_text("<filter name='broken'>")
    code, out, _ = run("list")
    assert code == 0
    names = [line.split()[1] for line in out.splitlines()[2:]]
    assert "mine" in names and "broken" not in names and len(names) == 24 + 4 + 1
    code, out, err = run("dumpxml", "broken")
    assert code == 1 and out == "" and "broken.xml" in one_error_line(err)


def test_confdir_option_overrides_environment(run, env, tmp_path):
    other = tmp_path / "other"
    assert run("--confdir", str(other), "define", write(tmp_path, "f.xml", GOOD))[0] == 0
    assert (other / "filters" / "mine.xml").is_file()
    assert not (env / "filters" / "mine.xml").exists()
    assert run("dumpxml", "mine")[0] == 1


# --------------------------------------------------------------------------------------------
# define / undefine / dumpxml


def test_define_and_dumpxml(run, env, tmp_path):
    path = write(tmp_path, "f.xml", GOOD)
    code, out, err = run("define", path)
    assert (code, out, err) == (0, f"Network filter mine defined from {path}\n", "")
    assert (env / "filters" / "mine.xml").is_file()
    code, out, err = run("dumpxml", "mine")
    want = (f"<filter name='mine' chain='ipv4' priority='-700'>\n  <uuid>{U1}</uuid>\n"
            "  <rule action='drop' direction='in' priority='500'/>\n</filter>\n")
    assert (code, out, err) == (0, want, "")
    assert run("dumpxml", U1) == (0, want, "")
    assert run("dumpxml", U1.upper()) == (0, want, "")


def test_dumpxml_builtin_is_canonical(run):
    code, out, _ = run("dumpxml", "clean-traffic")
    assert code == 0
    text = (ROOT / "libvirt_nwfilter" / "filters" / "clean-traffic.xml").read_text()
    lines = text.splitlines(keepends=True)
    assert out.splitlines(keepends=True)[0] == lines[0]
    assert out.splitlines(keepends=True)[1].startswith("  <uuid>")
    assert out.splitlines(keepends=True)[2:] == lines[1:]


def test_define_from_stdin(run, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(GOOD.encode())))
    code, out, _ = run("define", "-")
    assert (code, out) == (0, "Network filter mine defined from -\n")


def test_redefine_keeps_uuid(run, tmp_path):
    run("define", write(tmp_path, "a.xml", GOOD))
    code, _, _ = run("define", write(tmp_path, "b.xml", "<filter name='mine'/>"))
    assert code == 0
    assert f"<uuid>{U1}</uuid>" in run("dumpxml", "mine")[1]


@pytest.mark.parametrize("text, words", [
    ("<filter name='bad' chain='nope'/>", ["nope"]),
    ("<filter name='bad'><rule action='drop' direction='in'><tcp srcipaddr='10.1'/></rule></filter>", ["10.1"]),
    ("<filter name='bad'><rule action='drop' direction='in'><tcp comment='a&#10;b' srcipaddr='x'/></rule></filter>",
     ["'x'"]),
    ("not xml at all", ["malformed XML"]),
    ("<filterbinding/>", ["<filter>"]),
    (f"<filter name='other'><uuid>{U1}</uuid></filter>", ["same UUID", "mine"]),
    (f"<filter name='mine'><uuid>{U2}</uuid></filter>", ["already exists", U1]),
    ("<filter name='mine'><filterref filter='mine'/></filter>", ["loop"]),
    ("<filter name='a'><rule action='x' direction='y' priority='z'/></filter>", ["'x'", "'y'", "'z'"]),
])
def test_refused_define_leaves_store_untouched(run, env, tmp_path, text, words):
    run("define", write(tmp_path, "good.xml", GOOD))
    before = snapshot(env)
    code, out, err = run("define", write(tmp_path, "bad.xml", text))
    assert code == 1 and out == ""
    one_error_line(err)
    for word in words:
        assert word in err
    assert snapshot(env) == before


def test_define_missing_file(run, env, tmp_path):
    code, out, err = run("define", str(tmp_path / "nope.xml"))
    assert code == 1 and out == ""
    assert "nope.xml" in one_error_line(err)
    code, _, err = run("define", str(tmp_path))
    assert code == 1
    one_error_line(err)
    assert snapshot(env) == {}


def test_undefine(run, env, tmp_path):
    run("define", write(tmp_path, "f.xml", GOOD))
    assert run("undefine", "mine") == (0, "Network filter mine undefined\n", "")
    assert not (env / "filters" / "mine.xml").exists()
    code, out, err = run("undefine", "mine")
    assert code == 1 and out == "" and "mine" in one_error_line(err)


def test_undefine_by_uuid(run, tmp_path):
    run("define", write(tmp_path, "f.xml", GOOD))
    assert run("undefine", U1) == (0, "Network filter mine undefined\n", "")


def test_undefine_builtin_refused(run, env):
    code, out, err = run("undefine", "clean-traffic")
    assert code == 1 and out == ""
    assert "clean-traffic" in one_error_line(err)
    assert snapshot(env) == {}


def test_undefine_override_restores_builtin(run, tmp_path):
    original = run("dumpxml", "allow-arp")[1]
    run("define", write(tmp_path, "o.xml", "<filter name='allow-arp' chain='arp'/>"))
    assert run("dumpxml", "allow-arp")[1] != original
    assert run("undefine", "allow-arp")[0] == 0
    assert run("dumpxml", "allow-arp")[1] == original


def test_dumpxml_unknown(run):
    code, out, err = run("dumpxml", "ghost")
    assert code == 1 and out == ""
    assert "ghost" in one_error_line(err)


@pytest.mark.parametrize("argv", [["dumpxml", "a\nb"], ["undefine", "a\nb"], ["define", "/nonexistent/a\nb.xml"]])
def test_error_stays_one_line_with_newline_in_argument(run, argv):
    code, _, err = run(*argv)
    assert code == 1
    one_error_line(err)


def test_internal_error_is_one_line(run, monkeypatch):
    def boom(self):
        raise RuntimeError("kaputt")
    monkeypatch.setattr(cli.Service, "list_filters", boom)
    code, out, err = run("list")
    assert code == 1 and out == ""
    assert "kaputt" in one_error_line(err)


# --------------------------------------------------------------------------------------------
# edit


def editor(tmp_path: Path, monkeypatch, body: str) -> None:
    script = tmp_path / "editor.py"
    script.write_text(f"import sys\npath = sys.argv[1]\n{textwrap.dedent(body)}")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")


def test_edit_valid_change(run, env, tmp_path, monkeypatch):
    run("define", write(tmp_path, "f.xml", GOOD))
    editor(tmp_path, monkeypatch, """
        text = open(path).read()
        open(path, "w").write(text.replace("priority='500'", "priority='400'"))
    """)
    code, out, err = run("edit", "mine")
    assert (code, out, err) == (0, "Network filter mine XML configuration edited.\n", "")
    assert "priority='400'" in run("dumpxml", "mine")[1]


def test_edit_invalid_keeps_old_definition(run, env, tmp_path, monkeypatch):
    run("define", write(tmp_path, "f.xml", GOOD))
    before = snapshot(env)
    editor(tmp_path, monkeypatch, """
        text = open(path).read()
        open(path, "w").write(text.replace("action='drop'", "action='explode'"))
    """)
    code, out, err = run("edit", "mine")
    assert code == 1 and out == ""
    assert "explode" in one_error_line(err)
    assert snapshot(env) == before


def test_edit_unchanged(run, env, tmp_path, monkeypatch):
    run("define", write(tmp_path, "f.xml", GOOD))
    before = snapshot(env)
    editor(tmp_path, monkeypatch, "pass\n")
    assert run("edit", "mine") == (0, "Network filter mine XML configuration not changed.\n", "")
    assert snapshot(env) == before


def test_edit_reformatted_but_same_is_not_changed(run, env, tmp_path, monkeypatch):
    run("define", write(tmp_path, "f.xml", GOOD))
    before = snapshot(env)
    editor(tmp_path, monkeypatch, """
        text = open(path).read()
        open(path, "w").write("<!-- reformatted -->\\n" + text.replace("  ", "    "))
    """)
    assert run("edit", "mine") == (0, "Network filter mine XML configuration not changed.\n", "")
    assert snapshot(env) == before


def test_edit_failing_editor(run, env, tmp_path, monkeypatch):
    run("define", write(tmp_path, "f.xml", GOOD))
    before = snapshot(env)
    editor(tmp_path, monkeypatch, "sys.exit(3)\n")
    code, out, err = run("edit", "mine")
    assert code == 1 and out == ""
    one_error_line(err)
    assert snapshot(env) == before


def test_edit_builtin_creates_override(run, env, tmp_path, monkeypatch):
    editor(tmp_path, monkeypatch, """
        text = open(path).read()
        open(path, "w").write(text.replace("priority='500'", "priority='499'"))
    """)
    assert run("edit", "allow-arp") == (0, "Network filter allow-arp XML configuration edited.\n", "")
    assert (env / "filters" / "allow-arp.xml").is_file()
    assert "user (overrides builtin)" in run("list")[1]


def test_edit_by_uuid_names_the_filter(run, tmp_path, monkeypatch):
    run("define", write(tmp_path, "f.xml", GOOD))
    editor(tmp_path, monkeypatch, "pass\n")
    assert run("edit", U1) == (0, "Network filter mine XML configuration not changed.\n", "")


def test_edit_unknown_filter(run, tmp_path, monkeypatch):
    editor(tmp_path, monkeypatch, "raise SystemExit('editor must not run')\n")
    code, out, err = run("edit", "ghost")
    assert code == 1 and out == "" and "ghost" in one_error_line(err)


# --------------------------------------------------------------------------------------------
# usage, help


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["define"], ["undefine"], ["dumpxml"], ["edit"],
                                  ["list", "extra"], ["--backend", "iptables", "list"], ["define", "a", "b"]])
def test_usage_errors_exit_2(run, argv):
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert "usage:" in err and "Traceback" not in err


def verbs() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_filter_verbs_exist():
    assert {"list", "define", "undefine", "dumpxml", "edit"} <= set(verbs())


@pytest.mark.parametrize("verb", verbs())
def test_help_of_every_verb(run, verb):
    code, out, err = run(verb, "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: libvirt-nwfilter") and verb in out


def test_main_help(run):
    code, out, _ = run("--help")
    assert code == 0
    for verb in ("list", "define", "undefine", "dumpxml", "edit", "LIBVIRT_NWFILTER_CONFDIR"):
        assert verb in out


def test_python_dash_m(env):
    environ = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "libvirt_nwfilter", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=environ, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: libvirt-nwfilter")
    result = subprocess.run([sys.executable, "-m", "libvirt_nwfilter", "dumpxml", "allow-arp"],
                            capture_output=True, text=True, cwd=ROOT, env=environ, timeout=60)
    assert result.returncode == 0 and "<filter name='allow-arp' chain='arp' priority='-500'>" in result.stdout
