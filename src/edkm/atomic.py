"""Atomic file writes with the usual permissions (the process umask applies, like ``open(path, "w")``).

Every file edkm writes goes through :func:`atomic_path` (or :func:`write_text` / :func:`write_json` on it).

Example:
    >>> import os, tempfile
    >>> from edkm.atomic import atomic_path
    >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(path) as tmp:
    ...     _ = open(tmp, "w").write("hello")
    >>> open(path).read()
    'hello'
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_mode() -> int:
    """Mode of a new regular file under the process umask (0o644 with the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; on success fsync it and rename it over ``path``.

    Readers see the old file or the whole new one; on an exception the temporary file is removed.
    The file is created with mode 0o666 minus the umask (``tempfile.mkstemp`` would leave 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # writers such as safetensors may have replaced it with a 0o600 file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a killed process never leaves half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=indent))
