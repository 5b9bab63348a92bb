"""Fine-tuning throughput on this machine's CPUs at 1 and 2 processes (DDP, gloo), for BENCHMARKS.md.

The pipeline's own distillation step (pipeline/train/distill.py: teacher forward, student forward and backward,
AdamW) on the default model and data (fmnist_cnn distilled into a copy of itself, Fashion-MNIST streamed through
the DataLoader), each world size started by torchrun exactly as `edgeship deploy --nproc N` does
(pipeline/train/launch.py), with `--threads` intra-op threads per process (0: cores / N, as the launcher
sets OMP_NUM_THREADS). The runs
alternate (1, 2, 1, 2, ...) so that a busy machine slows both alike; the table gives the median images/s
(all ranks together, evaluations excluded) and the ratio of the medians.

    .venv/bin/python -m bench.finetune_scaling            # ~2-4 min; rewrites its section of BENCHMARKS.md
    .venv/bin/python -m bench.finetune_scaling --no-write --steps 40 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from bench.sections import write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Fine-tuning throughput on this machine's CPUs (DDP)"


def worker(out: Path, steps: int, batch: int) -> None:
    """One torchrun rank: fine-tune `steps` global steps; rank 0 writes the figures."""
    import torch.distributed as dist

    from pipeline.data.fashion_mnist import load_fashion_mnist
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.models.zoo import get_model_spec
    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd
    from pipeline.train.world import world_from_env

    world = world_from_env()
    if world.distributed:
        dist.init_process_group("gloo")
    spec = get_model_spec("fmnist_cnn")
    model = load_checkpoint(REPO / spec.default_checkpoint, spec.build())[0]
    data = load_fashion_mnist("train")
    epochs = steps * batch / len(data)
    cfg = Finetune(epochs=epochs, batch_size=batch, min_steps=steps, early_stopping=False, device="cpu")
    result = finetune_kd(model, model, spec, data, cfg, world=world)
    if world.distributed:
        dist.destroy_process_group()
    if world.is_main:
        out.write_text(json.dumps({"world": result.world_size, "images_per_s": result.images_per_s,
                                   "images": result.images_seen, "seconds": result.train_seconds,
                                   "device": result.device, "steps": result.steps}))  # fmt: skip


def measure(nproc: int, steps: int, batch: int, threads: int) -> dict:
    from pipeline.proc import run_tool
    from pipeline.train.launch import torchrun_argv

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        argv = torchrun_argv(["--worker", str(out), "--steps", str(steps), "--batch", str(batch)], nproc,
                             module="bench.finetune_scaling")  # fmt: skip
        cores = len(os.sched_getaffinity(0))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or max(1, cores // nproc)), "PYTHONPATH": str(REPO)}
        run = run_tool(argv, timeout_s=1800, env=env, cwd=REPO, merge_stderr=True)
        if run.rc != 0:
            raise SystemExit(f"torchrun with {nproc} processes failed:\n{run.stdout[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="global steps per run")
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per world size, alternating")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (0: cores / N, as "
                    "`deploy --nproc` sets them)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.batch)
        return 0
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for n in (1, 2):
            runs[n].append(measure(n, args.steps, args.batch, args.threads))
            print(f"round {r + 1}, {n} process(es): {runs[n][-1]['images_per_s']:.0f} images/s", file=sys.stderr)
    med = {n: statistics.median(x["images_per_s"] for x in rs) for n, rs in runs.items()}
    cores = len(os.sched_getaffinity(0))
    rows = ["| processes | threads each | images/s (median) | each run | vs 1 process |", "|---|---|---|---|---|"]
    for n, rs in runs.items():
        each = ", ".join(f"{x['images_per_s']:.0f}" for x in rs)
        rows.append(f"| {n} | {args.threads or max(1, cores // n)} | {med[n]:.0f} | {each} | {med[n] / med[1]:.2f}x |")
    load = os.getloadavg()
    cmd = "python -m bench.finetune_scaling" + ("" if not argv else " " + shlex.join(argv))
    body = [
        SECTION, "",
        f"Command: `{cmd}`. Machine: {platform.processor() or platform.machine()}, {cores} cores, load average "
        f"{load[0]:.1f} at the end (the machine is shared; the runs alternate so both sizes see the same load). "
        f"fmnist_cnn distilled into a copy of itself on Fashion-MNIST (in memory, through the DataLoader), "
        f"{args.steps} global steps of {args.batch} images, {args.rounds} runs per size, each started by torchrun "
        "(gloo) as `edgeship deploy --nproc N` starts it.", "", *rows, "",
        "One intra-op thread per process by default: on this shared machine two threads in one process spin "
        "against the other tenants (a 1-process, 2-thread run measured 83 images/s while the same step ran at "
        "~550 images/s on 2 single-thread ranks), so 1 thread each isolates what DDP's split of the batch "
        "and its gradient all-reduce gain on a second core. Not a GPU figure: see the GPU section.",
    ]  # fmt: skip
    print("\n".join(rows))
    if not args.no_write:
        write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
