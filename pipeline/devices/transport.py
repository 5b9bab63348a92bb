"""How edgeship reaches a device: the `Transport` protocol, its result type, and the local transport.

Every transport takes argv lists. A command for a remote shell is built by `shell_command`, which quotes every
argument with `shlex.quote`; nothing is ever handed to a local shell (no `shell=True` anywhere), so a device
name or a path with shell metacharacters stays one literal argument. Every call has a timeout and every failure
becomes a `DeviceError` that says what failed and what to do.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pipeline.errors import DeviceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    """A finished command: its argv (as run on the device), exit status and output."""

    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


@runtime_checkable
class Transport(Protocol):
    """One device: run commands on it, copy files to and from it, and release it."""

    kind: str  # "local", "ssh" or "adb"
    python: str  # the device's Python interpreter (command name or path)
    workdir: str  # where per-run folders are made on the device

    def run(self, argv: Sequence[str], *, timeout_s: float, stdin: bytes | None = None) -> Completed: ...

    def push(self, local: Path, remote: str, *, timeout_s: float = 120.0) -> None: ...

    def pull(self, remote: str, local: Path, *, timeout_s: float = 120.0) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


def shell_command(argv: Sequence[str]) -> str:
    """One string for a remote POSIX shell that runs exactly `argv` (every argument quoted)."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(str(a)) for a in argv)


def run_process(
    argv: Sequence[str], *, timeout_s: float, stdin: bytes | None = None, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a local program (argv list, no shell) with a timeout; a missing program or a timeout is a DeviceError."""
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
            env=env,
        )
    except FileNotFoundError:
        raise DeviceError(f"{what}: the program {argv[0]!r} is not installed here") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(
            f"{what}: no answer within {timeout_s:.0f} s; the device may be busy or unreachable "
            "(raise the timeout for slow devices)"
        ) from None


def text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


class LocalTransport:
    """This machine, as a device: commands run directly (no shell), files are copied."""

    kind = "local"

    def __init__(self, *, python: str = "python3", workdir: str | None = None) -> None:
        self.python = python
        self.workdir = workdir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "edgeship")

    def run(self, argv: Sequence[str], *, timeout_s: float, stdin: bytes | None = None) -> Completed:
        proc = run_process(argv, timeout_s=timeout_s, stdin=stdin, what=f"running {argv[0]} on this machine")
        return Completed(tuple(argv), proc.returncode, text(proc.stdout), text(proc.stderr))

    def push(self, local: Path, remote: str, *, timeout_s: float = 120.0) -> None:
        try:
            shutil.copyfile(local, remote)
        except OSError as exc:
            raise DeviceError(f"copying {local} to {remote} failed: {exc}") from None

    def pull(self, remote: str, local: Path, *, timeout_s: float = 120.0) -> None:
        self.push(Path(remote), str(local), timeout_s=timeout_s)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"this machine ({platform.node()})"
