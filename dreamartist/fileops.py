"""File-system mechanics for pair files: a lock per pair name, a journaled commit of several files at once,
recovery of a commit that a dying process left half done, and the folder walk the webui's embedding loader does.

The files this module works with live in one hidden subfolder, ``<folder>/.dreamartist/``, with extensions the
webui's embedding loader skips: ``NAME.<token>.tmp`` (a file being written; on the same file system as its
target, so the final rename is atomic), ``NAME.commit`` (the journal of a commit in progress), ``NAME.lock`` (the
lock; empty). NAME is lower-cased: pair names are case-insensitive, as the webui's embedding names are, while
file systems differ.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

from .errors import InputError, PairBusy

WORK_DIR = ".dreamartist"
_TEMP = re.compile(r"^(?P<key>.+)\.[0-9a-f]{16}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\.dreamartist-[0-9a-f]{16}\.tmp$")  # written by earlier versions, never journaled
SPACE_MARGIN = 16 << 20  # bytes kept free beyond what a save needs
# What a file is made of: its bytes, or a function that writes them into the open file (a large file, streamed)
Payload = bytes | Callable[[BinaryIO], None]


def _key(name: str) -> str:
    return name.lower()


def work_dir(folder: Path) -> Path:
    """The hidden subfolder of ``folder`` that holds locks, journals and files being written."""
    return Path(folder) / WORK_DIR


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


@contextlib.contextmanager
def pair_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold the lock of pair ``name`` in ``folder`` for a whole run; a second holder, in this process or another
    (the tab, the API and the command line share it), is refused at once with PairBusy."""
    folder = Path(folder)
    make_folder(work_dir(folder))
    lock = FileLock(str(work_dir(folder) / f"{_key(name)}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PairBusy(f"Another training of {name} into {folder} is running; wait for it to finish, "
                       "or choose another name.") from None
    try:
        yield
    finally:
        lock.release()


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) or say in one sentence why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"The folder {folder} cannot be created ({e.strerror or e}); choose another folder.") from None
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; choose another output folder.")


def check_writable(folder: Path, needed_bytes: int) -> None:
    """Fail now, before any training step, when ``folder`` cannot take files of ``needed_bytes`` in all."""
    folder = Path(folder)
    make_folder(folder)
    try:
        remove_quietly(write_temp(folder, "probe", b"\0" * min(needed_bytes, 1 << 20)))
    except OSError as e:
        raise InputError(f"Cannot write into {folder} ({e.strerror or e}); choose a folder you can write to.") from None
    free = shutil.disk_usage(folder).free
    # a save keeps the previous files until the new ones are in place, and a streamed torch file has a scratch copy
    needed = 3 * needed_bytes + SPACE_MARGIN
    if free < needed:
        raise InputError(f"{folder} has only {free >> 20} MB free; a save needs about {needed >> 20} MB. Free some "
                         "space or choose another folder.")


def write_temp(folder: Path, name: str, payload: Payload) -> Path:
    """Write ``payload`` to a new temporary file of pair ``name`` in the work folder of ``folder``, on disk."""
    make_folder(work_dir(folder))
    tmp = work_dir(folder) / f"{_key(name)}.{secrets.token_hex(8)}.tmp"
    _write_new(tmp, payload)
    return tmp


def commit(folder: Path, name: str, moves: list[tuple[Path, Path]], removals: list[Path] = ()) -> None:
    """Move each temporary file onto its target in ``folder`` and remove ``removals``: all of it or none.

    The steps are journaled before the first is taken, so that ``recover`` finishes a commit cut short by the
    process dying. Any error here puts every file back as it was. The caller holds ``pair_lock``.
    """
    folder = Path(folder)
    for path in [*(t for _, t in moves), *removals]:
        if path.parent != folder:
            raise ValueError(f"{path} is not directly in {folder}")
    journal = work_dir(folder) / f"{_key(name)}.commit"
    record = {"moves": [[tmp.name, target.name] for tmp, target in moves], "removals": [p.name for p in removals]}
    os.replace(write_temp(folder, name, json.dumps(record).encode()), journal)
    _sync_folder(folder)
    backups: dict[Path, Path] = {}  # file taken away or replaced -> a hard link (or copy) of it
    try:
        for path in [*(t for _, t in moves), *removals]:
            if path.exists() or path.is_symlink():
                backups[path] = _backup(folder, name, path)
        _apply(folder, record)
    except BaseException:
        for path, backup in backups.items():
            if path.exists() and os.path.samefile(path, backup):
                remove_quietly(backup)  # never replaced (renaming a hard link onto its twin does nothing)
            else:
                os.replace(backup, path)
        for tmp, target in moves:
            if target not in backups:
                remove_quietly(target)
            remove_quietly(tmp)
        remove_quietly(journal)
        raise
    remove_quietly(journal)
    for backup in backups.values():
        remove_quietly(backup)
    _sync_folder(folder)


def write_together(folder: Path, name: str, payloads: list[tuple[Path, Payload]],
                   check: Callable[[Path, Path], None] | None = None,
                   stale: Callable[[list[Path]], list[Path]] | None = None) -> None:
    """Write every (target, payload) into ``folder`` as one ``commit`` of run ``name``: all appear, or nothing changes.
    ``check(temporary file, target)`` may read each written file back and raise before anything is moved;
    ``stale(targets)`` lists files to remove in the same commit. The caller holds ``pair_lock``."""
    make_folder(folder)
    temps: list[Path] = []
    try:
        for target, payload in payloads:
            temps.append(write_temp(folder, name, payload))
            if check is not None:
                check(temps[-1], target)
        targets = [target for target, _ in payloads]
        commit(folder, name, list(zip(temps, targets)), stale(targets) if stale is not None else [])
    finally:
        for tmp in temps:
            remove_quietly(tmp)


def _apply(folder: Path, record: dict) -> None:
    """The journaled steps; each may run again after a crash without harm."""
    for tmp, target in record["moves"]:
        if (work_dir(folder) / tmp).exists():
            os.replace(work_dir(folder) / tmp, folder / target)
    for removal in record["removals"]:
        remove_quietly(folder / removal)


def _backup(folder: Path, name: str, path: Path) -> Path:
    """A hard link to ``path`` (a copy where links are not supported): the file itself stays in place."""
    backup = work_dir(folder) / f"{_key(name)}.{secrets.token_hex(8)}.tmp"
    try:
        os.link(path, backup, follow_symlinks=False)
    except (OSError, NotImplementedError):
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def recover(folder: Path, name: str) -> None:
    """Finish a commit of pair ``name`` that was cut short and remove its stale temporary files.

    The caller holds ``pair_lock``. A journal that is not ours in shape is removed without acting on it.
    """
    folder, key = Path(folder), _key(name)
    journal = work_dir(folder) / f"{key}.commit"
    if journal.is_file():
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if _journal_is_sane(record, key):
            _apply(folder, record)
        remove_quietly(journal)
    for path in list(work_dir(folder).iterdir()) if work_dir(folder).is_dir() else []:
        match = _TEMP.match(path.name)
        if match and match.group("key") == key:
            remove_quietly(path)


def recover_folder(folder: Path) -> None:
    """``recover`` every pair in ``folder`` that has a journal or temporary files, skipping pairs whose lock is
    held (their commit is in progress); also removes the unjournaled temporary files of earlier versions."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _LEGACY_TEMP.match(path.name):
            remove_quietly(path)
    keys = set()
    for path in work_dir(folder).iterdir() if work_dir(folder).is_dir() else ():
        if path.suffix == ".commit":
            keys.add(path.stem)
        elif _TEMP.match(path.name):
            keys.add(_TEMP.match(path.name).group("key"))
    for key in sorted(keys):
        try:
            with pair_lock(folder, key):
                recover(folder, key)
        except PairBusy:
            continue


def _journal_is_sane(record: object, key: str) -> bool:
    """Only moves from this pair's temporary files to plain names in the same folder, and plain removals."""
    if not isinstance(record, dict):
        return False
    moves, removals = record.get("moves"), record.get("removals")
    if not isinstance(moves, list) or not isinstance(removals, list):
        return False
    names = [n for m in moves if isinstance(m, list) and len(m) == 2 for n in m] + removals
    if len(names) != 2 * len(moves) + len(removals) or not all(isinstance(n, str) for n in names):
        return False
    plain = all(n and n == Path(n).name and n not in (".", "..") for n in names)
    ours = all((m := _TEMP.match(tmp)) and m.group("key") == key for tmp, _ in moves)
    return plain and ours


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entries (the renames) to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open folders; its renames are durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Path, payload: bytes) -> None:
    """Write one file whole or not at all: a temporary file beside it, on disk, then renamed over it. Its mode is
    the umask's, as for any other file (safetensors' own save_file leaves 0600, unreadable to a webui run by
    another user)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    _write_new(tmp, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def _write_new(path: Path, payload: Payload) -> None:
    """Create ``path`` holding ``payload``, on disk; nothing of it is left if that fails."""
    try:
        with open(path, "xb") as f:
            if callable(payload):
                payload(f)
            else:
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_quietly(path)
        raise


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
