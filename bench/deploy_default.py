"""Benchmark: the default deploy (fmnist_cnn) for one or more targets, from scratch, in one run.

    python -m bench.deploy_default [--targets rpi host] [--out BENCHMARKS.md]

Every stage is re-run (--force) so that the stage times are real. Prints a table and rewrites the
"Default deploy" section of BENCHMARKS.md with the figures and the command that produced them.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from bench.sections import write_section
from pipeline.artifacts import read_json
from pipeline.cli import main as cli_main
from pipeline.deploy import REPO

SECTION = "## Default deploy"


def _row(target: str, s: dict, wall: float) -> list[str]:
    ship = s["shipped_precision"]
    b, v = s["baseline"], s["variants"]
    cells = [
        target,
        f"{s['pruned']['macs'] / b['macs']:.2f}",
        f"{s['pruned']['params'] / b['params']:.2f}",
        f"{100 * b['accuracy_torch']:.2f}",
        f"{100 * s['pruned']['accuracy_torch']:.2f}",
    ]
    for p in ("fp32", "fp16", "int8"):
        cells.append(f"{100 * v[p]['accuracy']:.2f}" if p in v else "-")
    bt, st = b["tflite"], v[ship]
    cells += [
        f"{bt['size_bytes'] / 1024:.1f} -> {st['size_bytes'] / 1024:.1f}",
        f"{bt['latency_ms']['p50']:.3f} -> {st['latency_ms']['p50']:.3f}",
        f"{st['latency_ms']['p50'] / bt['latency_ms']['p50']:.2f}",
        f"{wall:.0f}",
    ]
    return cells


HEADER = [
    "target",
    "MACs after/before",
    "params after/before",
    "torch acc before %",
    "torch acc after %",
    "fp32 acc %",
    "fp16 acc %",
    "int8 acc %",
    "ship size KiB before -> after",
    "ship p50 ms before -> after",
    "latency ratio",
    "deploy s",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", nargs="+", default=["rpi"])
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    rows = []
    for target in args.targets:
        start = time.perf_counter()
        rc = cli_main(
            [
                "deploy",
                "--target",
                target,
                "--force",
                "--runs-dir",
                "runs/bench",
                "--artifacts-dir",
                "runs/bench-artifacts",
            ]
        )
        if rc != 0:
            print(f"deploy for {target} failed with exit {rc}", file=sys.stderr)
            return rc
        summary = read_json(Path("runs/bench") / _profile_name(target) / "summary.json")
        rows.append(_row(target, summary, time.perf_counter() - start))
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(table))
    cmd = "python -m bench.deploy_default " + shlex.join(["--targets", *args.targets])
    body = [
        SECTION,
        "",
        f"Command: `{cmd}` (all stages re-run). Machine: {platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores; latency measured on this machine with "
        f"ai-edge-litert (the profile's threads, capped at the cores here), not on the target device. "
        f"'before' = the unpruned model converted at the shipped precision; accuracies on the full "
        f"Fashion-MNIST test split (10,000 images).",
        "",
        *table,
        "",
    ]
    write_section(args.out, SECTION, "\n".join(body))
    return 0


def _profile_name(target: str) -> str:
    from pipeline.targets import load_target

    return load_target(target).name


if __name__ == "__main__":
    sys.exit(main())
