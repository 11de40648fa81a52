"""File-system mechanics for pair files: atomic replacement of several files at once, and the folder walk
the webui's embedding loader does."""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def walk_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, following links as the webui does, each directory once."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # a link loop
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield from (Path(root) / f for f in sorted(files))


def write_temp(folder: Path, payload: bytes) -> Path:
    """Write ``payload`` to a new hidden .tmp file in ``folder`` (an extension the webui skips)."""
    tmp = folder / f".dreamartist-{secrets.token_hex(8)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def commit(moves: list[tuple[Path, Path]], replaced: list[Path] = ()) -> None:
    """Move each temp file onto its target and take ``replaced`` away; on any failure restore every file."""
    copies: dict[Path, Path] = {}  # target -> backup copy; the target itself stays in place until replaced
    moved: list[tuple[Path, Path]] = []  # (backup, original place) of files taken away
    placed: list[Path] = []
    try:
        for _, target in moves:
            if target.exists():
                copies[target] = backup_copy(target)
        for old in replaced:
            backup = old.with_name(f".dreamartist-{secrets.token_hex(8)}.tmp")
            os.replace(old, backup)
            moved.append((backup, old))
        for tmp, target in moves:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            if target in copies:
                os.replace(copies.pop(target), target)
            else:
                remove_quietly(target)
        for backup, original in reversed(moved):
            os.replace(backup, original)
        for path in [*copies.values(), *(tmp for tmp, _ in moves)]:
            remove_quietly(path)
        raise
    for backup in [*copies.values(), *(b for b, _ in moved)]:
        remove_quietly(backup)


def backup_copy(path: Path) -> Path:
    """A hard link to ``path`` (a copy where links are not supported), so the file stays in place."""
    backup = path.with_name(f".dreamartist-{secrets.token_hex(8)}.tmp")
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
