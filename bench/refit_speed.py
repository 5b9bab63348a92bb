"""How long the least-squares refit (pipeline/pruning/reconstruct.py) takes: one lockstep pass over the batches
against capturing each layer's input and target with its own forward passes (the fallback for a model torch.fx
cannot trace), on the same uniform cut, in one run; and whether the two give the same weights.

    python -m bench.refit_speed [--models fmnist_cnn resnet_fm mobilenetv2_fm efficientnet_lite0] [--keep 0.75]
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
from pipeline.pruning import reconstruct as rc
from pipeline.pruning.channels import kept_outputs, prunable_groups, prune_to_plan, uniform_plan

SECTION = "## Refit time (one pass vs layer by layer)"
log = logging.getLogger("bench.refit_speed")


def _timed(base: torch.nn.Module, pruned: torch.nn.Module, ex: torch.Tensor, fit: list,
           *, one_pass: bool) -> tuple[float, torch.nn.Module, dict[str, float]]:  # fmt: skip
    model = copy.deepcopy(pruned)
    saved = rc.LOCKSTEP_BYTES
    rc.LOCKSTEP_BYTES = saved if one_pass else -1  # -1: never fits, so every layer is captured on its own
    try:
        start = time.perf_counter()
        errors = rc.reconstruct(base, model, kept_outputs(model), ex, fit)
        return time.perf_counter() - start, model, errors
    finally:
        rc.LOCKSTEP_BYTES = saved


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = get_model_spec(name)
    data = _data(spec, args)
    base = load_checkpoint(REPO / spec.default_checkpoint, spec.build())[0].eval()
    ex = torch.zeros(1, *spec.input_shape)
    fit = spec.batches(data.train, limit=args.recovery_images, seed=1, batch_size=32)
    groups = prunable_groups(base, ex)
    pruned = prune_to_plan(base, ex, uniform_plan(groups, args.keep, multiple=8, max_ratio=0.9), groups=groups)
    fast_s, fast, errors = _timed(base, pruned, ex, fit, one_pass=True)
    slow_s, slow, slow_errors = _timed(base, pruned, ex, fit, one_pass=False)
    same = errors == slow_errors and all(
        torch.equal(a, b) for a, b in zip(fast.state_dict().values(), slow.state_dict().values(), strict=True)
    )
    row = {"model": name, "layers": len(errors), "images": sum(len(b[0]) for b in fit),
           "one_pass_s": round(fast_s, 2), "layer_by_layer_s": round(slow_s, 2), "identical": same}  # fmt: skip
    log.info("%s", row)
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | layers refitted | images | one pass s | layer by layer s | speed-up | same weights |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['model']} | {r['layers']} | {r['images']} | {r['one_pass_s']:.2f} | "
                   f"{r['layer_by_layer_s']:.2f} | {r['layer_by_layer_s'] / max(r['one_pass_s'], 1e-9):.2f}x | "
                   f"{'bit-identical' if r['identical'] else 'NO'} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist_cnn", "resnet_fm", "mobilenetv2_fm", "efficientnet_lite0"])
    ap.add_argument("--keep", type=float, default=0.75, help="share of each group's channels (uniform cut)")
    ap.add_argument("--recovery-images", type=int, default=256)
    add_data_args(ap, train_images=2000, test_images=100)
    add_output_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    if args.from_result:
        result = json.loads(args.from_result.read_text())
    else:
        t0 = time.perf_counter()
        rows = [run_model(name, args) for name in args.models]
        result = {"command": command("bench.refit_speed", argv), "seconds": round(time.perf_counter() - t0),
                  "rows": rows, "keep": args.keep, "machine": platform.machine(),
                  "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}  # fmt: skip
        write_json_atomic(REPO / "bench" / "results" / "refit_speed.json", result)
    lines = table(result["rows"])
    print("\n".join(lines))
    if args.no_write:
        return 0
    body = [SECTION, "", f"Command: `{result['command']}` ({result['seconds']} s, {result['machine']}, "
            f"{result['cores']} cores, {result['threads']} torch threads). The same uniform L2 cut (each group keeps "
            f"{result['keep']:.0%} of its channels, multiple 8) refitted twice in one run: in one lockstep pass over "
            "the batches (the model traced with torch.fx, every batch's activations held at once), and layer by "
            "layer (each layer's input captured by running the pruned model up to it on every batch: the fallback "
            "for models torch.fx cannot trace or whose activations exceed `LOCKSTEP_BYTES`). The unpruned targets "
            "come from one pass in both. Batches of 32 training images; wall-clock seconds of `reconstruct`.", "",
            *lines, ""]  # fmt: skip
    write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
