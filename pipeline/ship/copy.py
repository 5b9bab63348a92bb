"""Put a set of files at `dest` as one folder, whole or not at all.

The files are written into `.<name>.shipping` beside `dest` (inside the app, so on the same file system),
fsynced, hashed and compared with the expected sha256; only then does the new folder take the old one's place:
with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`) where the kernel has it, otherwise with two
renames that keep the old folder as `.<name>.previous` until the new one is in place. A failure at any point
before the swap removes the staging folder and leaves the previous model as it was; a run killed between the
two renames is repaired by the next one (the previous folder is put back before anything else).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from pipeline.errors import ShipError

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.shipping")


def previous_dir(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.previous")


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file (tests replace this to fail part-way)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover(dest: Path) -> None:
    """Undo what a killed run left: put `.previous` back if `dest` is missing, drop a stale staging folder."""
    prev, stage = previous_dir(dest), staging_dir(dest)
    if prev.exists() and not dest.exists():
        os.replace(prev, dest)
        log.warning("restored %s from %s (an earlier ship was interrupted)", dest, prev)
    if stage.exists():
        shutil.rmtree(stage)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_into_place(stage: Path, dest: Path) -> None:
    """Make the whole folder `stage` appear at `dest`; the old `dest` stays until the new one is there."""
    prev = previous_dir(dest)
    if not dest.exists():
        os.replace(stage, dest)
    elif _exchange(stage, dest):
        shutil.rmtree(stage)  # now holds the old model
    else:
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(dest, prev)
        try:
            os.replace(stage, dest)
        except BaseException:
            os.replace(prev, dest)
            raise
        shutil.rmtree(prev)
    _fsync_dir(dest.parent)


def ship_files(files: Mapping[str, bytes], dest: Path, *, expected_sha256: Mapping[str, str]) -> dict[str, str]:
    """Stage `files` (name -> bytes) beside `dest`, check every sha256, then swap the folder into place.

    Returns name -> sha256 of what is now at `dest`. Raises ShipError (and changes nothing at `dest`) when a
    staged file does not hash to what was expected."""
    missing = sorted(set(files) - set(expected_sha256))
    if missing:
        raise ShipError(f"no expected sha256 for {', '.join(missing)}; nothing shipped")
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    stage = staging_dir(dest)
    stage.mkdir()
    try:
        for name, data in files.items():
            write_file(stage / name, data)
        got = {name: _sha256(stage / name) for name in files}
        bad = [n for n in files if got[n] != expected_sha256[n]]
        if bad:
            detail = "; ".join(f"{n}: {got[n][:12]} != {expected_sha256[n][:12]}" for n in bad)
            raise ShipError(f"staged copy does not match its sha256 ({detail}); {dest} left unchanged")
        _fsync_dir(stage)
        swap_into_place(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return got
