"""Benchmark: what a latency table costs to measure on the device, for the default model (fmnist_cnn).

    python -m bench.device_table [--precision int8] [--threads 1] [--max-points 16] [--batch 16]

The probes of fmnist_cnn's table (the default profile's grid: channel multiple 8, max_layer_ratio 0.8,
max_points 16) are built here once, then timed over ssh on
1. the emulated Raspberry Pi (arm64 Debian bookworm + tflite-runtime 2.14 under qemu-user, behind a real sshd on
   loopback; tests/qemu_rootfs.py): emulated code runs ~100x slower than a real board, so this is an upper bound
   of the transfer and process overhead, not a timing of a Pi;
2. this machine through its own loopback sshd (the same path with native speed),
each with a fresh cache, then again from the cache. Prints a table and rewrites the "Latency table on the device"
section of BENCHMARKS.md with the command. Needs root (sshd, binfmt_misc); the rootfs is built on first use.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.latency.cache import TableCache
from pipeline.latency.device_table import TableSettings, measure_device_tables
from pipeline.latency.layers import prunable_layers
from pipeline.latency.table import build_probes, plan_probes
from pipeline.models.zoo import get_model_spec
from pipeline.pruning.channels import ignored_layers, prunable_groups

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
HEADING = "## Latency table on the device"
log = logging.getLogger("bench.device_table")


def _layers(name: str) -> tuple[Any, dict[str, int]]:
    spec = get_model_spec(name)
    model, ex = spec.build().eval(), torch.zeros(1, *spec.input_shape)
    return prunable_layers(model, ex, ignored=ignored_layers(model, ex, ())), prunable_groups(model, ex)


def _time(transport: Any, layers: Any, groups: dict[str, int], args: argparse.Namespace, probe_dir: Path,
          cache: TableCache) -> dict[str, Any]:  # fmt: skip
    settings = TableSettings(threads=args.threads, batch_size=args.batch)
    start = time.monotonic()
    _, runs = measure_device_tables(layers, groups, {"device": transport}, precision=args.precision, multiple=8,
                                    max_ratio=0.8, max_points=args.max_points, settings=settings,
                                    probe_dir=probe_dir, cache=cache)  # fmt: skip
    r = runs["device"]
    if not r.complete:
        raise SystemExit(f"the table was not measured: {r.error}")
    return {"seconds": time.monotonic() - start, "measured": r.measured, "cached": r.cached, "wanted": r.wanted,
            "fingerprint": r.fingerprint.describe() if r.fingerprint else "?"}  # fmt: skip


def _on(name: str, transport: Any, layers: Any, groups: dict[str, int], args: argparse.Namespace,
        probe_dir: Path, tmp: Path) -> list[dict[str, Any]]:  # fmt: skip
    cache = TableCache(tmp / f"cache-{name}")
    first = _time(transport, layers, groups, args, probe_dir, cache)
    again = _time(transport, layers, groups, args, probe_dir, cache)
    log.info("%s: %.1f s fresh, %.1f s from the cache", name, first["seconds"], again["seconds"])
    return [{"device": name, "run": "fresh cache", **first}, {"device": name, "run": "again (cached)", **again}]


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float, int]:
    """(rows, seconds to build the probes here, probe count)."""
    from devices_fixtures import sshd_missing_reason, start_sshd
    from qemu_rootfs import binfmt_aarch64, chroot_wrap, ensure_rootfs, missing_reason

    if reason := sshd_missing_reason() or missing_reason():
        raise SystemExit(reason)
    rootfs, how = ensure_rootfs()
    if rootfs is None:
        raise SystemExit(how)
    layers, groups = _layers(args.model)
    probes = plan_probes(layers, groups, multiple=8, max_ratio=0.8, max_points=args.max_points)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        from pipeline.latency.device_table import keyed_entries

        entries = keyed_entries(probes, args.precision)
        start = time.monotonic()
        build_probes(entries, args.precision, tmp / "probes")
        build_s = time.monotonic() - start
        rows = []
        with binfmt_aarch64():
            pi = start_sshd(tmp / "pi-sshd", chroot=rootfs, wrap=chroot_wrap(rootfs))
            try:
                rows += _on("emulated Pi (arm64, qemu)", pi.transport(python="python3", workdir="/tmp/edgeship"),
                            layers, groups, args, tmp / "probes", tmp)  # fmt: skip
            finally:
                pi.stop()
        host = start_sshd(tmp / "host-sshd")
        try:
            rows += _on("this machine over loopback ssh", host.transport(python=sys.executable), layers, groups, args,
                        tmp / "probes", tmp)  # fmt: skip
        finally:
            host.stop()
    return rows, build_s, len(entries)


def render(rows: list[dict[str, Any]], build_s: float, n: int, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"{HEADING} ({args.model}, {args.precision}, {args.threads} thread)",
        "",
        f"The {n} probes of {args.model}'s table (channel multiple 8, max_layer_ratio 0.8, max_points "
        f"{args.max_points}; {args.batch} probes per batch) were built here in {build_s:.0f} s, then timed over "
        "ssh (10 warm-up + 50 runs and at least 0.1 s per probe), each device with a fresh cache and then again:",
        "",
        "| device | run | probes timed | from cache | seconds | fingerprint |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['device']} | {r['run']} | {r['measured']} | {r['cached']} | {r['seconds']:.1f} | "
              f"{r['fingerprint']} |" for r in rows]  # fmt: skip
    lines += [
        "",
        f"Load average of this 2-core machine while it ran: {args.load[0]:.1f} at the start, {args.load[1]:.1f} at "
        "the end (other jobs shared it: the seconds are upper bounds).",
        "",
        "The emulated Pi runs arm64 code under qemu-user, about 100x slower than a real board: its seconds bound "
        "the copy and process overhead from above and say nothing about a Pi's kernels. On a real board expect "
        "the loopback row's overhead plus the board's own time per probe (about 60 invocations of one layer each). "
        "qemu-user shows the host's /proc/cpuinfo, so the emulated Pi's CPU reads as this machine's; a real board's "
        "fingerprint has its own (`Model` line and CPU part numbers). "
        "A rerun, another model sharing layer geometries, or another deploy to the same kind of device reads the "
        "cache instead (the `again` rows: only the device fingerprint is read).",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_cnn")
    ap.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-points", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start_load = os.getloadavg()[0]
    rows, build_s, n = measure(args)
    args.load = (start_load, os.getloadavg()[0])
    command = ("python -m bench.device_table " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    section = render(rows, build_s, n, args, command)
    print(section)
    if not args.no_write:
        from bench.sections import write_section

        write_section(args.out, HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
