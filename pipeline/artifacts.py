"""Files that are whole or absent: atomic writes, hashes, stage folders with manifests, a run lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import LockError, PipelineError, StorageError

MANIFEST = "manifest.json"


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: a reader sees old or new, whole."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_out_of_space(exc):
            raise storage_error(exc, path) from exc
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the mode open() would have given
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and is_out_of_space(exc):
            raise storage_error(exc, path) from exc
        raise


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries of `path` left by writers that were killed (`.name.<pid>.*.tmp`, pid gone)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^/]*\.tmp")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.fullmatch(stale.name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_out_of_space(exc: BaseException) -> bool:
    """True for a write refused for space: disk full (ENOSPC), quota (EDQUOT), file-size limit (EFBIG)."""
    return isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE


def storage_error(exc: OSError, path: Path | str) -> StorageError:
    """The package's error for a write refused for space, with what to do about it."""
    return StorageError(
        f"{path}: cannot write: {exc.strerror or exc}; free some space (or raise the limit) and run again: "
        f"finished stages are kept, nothing half-written is used"
    )


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """The one JSON form edgeship writes: indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot read JSON ({exc}); delete it and re-run") from None


def replace_dir(src: Path, dst: Path) -> None:
    """Put the finished folder `src` at `dst`, replacing an older `dst`.

    Between the two renames `dst` is briefly absent, never half-written: a reader (or a resumed run)
    sees the old folder, nothing, or the new one.
    """
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def fresh_temp_dir(parent: Path, name: str) -> Path:
    """An empty folder `.name.tmp` under `parent` (removing what a killed run left there).

    A killed run's folder is first renamed aside, then deleted: a child process that outlived the kill (an
    onnx2tf still converting in it) may keep writing there, and must not make the delete fail nor write
    into the new folder.
    """
    tmp = parent / f".{name}.tmp"
    for stale in [tmp, *parent.glob(f".{name}.stale-*")] if parent.is_dir() else []:
        if not stale.exists():
            continue
        aside = parent / f".{name}.stale-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(stale, aside)
            shutil.rmtree(aside, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def outputs_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    """True when every output the manifest lists exists with the recorded sha256."""
    outputs = manifest.get("outputs", {})
    for rel, digest in outputs.items():
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


@contextlib.contextmanager
def wait_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for any other holder: for short critical
    sections such as swapping a published bundle into place, where two writers must not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a target's run folder; a second deploy of the same target refuses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / ".lock"
    f = open(lock_path, "a+")  # noqa: SIM115 - held for the duration of the run
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockError(
                f"another edgeship run is using {run_dir} (pid {holder}); wait for it to finish, "
                f"or stop it, then run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()
