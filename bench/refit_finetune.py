"""Benchmark: distilling a refitted pruned model: BatchNorm mode, learning rate and training photos, in one run.

    python -m bench.refit_finetune [--models efficientnet_lite0] [--keep 0.77] [--variants 1e-3:train 1e-3:frozen]
                                   [--photo-extra /usr/share/backgrounds /usr/share/wallpapers] [--steps 120]

Per model and training set (efficientnet_lite0: the scikit-image photo set and, with --photo-extra, the same set
with those folders' photos added for training; the held-out test photos are the same in both), the same uniform
L2 cut to --keep of the MACs (channel multiple 8) is recovered by the least-squares refit on training images
(pipeline/pruning/reconstruct.py). Each variant `lr:bn` (`finetune.lr`, `finetune.bn`) then distils that one
refitted model for --steps steps at --batch-size, evaluating on the validation split (carved from train) and
keeping the best checkpoint. The test split is read only to score: PyTorch top-1 accuracy (for
efficientnet_lite0, top-1 agreement with the unpruned model on held-out photos).
Prints the table and rewrites the "Distilling a refitted model" section of BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import add_data_args, add_output_args, command
from bench.pruning_methods import _data
from bench.sections import write_section
from pipeline.artifacts import write_json_atomic
from pipeline.deploy import REPO
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.zoo import get_model_spec
from pipeline.pruning.calibrate import evaluate
from pipeline.pruning.channels import prune_to_target
from pipeline.pruning.reconstruct import recover
from pipeline.targets import Finetune, PruneTarget, Pruning
from pipeline.train.distill import finetune_kd

SECTION = "## Distilling a refitted model"
log = logging.getLogger("bench.refit_finetune")


def _variant(text: str) -> tuple[float, str, float]:
    """`LR:BN[:T]`, e.g. `1e-4:frozen:1` (T: the distillation temperature, default 4)."""
    parts = text.split(":")
    lr, bn, t = parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "4"
    if bn not in ("train", "frozen", "auto"):
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is LR:BN[:T], BN one of train, frozen, auto "
                                         "(e.g. 1e-4:frozen:1)")  # fmt: skip
    try:
        return float(lr), bn, float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {lr!r} or {t!r} is not a number") from None


def run_set(name: str, extra: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = get_model_spec(name)
    data = _data(spec, argparse.Namespace(**{**vars(args), "photo_extra": extra}))
    base = load_checkpoint(REPO / spec.default_checkpoint, spec.build())[0].eval()
    ex = torch.zeros(1, *spec.input_shape)
    val = spec.batches(data.val, limit=500, seed=0)
    fit = spec.batches(data.train, limit=args.recovery_images, seed=1)
    test = spec.batches(data.test, batch_size=50)
    cfg = Pruning(target=PruneTarget(metric="macs", keep=args.keep), channel_multiple=8, importance="l2",
                  allocation="uniform")  # fmt: skip
    t0 = time.perf_counter()
    cut = prune_to_target(base, ex, cfg, batches=val)
    recover(base, cut.model, cfg, ex, fit)
    refit_s = round(time.perf_counter() - t0)
    photos = "photo set" + (f" + {len(extra)} extra folders" if extra else "") if name == "efficientnet_lite0" else "-"
    common = {"model": name, "photos": photos, "train_images": len(data.train), "macs": round(cut.keep_achieved, 4),
              "refit_val": round(evaluate(cut.model, val)[1], 4), "refit_test": round(evaluate(cut.model, test)[1], 4),
              "refit_seconds": refit_s}  # fmt: skip
    log.info("%s (%s): refit in %d s, val %.4f, test %.4f", name, photos, refit_s, common["refit_val"],
             common["refit_test"])  # fmt: skip
    rows = []
    for lr, bn, temp in args.variants:
        t0 = time.perf_counter()
        ft = Finetune(epochs=0.01, batch_size=args.batch_size, min_steps=args.steps, evaluations=args.evaluations,
                      lr=lr, bn=bn, temperature=temp)  # type: ignore[arg-type]  # fmt: skip
        done = finetune_kd(copy.deepcopy(cut.model), base, spec, data.train, ft, seed=0, val=val)
        row = {**common, "lr": lr, "bn": bn, "temperature": temp, "bn_frozen": done.bn_frozen, "steps": done.steps,
               "best_step": done.best_step, "val_curve": [list(x) for x in done.val_curve],
               "test": round(evaluate(done.model, test)[1], 4), "seconds": round(time.perf_counter() - t0)}  # fmt: skip
        log.info("%s lr %g bn %s: best step %s, test %.4f (%s)", name, lr, bn, done.best_step, row["test"],
                 row["val_curve"])  # fmt: skip
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | training photos | train images | MACs x | refit: val % | refit: test % | lr | BatchNorm | T "
           "| val % at step 0 / best (step) / last | kept: test % | vs refit (points) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        curve = dict((int(s), a) for s, a in r["val_curve"])
        last = curve[max(curve)] if curve else float("nan")
        best = curve.get(r["best_step"], float("nan")) if r["best_step"] is not None else float("nan")
        out.append(f"| {r['model']} | {r['photos']} | {r['train_images']} | {r['macs']:.3f} "
                   f"| {100 * r['refit_val']:.1f} | {100 * r['refit_test']:.1f} | {r['lr']:g} "
                   f"| {'frozen' if r['bn_frozen'] else 'training'} | {r.get('temperature', 4.0):g} "
                   f"| {100 * curve.get(0, float('nan')):.1f} / "
                   f"{100 * best:.1f} ({r['best_step']}) / {100 * last:.1f} | {100 * r['test']:.1f} "
                   f"| {100 * (r['test'] - r['refit_test']):+.1f} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--keep", type=float, default=0.77, help="share of the MACs the uniform cut keeps")
    ap.add_argument("--variants", type=_variant, nargs="+", default=[(1e-3, "train", 4.0), (1e-4, "frozen", 1.0),
                                                                     (1e-5, "frozen", 4.0)])  # fmt: skip
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--evaluations", type=int, default=6)
    ap.add_argument("--recovery-images", type=int, default=256)
    add_data_args(ap, train_images=6000, test_images=288)  # with --photo-extra: run without it, then with it
    add_output_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    if args.from_result:
        result = json.loads(args.from_result.read_text())
    else:
        t0, rows = time.perf_counter(), []
        for name in args.models:
            sets = [[], args.photo_extra] if name == "efficientnet_lite0" and args.photo_extra else [[]]
            for extra in sets:
                rows += run_set(name, extra, args)
                result = {"command": command("bench.refit_finetune", argv), "rows": rows,
                          "seconds": round(time.perf_counter() - t0), "steps": args.steps,
                          "batch_size": args.batch_size, "machine": platform.machine(),
                          "cores": len(os.sched_getaffinity(0))}  # fmt: skip
                write_json_atomic(REPO / "bench" / "results" / "refit_finetune.json", result)  # saved as it goes
    lines = table(result["rows"])
    print("\n".join(lines))
    if args.no_write:
        return 0
    body = [SECTION, "", f"Command: `{result['command']}` ({result['seconds']} s, {result['machine']}, "
            f"{result['cores']} cores). One uniform L2 cut per row group (channel multiple 8), recovered by the "
            "least-squares refit, then distilled from the unpruned model by each variant for "
            f"{result['steps']} steps at batch {result['batch_size']} (AdamW, warm-up then cosine, early stopping "
            "on validation: the checkpoint kept is the best validation one, step 0 being the refitted model "
            "itself). BatchNorm `training`: batch statistics, running statistics updated; `frozen`: the running "
            "statistics (the unpruned model's, restored by the refit) kept, scale and shift trained. Validation "
            "is carved from the training photos' crops; test % is PyTorch top-1 on the held-out test photos "
            "(efficientnet_lite0: agreement with the unpruned model), read only to score.", "", *lines, ""]  # fmt: skip
    write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
