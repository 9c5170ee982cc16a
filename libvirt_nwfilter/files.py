"""Reading and writing our own files safely: atomic replacement, and reads that refuse what is
not a plain file of a plausible size (a symbolic link, a directory, a runaway file).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from .errors import NwfilterError


class FileProblem(Exception):
    """A file of ours that cannot be used; ``str()`` says why (without the path)."""


def write_atomically(path: Path, text: str, mode: int = 0o644, scratch: Path | None = None) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a part: into
    a temporary file (in ``scratch``, a directory of the same file system, else beside ``path``)
    renamed into place. NwfilterError (one line naming the file) when the system refuses."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if scratch is not None:
            scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=scratch or path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise NwfilterError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def read_regular(path: Path, limit: int) -> bytes | None:
    """The content of the regular file ``path`` (None when it does not exist); FileProblem for a
    symbolic link, anything but a regular file, more than ``limit`` bytes, or a read error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        if os.path.islink(path):
            raise FileProblem("is a symbolic link (never followed)") from None
        raise FileProblem(f"cannot be opened: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileProblem("is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileProblem(f"is larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as error:
        raise FileProblem(f"cannot be read: {error.strerror}") from None
    finally:
        os.close(fd)


def read_json(path: Path, limit: int) -> object | None:
    """The JSON value in ``path`` (None when it does not exist); FileProblem as
    :func:`read_regular`, or for an empty file or text that is not JSON (e.g. truncated)."""
    data = read_regular(path, limit)
    if data is None:
        return None
    if not data.strip():
        raise FileProblem("is empty")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileProblem("is not UTF-8 text") from None
    except ValueError as error:
        raise FileProblem(f"is not valid JSON (truncated?): {error}") from None


def exists(path: Path) -> bool:
    """Whether anything (a symbolic link included) is at ``path``."""
    return os.path.lexists(path)
