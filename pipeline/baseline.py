"""Train a built-in model on Fashion-MNIST and write its checkpoint and measured figures.

python -m pipeline.baseline [--model fmnist_cnn] [--epochs N] [--out models/<model>.pt] [--measure-only]
(`make baseline MODEL=resnet_fm`: the Makefile hands MODEL over as EDGESHIP_MODEL, the default of --model;
`make baseline MODEL=resnet_fm ARGS=--measure-only` adds MACs, parameters, TFLite sizes and 1-thread
latencies measured on this machine to an existing checkpoint's figures).

Models whose input is not 1x28x28 (resnet_fm, mobilenetv2_fm: 3x64x64) see Fashion-MNIST resized to their
input (bilinear, rounded back to uint8 pixels) and replicated to their channels: `fit_images`. Those models
hold out the validation split the pipeline carves from train (pipeline.data.sources.split_validation with the
DataPlan defaults: 10% of each class, at most 5000 images, seed 0), so the pipeline's decisions are made on
images the baseline never saw; nothing is tuned on the test split, read once at the end for the recorded figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.artifacts import write_text_atomic
from pipeline.data.fashion_mnist import fit_images, load_fashion_mnist
from pipeline.data.imageset import ImageSet
from pipeline.data.sources import split_validation
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import get_model_spec
from pipeline.train.distill import accuracy, predict

REPO = Path(__file__).resolve().parent.parent
VAL_FRACTION, VAL_MAX, VAL_SEED = 0.1, 5000, 0  # the DataPlan defaults: the same images the pipeline validates on
VAL_REPORT = 1000  # validation images the recorded validation accuracy is measured on

# Per-model training defaults. fmnist_cnn: what `make baseline` always did (all 60000 train images, no split).
# The bench models are sized to be slow (>= 1 ms int8), so they are trained cheaply on the shared 2-core host:
# a train subset; `bf16`: forward and backward under CPU autocast to bfloat16 (weights and optimizer stay
# float32), 2-3x faster on CPUs with AVX512-BF16; `low_res_epochs`: the first epochs see the images at half the
# model's side (a quarter of the compute; the models are fully convolutional up to the global pool), the last
# ones at full size, so BatchNorm and the filters settle at the resolution the model is used at.
DEFAULTS: dict[str, dict] = {
    "fmnist_cnn": {"epochs": 3, "low_res_epochs": 0, "batch_size": 128, "lr": 3e-3, "train_limit": None,
                   "hold_out_val": False, "bf16": False},
    "resnet_fm": {"epochs": 5, "low_res_epochs": 4, "batch_size": 64, "lr": 3e-3, "train_limit": 12000,
                  "hold_out_val": True, "bf16": True},
    "mobilenetv2_fm": {"epochs": 4, "low_res_epochs": 3, "batch_size": 128, "lr": 3e-3, "train_limit": 8000,
                       "hold_out_val": True, "bf16": True},
    "branchnet_fm": {"epochs": 4, "low_res_epochs": 3, "batch_size": 64, "lr": 3e-3, "train_limit": 12000,
                     "hold_out_val": True, "bf16": False},  # bf16 autocast was slower on a CPU without AVX512
}  # fmt: skip


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (replicate-pad by 1/14 of the side, 2 px at 28x28, then crop) and horizontal flip, per batch."""
    _, _, h, w = x.shape
    p = max(2, round(2 * h / 28))
    dy, dx, flip = torch.randint(0, 2 * p + 1, (3,), generator=gen).tolist()
    x = F.pad(x, (p, p, p, p), mode="replicate")[:, :, dy : dy + h, dx : dx + w]
    return x.flip(3) if flip % 2 else x


def train_val(*, hold_out_val: bool, train_limit: int | None, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """(images trained on, validation split or None): the train split less the pipeline's validation split
    when `hold_out_val`, then a seeded subset of `train_limit` images."""
    train = load_fashion_mnist("train")
    val = None
    if hold_out_val:
        train, val = split_validation(train, fraction=VAL_FRACTION, max_images=VAL_MAX, seed=VAL_SEED)
    return train.subset(train_limit, seed=seed), val


def _eval(model: torch.nn.Module, spec: ModelSpec, data: ImageSet) -> float:
    fitted = ImageSet(fit_images(data.images, spec.input_shape), data.labels, data.class_names, data.source)
    return float(accuracy(predict(model, spec, fitted, batch_size=250), fitted.labels))


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    low_res_epochs: int
    batch_size: int
    lr: float
    train_limit: int | None
    hold_out_val: bool
    bf16: bool = False
    seed: int = 0


def _epoch(model: torch.nn.Module, spec: ModelSpec, data: ImageSet, shape: tuple[int, int, int], s: TrainSettings,
           step: Callable[[torch.Tensor], None], gen: torch.Generator) -> None:  # fmt: skip
    order = torch.randperm(len(data), generator=gen).numpy()
    for i in range(0, len(order) - s.batch_size + 1, s.batch_size):
        idx = order[i : i + s.batch_size]
        x = _augment(spec.to_tensor(fit_images(data.images[idx], shape)), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            logits = model(x)
        step(F.cross_entropy(logits.float(), torch.from_numpy(data.labels[idx]), label_smoothing=0.05))


def train(model_name: str, s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(s.seed)
    spec = get_model_spec(model_name)
    train_set, val_set = train_val(hold_out_val=s.hold_out_val, train_limit=s.train_limit, seed=s.seed)
    model = spec.build().train()
    steps = s.epochs * (len(train_set) // s.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(s.seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"train {model_name}", unit="step", disable=None)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = sched.last_epoch
        if bar.disable and done % 50 == 0:  # no terminal: a line now and then instead of the bar
            print(f"step {done}/{steps} loss {loss.item():.3f} {time.perf_counter() - start:.0f} s", flush=True)

    c, h, w = spec.input_shape
    for epoch in range(s.epochs):
        shape = (c, h // 2, w // 2) if epoch < s.low_res_epochs else spec.input_shape
        _epoch(model, spec, train_set, shape, s, step, gen)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    return model, _figures(model_name, model, spec, s, train_set, val_set, seconds)


def _figures(model_name: str, model: torch.nn.Module, spec: ModelSpec, s: TrainSettings, train_set: ImageSet,
             val_set: ImageSet | None, seconds: float) -> dict:  # fmt: skip
    """What the checkpoint records; the test split is read here, once, after training."""
    test_set = load_fashion_mnist("test")
    figures = {
        "model": model_name,
        "test_accuracy": round(_eval(model, spec, test_set), 4),
        "test_images": len(test_set),
        "epochs": s.epochs,
        "train_images": len(train_set),
        "seed": s.seed,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "train_seconds": round(seconds, 1),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    if val_set is not None:
        c, h, w = spec.input_shape
        figures["input"] = f"Fashion-MNIST resized (bilinear) to {c}x{h}x{w}"
        figures["low_res_epochs"] = s.low_res_epochs
        figures["bf16_autocast"] = s.bf16
        figures["val_images"] = len(val_set)  # held out; its accuracy on a seeded subset (full: the pipeline's job)
        figures["val_accuracy_subset"] = {
            "images": VAL_REPORT,
            "accuracy": round(_eval(model, spec, val_set.subset(VAL_REPORT)), 4),
        }
    return figures


def measure(model: torch.nn.Module, spec: ModelSpec, work: Path, *, runs: int = 200) -> dict:
    """MACs, parameters, and the fp32 and int8 TFLite files' sizes and latency at 1 thread on this machine, made
    with the project's own export, conversion (int8 calibrated on the 500 committed train images) and runner."""
    from pipeline.bench import BenchSettings, profile_local
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import export_onnx
    from pipeline.data.calibration import load_calibration
    from pipeline.pruning.channels import count_macs_params

    cal = load_calibration(REPO / "calibration_data" / "fashion_mnist_train_500.npz")
    cal = ImageSet(fit_images(cal.images, spec.input_shape), None, spec.class_names, cal.source)
    macs, params = count_macs_params(model.eval(), torch.zeros(1, *spec.input_shape))
    onnx = export_onnx(model, spec, work / "model.onnx", check_images=cal.images[:8])
    files = convert_tflite(onnx, spec, work, precisions=("fp32", "int8"), calibration=cal)
    out: dict = {"macs": macs, "params": params, "tflite": {}}
    for precision, f in files.items():
        r = profile_local(f.path, BenchSettings(threads=1, warmup=20, runs=runs))["latency_ms"]
        out["tflite"][precision] = {"size_bytes": f.size_bytes, "latency_ms_1thread": {k: r[k] for k in ("p50", "min")}}
    out["where"] = (f"this machine, {runs} runs after 20 warm-up, load average {os.getloadavg()[0]:.1f} "
                       f"on {os.cpu_count()} cores when done")  # fmt: skip
    return out


def _measure_only(name: str, out: Path) -> int:
    import tempfile

    spec = get_model_spec(name)
    model, figures = load_checkpoint(out, spec.build())
    with tempfile.TemporaryDirectory(prefix="edgeship-baseline-") as work:
        figures["measured"] = measure(model, spec, Path(work))
    return _write(model, out, figures)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("EDGESHIP_MODEL") or "fmnist_cnn", choices=sorted(DEFAULTS))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--train-limit", type=int, help="train on a seeded subset of this many images")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--measure-only", action="store_true", help="measure the checkpoint at --out, train nothing")
    args = ap.parse_args(argv)
    if args.model not in DEFAULTS:  # argparse does not check a default (EDGESHIP_MODEL, make's MODEL) against choices
        ap.error(f"--model / MODEL {args.model!r}: trainable models are {', '.join(sorted(DEFAULTS))}")
    out = args.out or REPO / "models" / f"{args.model}.pt"
    if args.measure_only:
        return _measure_only(args.model, out)
    d = DEFAULTS[args.model]
    pick = {
        k: d[k] if getattr(args, k) is None else getattr(args, k) for k in ("epochs", "batch_size", "lr", "train_limit")
    }
    low = min(d["low_res_epochs"], pick["epochs"] - 1)
    s = TrainSettings(**pick, low_res_epochs=low, hold_out_val=d["hold_out_val"], bf16=d["bf16"], seed=args.seed)
    if s.epochs < 1 or s.batch_size < 1 or s.lr <= 0 or (s.train_limit is not None and s.train_limit < s.batch_size):
        ap.error("--epochs and --batch-size must be >= 1, --lr > 0, --train-limit >= the batch size")
    model, figures = train(args.model, s)
    cmd = ["--epochs", str(s.epochs), "--seed", str(s.seed)]
    if args.model != "fmnist_cnn":
        cmd = ["--model", args.model, *cmd, "--train-limit", str(s.train_limit)]
    figures["trained_with"] = "python -m pipeline.baseline " + shlex.join(cmd)
    return _write(model, out, figures)


def _write(model: torch.nn.Module, out: Path, figures: dict) -> int:
    save_checkpoint(model, out, meta=figures)
    write_text_atomic(out.with_suffix(".json"), json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
