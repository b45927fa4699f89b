"""Small file helpers shared by the modules that write run-directory records and exported files."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional


def _write_aside(path: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary file beside ``path`` then rename it onto ``path``: a process stopped mid-write leaves the
    previous file (or none), never half of one. The temporary name is unique per call (process id + random), so
    concurrent writers of the same file (one per host) never write into each other's temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fill(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (``_write_aside``). Creates the parent folder."""
    return _write_aside(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_file_atomic(source: str | Path, path: str | Path, edit: Optional[Callable[[Path], None]] = None) -> Path:
    """Copy ``source`` to ``path`` whole or not at all, ``edit`` applied to the copy before it takes the name."""
    def fill(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        if edit is not None:
            edit(tmp)
    return _write_aside(Path(path), fill)
