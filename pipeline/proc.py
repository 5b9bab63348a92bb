"""Run an external tool: an argv list (never a shell), its own session, a timeout, and killed with edgeship.

Every tool edgeship starts (onnx2tf, edgetpu_compiler, the benchmark runner, the latency probes) goes
through `run_tool`. The child gets its own session, so a timeout or Ctrl-C kills it and whatever it started
(onnx2tf starts onnxsim) as one process group; on Linux it also gets SIGKILL when edgeship itself dies
(kill -9, the OOM killer) instead of working on in a folder nobody will read: prctl(PR_SET_PDEATHSIG)
survives the exec, and a getppid check closes the race with a parent that died before the prctl.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass(frozen=True)
class ToolRun:
    """How a tool ended: its exit code (None: it ran past its timeout and was killed), output, seconds."""

    rc: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.rc is None


def dies_with_us(argv: Sequence[str]) -> list[str]:
    """argv wrapped so that the tool is killed when this process dies (Linux; unchanged elsewhere)."""
    if sys.platform != "linux":
        return list(argv)
    exe = argv[0] if os.path.isabs(argv[0]) else (_which(argv[0]) or argv[0])
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), exe, *argv[1:]]


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def run_tool(
    argv: Sequence[str],
    *,
    timeout_s: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
    merge_stderr: bool = False,
) -> ToolRun:
    """Run argv to completion or timeout. Output is captured (stdout and stderr apart), or, with `log_file`,
    both written into that file (then `stdout`/`stderr` are empty); `merge_stderr` interleaves stderr into
    stdout as the tool wrote them. Raises OSError when it cannot start."""
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if log_file is not None:
            fh = stack.enter_context(open(log_file, "wb"))
            out, err = fh, subprocess.STDOUT
        else:
            out, err = subprocess.PIPE, subprocess.STDOUT if merge_stderr else subprocess.PIPE
        proc = subprocess.Popen(
            dies_with_us(argv), cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
            stdout=out, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            rc: int | None = proc.returncode
        except BaseException as exc:  # timeout or Ctrl-C: end the tool and what it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            rc = None
    text = (stdout or b"").decode(errors="replace"), (stderr or b"").decode(errors="replace")
    return ToolRun(rc, text[0], text[1], time.perf_counter() - start)
