"""``python3 -m libvirt_nwfilter.docgen DIR``: write the manual pages and the bash completion.

Writes ``DIR/man/manN/NAME.N`` for every page of :data:`manpage.PAGES` and
``DIR/bash-completion/completions/libvirt-nwfilter``: the layout of ``/usr/share``, so that
``DIR=/usr/local/share`` puts them where ``man`` and bash-completion look. ``--print NAME``
writes one of them to standard output instead (``libvirt-nwfilter.8``,
``libvirt-nwfilter-hook.8``, ``completion``), e.g.
``source <(python3 -m libvirt_nwfilter.docgen --print completion)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import completion, manpage

COMPLETION = "completion"


def outputs() -> dict[str, tuple[str, callable]]:
    """name -> (path under DIR, renderer)."""
    found = {page.filename: (f"man/man{page.section}/{page.filename}", page.render) for page in manpage.PAGES}
    found[COMPLETION] = ("bash-completion/completions/libvirt-nwfilter", completion.cli_script)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m libvirt_nwfilter.docgen",
                                     description="Write the manual pages and the bash completion.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("directory", metavar="DIR", nargs="?", help="write everything under DIR (e.g. /usr/local/share)")
    target.add_argument("--print", metavar="NAME", choices=sorted(outputs()), help="print one file")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(outputs()[args.print][1]())
        return 0
    for relative, render in outputs().values():
        path = Path(args.directory) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(), encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
