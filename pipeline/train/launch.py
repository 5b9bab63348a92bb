"""`edgeship deploy --nproc N`: the same deploy, started again under torchrun on this machine.

`python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline deploy <the same arguments>`
through pipeline.proc.run_tool (own session, killed with edgeship). Rank 0 runs the chain and every rank
fine-tunes (pipeline/train/ddp.py); its output is written to a log and echoed line by line as it comes. When a
rank dies, torchrun stops the others and prints a failure summary; that summary is read back here and
becomes one error naming the rank, its host, exit code and signal. Several nodes: run torchrun yourself
(README, "Fine-tuning at scale").
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.train.ddp import CHILD_ENV, DistributedError

RUN_TIMEOUT_S = 7 * 24 * 3600.0
_ROOT = re.compile(r"Root Cause \(first observed failure\):\s*\[\d+\]:(.*?)(?:\n=+|\Z)", re.S)


@dataclass(frozen=True)
class RankFailure:
    """The first rank that failed, as torchrun's summary reports it."""

    rank: int
    local_rank: int | None
    host: str
    exitcode: int
    signal: str | None
    traceback: str

    def describe(self) -> str:
        local = f", local rank {self.local_rank}" if self.local_rank is not None else ""
        how = f"killed by {self.signal}" if self.signal else f"exit code {self.exitcode}"
        return f"rank {self.rank} ({self.host}{local}) {how}"


def parse_failure(text: str) -> RankFailure | None:
    """The root-cause rank of torchrun's failure summary in `text` (None: no summary)."""
    found = _ROOT.search(text)
    if not found:
        return None
    block = found.group(1)

    def field(name: str) -> str:
        m = re.search(rf"^\s*{name}\s*:\s*(.*)$", block, re.M)
        return m.group(1).strip() if m else ""

    rank = re.match(r"(-?\d+)(?:\s*\(local_rank:\s*(\d+)\))?", field("rank"))
    code = re.match(r"(-?\d+)(?:.*\((SIG[A-Z0-9]+)\))?", field("exitcode"))
    if rank is None or code is None:
        return None
    local = int(rank.group(2)) if rank.group(2) is not None else None
    return RankFailure(int(rank.group(1)), local, field("host") or "?", int(code.group(1)), code.group(2),
                       field("traceback"))  # fmt: skip


class _Tail(threading.Thread):
    """Echoes the lines a growing file gets, until stopped (then the rest)."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self.path, self.echo, self.done, self.pos, self.partial = path, echo, threading.Event(), 0, ""

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.drain()
        self.drain(final=True)

    def drain(self, *, final: bool = False) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                fh.seek(self.pos)
                chunk = fh.read()
                self.pos = fh.tell()
        except OSError:
            return
        lines = (self.partial + chunk).split("\n")
        self.partial = "" if final else lines.pop()
        for line in lines if not final else [ln for ln in lines if ln]:
            self.echo(line.rstrip("\r"))


def torchrun_argv(argv: Sequence[str], nproc: int, *, module: str = "pipeline") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", module, *argv]  # fmt: skip


def launch_deploy(argv: Sequence[str], nproc: int, *, log_path: Path, echo: Callable[[str], None],
                  timeout_s: float = RUN_TIMEOUT_S, module: str = "pipeline") -> int:  # fmt: skip
    """Run `python -m <module> <argv>` (edgeship) under torchrun with `nproc` processes; 0, or its exit code
    when rank 0 ended with its own error (already echoed); DistributedError naming the rank when another
    one died."""
    from pipeline.proc import run_tool

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cpus // nproc))),
           CHILD_ENV: "1"}  # fmt: skip
    tail = _Tail(log_path, echo)
    tail.start()
    try:
        run = run_tool(torchrun_argv(argv, nproc, module=module), timeout_s=timeout_s, env=env, log_file=log_path)
    finally:
        tail.done.set()
        tail.join()
    if run.rc == 0:
        return 0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    failure = parse_failure(text)
    if failure is not None and failure.rank == 0 and failure.exitcode > 0 and "edgeship: error:" in text:
        return failure.exitcode  # rank 0's own error (a budget missed, bad input): it said why
    if run.rc is None:
        why = f"did not finish within {timeout_s:.0f} s and was stopped"
    elif failure is None:
        why = f"torchrun exited with code {run.rc} without a failure summary"
    else:
        why = f"{failure.describe()} while the deploy ran"
    raise DistributedError(
        f"deploy on {nproc} processes (torchrun): {why}; the other ranks were stopped. Stages that finished are "
        f"kept: run the same command again to resume from the first unfinished one (log: {log_path})"
    )
