"""Checksum manifests: a checkpoint's own record of the files it holds, so that bit rot, a truncated copy or a lost
file is found before anything is loaded.

``DIR/checksums.json`` lists every file under ``DIR`` (relative path, size, xxh3-64 digest). It is written last,
through a temporary file and a rename, once everything else is written: a directory without it is incomplete (its
save, or the writing of the manifest, was cut short), never trusted. xxh3-64 because it is the cheapest of the
checksums measured (``bench/checkpoint_integrity.py``: xxh3-64, CRC32C and zlib's CRC-32 over the same bytes).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

import xxhash

MANIFEST = "checksums.json"
FORMAT = "jax_controlllm.checksums/1"
ALGORITHM = "xxh3_64"
CHUNK = 8 << 20            # bytes read at a time: large enough that hashing, not Python, sets the pace

INTACT, INCOMPLETE, DAMAGED = "intact", "incomplete", "damaged"


class CheckpointDamagedError(ValueError):
    """A checkpoint failed its checksums (or has none); the message is one line naming it and the damage."""


@dataclass
class Verdict:
    state: str                                   # INTACT, INCOMPLETE or DAMAGED
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    @property
    def intact(self) -> bool:
        return self.state == INTACT

    def reason(self) -> str:
        """The damage in a few words: the first problem, and how many more there are."""
        if not self.problems:
            return self.state
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more file{'s' * (more > 1)})" if more else "")


def file_digest(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as handle:
        # a buffer no larger than the file: most files of a checkpoint are small index and metadata files
        buffer = bytearray(min(CHUNK, max(os.fstat(handle.fileno()).st_size, 1)))
        view = memoryview(buffer)
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def files_under(directory: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``directory`` (the manifest itself excluded), sorted."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                out.append(path.relative_to(directory).as_posix())
    return sorted(rel for rel in out if rel not in (MANIFEST, MANIFEST + ".tmp"))


def write_manifest(directory: str | Path) -> Path:
    """Hash every file under ``directory`` and write the manifest atomically (temporary file, rename)."""
    directory = Path(directory)
    files = {rel: {"bytes": (directory / rel).stat().st_size, ALGORITHM: file_digest(directory / rel)}
             for rel in files_under(directory)}
    # No fsync (it was most of the manifest's cost on small checkpoints): after a power loss the manifest may be
    # missing, torn or ahead of the files it lists, and each of those reads as incomplete or damaged, never intact.
    tmp, final = directory / (MANIFEST + ".tmp"), directory / MANIFEST
    tmp.write_text(json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "files": files}, indent=0),
                   encoding="utf-8")
    os.replace(tmp, final)
    return final


def read_manifest(directory: Path) -> Optional[dict]:
    """The manifest's file table; None if there is none; ValueError if it is not one we wrote."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ValueError("not a checksum manifest")
    return data["files"]


def verify(directory: str | Path, items: Optional[Iterable[str]] = None) -> Verdict:
    """Check ``directory`` against its manifest: every listed file present, of its size and digest, and no file
    that the manifest does not list. ``items``: only the files under these top-level names (e.g. the parameters
    and config of a training checkpoint, for a tool that reads nothing else)."""
    directory = Path(directory)
    try:
        files = read_manifest(directory)
    except (ValueError, UnicodeDecodeError) as err:
        return Verdict(DAMAGED, [f"{MANIFEST} unreadable ({type(err).__name__})"])
    if files is None:
        return Verdict(INCOMPLETE, [f"no {MANIFEST}: its save did not finish"])
    wanted = None if items is None else tuple(items)

    def selected(rel: str) -> bool:
        return wanted is None or PurePosixPath(rel).parts[0] in wanted

    problems, count, size = [], 0, 0
    for rel, entry in sorted(files.items()):
        if not selected(rel):
            continue
        problem = _check_file(directory, rel, entry)
        if problem:
            problems.append(f"{rel}: {problem}")
        count, size = count + 1, size + (entry.get("bytes", 0) if isinstance(entry, dict) else 0)
    problems += [f"{rel}: not in {MANIFEST}" for rel in files_under(directory) if selected(rel) and rel not in files]
    return Verdict(DAMAGED if problems else INTACT, problems, count, size)


def _check_file(directory: Path, rel: str, entry) -> Optional[str]:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not isinstance(entry, dict):
        return f"invalid entry in {MANIFEST}"
    file = directory / rel
    if not file.is_file():
        return "missing"
    actual, written = file.stat().st_size, entry.get("bytes")
    if not isinstance(written, int):
        return f"invalid entry in {MANIFEST}"
    if actual != written:
        return f"{'truncated' if actual < written else 'size changed'} ({actual} bytes, {written} written)"
    if file_digest(file) != entry.get(ALGORITHM):
        return "checksum mismatch"
    return None
