"""Fine-tuning throughput on GPUs: the ResNet-style bench model at 224x224 with AMP, on 1 and N GPUs (DDP, NCCL).

The pipeline's own distillation step (pipeline/train/distill.py: teacher forward, student forward and backward,
AdamW; bf16 autocast where the GPU has it, else fp16 with a GradScaler; channels_last), fed by its DataLoader
(pipeline/data/loader.py; uint8 images shifted in worker processes, pinned, normalised on the GPU), each world
size started by torchrun as `edgeship deploy --nproc N` starts it. Images are random uint8 224x224x3 in memory
(the model's speed, not a disk's); `--data DIR` streams an image folder (DIR/train/<class>/) instead. A warm-up
run (cuDNN autotuning, allocations) precedes each measured one. The same step on this machine's CPU (one
process, all cores, a few steps) gives the GPU/CPU ratio. Where torch sees no GPU the section of BENCHMARKS.md
says so (with the CPU figure) and the script stays for a machine that has one.

    .venv/bin/python -m bench.gpu_finetune                     # all GPUs; rewrites its section of BENCHMARKS.md
    .venv/bin/python -m bench.gpu_finetune --gpus 2 --steps 100 --batch 256 --no-write
    .venv/bin/python -m bench.gpu_finetune --model pipeline.models.resnet_fm:ResNetFM   # the default
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.sections import write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Fine-tuning on GPUs (ResNet-style bench model, 224x224, AMP)"
DEFAULT_MODEL = "pipeline.models.resnet_fm:ResNetFM"


def _spec(model: str, size: int):
    from pipeline.models.spec import ModelSpec

    module, _, name = model.partition(":")
    factory = getattr(importlib.import_module(module), name)
    classes = tuple(f"c{i}" for i in range(10))
    return ModelSpec("bench", factory, (3, size, size), (0.5,) * 3, (0.25,) * 3, classes)


def _data(args: argparse.Namespace, n: int):
    import numpy as np

    from pipeline.data.imageset import ImageSet

    if args.data is not None:
        from pipeline.data.sources import DataPlan

        return DataPlan(_spec(args.model, args.size), data_dir=args.data).train_stream
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    return ImageSet(images, rng.integers(0, 10, n).astype(np.int64), tuple(f"c{i}" for i in range(10)), "random")


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank (or the CPU reference): a warm-up run, then the measured one; rank 0 writes."""
    import torch.distributed as dist

    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd
    from pipeline.train.world import world_from_env

    world = world_from_env()
    device = "cpu" if args.cpu else "cuda"
    if world.distributed:
        import torch

        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl")
    spec = _spec(args.model, args.size)
    per_rank = args.batch if not args.cpu else args.cpu_batch
    steps = args.steps if not args.cpu else args.cpu_steps
    data = _data(args, max(4 * per_rank * world.size, 512 if not args.cpu else 4 * per_rank))
    model = spec.build()
    figures = {}
    for phase, n in (("warm-up", 1 if args.cpu else max(3, steps // 10)), ("measured", steps)):
        cfg = Finetune(epochs=n * per_rank * world.size / len(data), batch_size=per_rank * world.size, min_steps=n,
                       early_stopping=False, device=device, amp=args.amp if not args.cpu else "off",
                       workers=args.workers if not args.cpu else 0)  # fmt: skip
        start = time.perf_counter()
        result = finetune_kd(model, model, spec, data, cfg, world=world)
        figures[phase] = {"images_per_s": result.images_per_s, "images": result.images_seen, "steps": result.steps,
                          "seconds": result.train_seconds, "wall_s": round(time.perf_counter() - start, 2),
                          "device": result.device, "world": result.world_size}  # fmt: skip
    if world.distributed:
        dist.destroy_process_group()
    if world.is_main:
        args.worker.write_text(json.dumps(figures))


def measure(args: argparse.Namespace, nproc: int, *, cpu: bool = False) -> dict:
    from pipeline.proc import run_tool
    from pipeline.train.launch import torchrun_argv

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        words = ["--worker", str(out), "--model", args.model, "--size", str(args.size), "--steps", str(args.steps),
                 "--batch", str(args.batch), "--amp", args.amp, "--workers", str(args.workers),
                 "--cpu-steps", str(args.cpu_steps), "--cpu-batch", str(args.cpu_batch),
                 *(["--data", str(args.data)] if args.data else []), *(["--cpu"] if cpu else [])]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if cpu:
            env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
        run = run_tool(torchrun_argv(words, nproc, module="bench.gpu_finetune"), timeout_s=3600, env=env, cwd=REPO,
                       merge_stderr=True)  # fmt: skip
        if run.rc != 0:
            raise SystemExit(f"torchrun with {nproc} process(es) failed:\n{run.stdout[-4000:]}")
        return json.loads(out.read_text())["measured"]


def _rows(gpu: dict[int, dict], cpu: dict | None) -> list[str]:
    rows = ["| run | device | images/s | vs 1 GPU | vs CPU |", "|---|---|---|---|---|"]
    one = gpu.get(1, {}).get("images_per_s")
    for n, r in gpu.items():
        vs_cpu = f"{r['images_per_s'] / cpu['images_per_s']:.1f}x" if cpu else "n/a"
        rows.append(f"| {n} GPU{'s' if n > 1 else ''} (DDP) | {r['device']} | {r['images_per_s']:.0f} | "
                    f"{r['images_per_s'] / one:.2f}x | {vs_cpu} |")  # fmt: skip
    if cpu:
        rows.append(f"| CPU, 1 process | {cpu['device']} | {cpu['images_per_s']:.2f} | | 1.0x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"module:factory of the model (default {DEFAULT_MODEL})")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--gpus", type=int, default=None, help="the N of '1 and N GPUs' (default: all)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128, help="images per GPU and step")
    ap.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    ap.add_argument("--workers", type=int, default=6, help="DataLoader workers per GPU")
    ap.add_argument("--data", type=Path, help="stream DIR/train/<class>/ instead of random images")
    ap.add_argument("--cpu-steps", type=int, default=3)
    ap.add_argument("--cpu-batch", type=int, default=8)
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU reference run")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    cmd = "python -m bench.gpu_finetune" + ("" if not argv else " " + shlex.join(argv))
    cpu = None if args.skip_cpu else measure(args, 1, cpu=True)
    machine = f"{platform.node() or 'this machine'} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)"
    head = [SECTION, "", f"Command: `{cmd}` on {machine}, torch {torch.__version__}."]
    if not torch.cuda.is_available():
        rate = f"{cpu['images_per_s']:.2f} images/s on {cpu['device']}" if cpu else "not measured"
        body = [*head, "", f"**No GPU was available** (torch sees no CUDA device; {time.strftime('%Y-%m-%d')}), so "
                "there are no GPU figures yet: run this command on a machine with NVIDIA GPUs. The same "
                f"distillation step of the model at {args.size}x{args.size} on this CPU: {rate} "
                f"({args.cpu_steps} steps of {args.cpu_batch} images). Goals: 2 GPUs >= 1.8x one; one GPU >= 20x "
                "this CPU."]  # fmt: skip
        print("\n".join(body[2:]))
    else:
        n = args.gpus or torch.cuda.device_count()
        gpu = {k: measure(args, k) for k in sorted({1, n})}
        rows = _rows(gpu, cpu)
        body = [*head, "", f"{args.steps} measured steps of {args.batch} images per GPU after a warm-up run; "
                f"model {args.model} at {args.size}x{args.size}, AMP {args.amp}.", "", *rows]  # fmt: skip
        print("\n".join(rows))
    if not args.no_write:
        write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
