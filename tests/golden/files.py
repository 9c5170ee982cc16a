"""Golden files of both backends: compare with a rendering, or rewrite them for review.

``LIBVIRT_NWFILTER_REGEN_GOLDEN=1`` rewrites the files instead of comparing (review the diff
before committing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

REGEN = os.environ.get("LIBVIRT_NWFILTER_REGEN_GOLDEN") == "1"


def check(path: Path, text: str) -> None:
    """``text`` must be the content of ``path`` (with REGEN: becomes it)."""
    if REGEN:
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path.name} missing: run with LIBVIRT_NWFILTER_REGEN_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path.name} differs from the rendering; if the change is intended, regenerate with "
        "LIBVIRT_NWFILTER_REGEN_GOLDEN=1 and review the diff")


def stray(directory: Path, suffix: str, names: Iterable[str]) -> list[str]:
    """Golden files in ``directory`` that no case ``names``."""
    wanted = {f"{name}{suffix}" for name in names}
    return sorted(p.name for p in directory.glob(f"*{suffix}") if p.name not in wanted)
