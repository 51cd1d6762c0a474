"""Atomic file writes, shared by every module that writes into a work or report folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Owner read-write, everyone else read: the files are results to share, not secrets.
FILE_MODE = 0o644


def write_atomically(path: str | os.PathLike[str], content: bytes | str) -> Path:
    """Write `content` to `path` through a temporary file in the same folder and a rename.

    A reader sees the old file or the new one, never a partial one, and a crash leaves at most
    a hidden `.<name>.*` temporary file. The file gets `FILE_MODE`: the temporary file module
    creates files readable by their owner only.

    Args:
        path: the file to write; its folder must exist.
        content: bytes, or text to encode as UTF-8.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    with tempfile.NamedTemporaryFile(
        "wb", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as file:
        file.write(data)
    try:
        os.chmod(file.name, FILE_MODE)
        os.replace(file.name, path)
    except BaseException:
        Path(file.name).unlink(missing_ok=True)
        raise
    return path
