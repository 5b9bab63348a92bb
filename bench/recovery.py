"""Benchmark: what a pruned model keeps before any fine-tuning, by how it is recovered, in one run.

    python -m bench.recovery [--models fmnist_cnn resnet_fm mobilenetv2_fm efficientnet_lite0] [--keeps 0.75 0.6]

Per model (its own checkpoint) and per share of channels kept (the same uniform L2 cut of every prunable group,
channel multiple 8, so that only the recovery differs), the pruned model's PyTorch accuracy on the test split:
- `none`: the pruned weights as they are;
- `BatchNorm re-estimated` on the training images (`recalibrate_bn`, the sensitivity trials' recovery);
- `least-squares refit` (ours, `pruning.reconstruct`: pipeline/pruning/reconstruct.py) on the same images.
The recovery images are training images (--recovery-images, the bench's BatchNorm set); the test split is read
only to score. For efficientnet_lite0 the test set is the photo set's held-out photos labelled by the unpruned
model: accuracy there is top-1 agreement with the unpruned model.
Prints the table and rewrites the "Recovery before fine-tuning" section of BENCHMARKS.md with the command.
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
from typing import Any

import torch

from bench.common import add_data_args, add_output_args, command
from bench.pruning_methods import _data
from bench.sections import write_section
from pipeline.artifacts import write_json_atomic
from pipeline.deploy import REPO
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.zoo import get_model_spec
from pipeline.pruning.calibrate import evaluate, recalibrate_bn
from pipeline.pruning.channels import count_macs_params, kept_outputs, prunable_groups, prune_to_plan, uniform_plan
from pipeline.pruning.reconstruct import reconstruct

SECTION = "## Recovery before fine-tuning"
log = logging.getLogger("bench.recovery")


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = get_model_spec(name)
    data = _data(spec, args)
    base = load_checkpoint(REPO / spec.default_checkpoint, spec.build())[0].eval()
    ex = torch.zeros(1, *spec.input_shape)
    test = spec.batches(data.test, batch_size=50)
    fit = spec.batches(data.train, limit=args.recovery_images, seed=1, batch_size=32)
    macs0 = count_macs_params(base, ex)[0]
    groups = prunable_groups(base, ex)
    rows = [{"model": name, "keep": 1.0, "macs": 1.0, "none": evaluate(base, test)[1]}]
    for keep in args.keeps:
        pruned = prune_to_plan(base, ex, uniform_plan(groups, keep, multiple=8, max_ratio=0.9), groups=groups)
        row = {"model": name, "keep": keep, "macs": round(count_macs_params(pruned, ex)[0] / macs0, 4),
               "none": evaluate(pruned, test)[1]}  # fmt: skip
        bn = recalibrate_bn(copy.deepcopy(pruned), fit)
        row["bn"] = evaluate(bn, test)[1]
        t0 = time.perf_counter()
        refit = copy.deepcopy(pruned)
        errors = reconstruct(base, refit, kept_outputs(refit), ex, fit)
        row["refit_seconds"] = round(time.perf_counter() - t0, 1)
        row["refit"] = evaluate(refit, test)[1]
        row["refitted_layers"] = len(errors)
        log.info("%s keep %.2f: %s", name, keep, row)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | channels kept | MACs x | none % | BatchNorm re-estimated % | least-squares refit % "
           "| refit vs BatchNorm (points) | layers refitted | refit s |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["keep"] == 1.0:
            out.append(f"| {r['model']} | unpruned | 1.000 | {100 * r['none']:.2f} | - | - | - | - | - |")
            continue
        out.append(f"| {r['model']} | {r['keep']:g} | {r['macs']:.3f} | {100 * r['none']:.2f} | {100 * r['bn']:.2f} "
                   f"| {100 * r['refit']:.2f} | {100 * (r['refit'] - r['bn']):+.2f} | {r['refitted_layers']} "
                   f"| {r['refit_seconds']} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist_cnn", "resnet_fm", "mobilenetv2_fm", "efficientnet_lite0"])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.6], help="share of each group's channels")
    ap.add_argument("--recovery-images", type=int, default=256)
    add_data_args(ap, train_images=6000, test_images=1000)
    add_output_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    if args.from_result:
        result = json.loads(args.from_result.read_text())
    else:
        t0, rows = time.perf_counter(), []
        for name in args.models:
            rows += run_model(name, args)
        result = {"command": command("bench.recovery", argv), "seconds": round(time.perf_counter() - t0), "rows": rows,
                  "machine": platform.machine(), "cores": len(os.sched_getaffinity(0))}  # fmt: skip
        write_json_atomic(REPO / "bench" / "results" / "recovery.json", result)
    lines = table(result["rows"])
    print("\n".join(lines))
    if args.no_write:
        return 0
    pruned = [r for r in result["rows"] if r["keep"] < 1.0]
    wins = sum(r["refit"] > r["bn"] for r in pruned)
    body = [SECTION, "", f"Command: `{result['command']}` ({result['seconds']} s, {result['machine']}, "
            f"{result['cores']} cores). The same uniform L2 cut (each group keeps the share of its channels shown, "
            "channel multiple 8) recovered three ways, no fine-tuning; PyTorch accuracy on the test split "
            f"(efficientnet_lite0: top-1 agreement with the unpruned model on held-out photos). Recovery on "
            f"{args.recovery_images} training images.", "", *lines, "",
            f"Reading: the refit beats BatchNorm re-estimation in {wins} of {len(pruned)} rows.", ""]  # fmt: skip
    write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
