"""Benchmark: three ways to prune, compared at equal MEASURED latency and the same fine-tune, in one run.

    python -m bench.pruning_methods [--models fmnist_cnn resnet_fm mobilenetv2_fm] [--levels 0.7 0.5]

Per model (its own checkpoint, Fashion-MNIST; the decisions read the validation split carved from train):
1. the unpruned model is converted to fp32 TFLite and timed at 1 thread (ai-edge-litert, XNNPACK);
2. for each latency level (a share of that p50) and each method, the share of MACs kept is adjusted until the
   converted, pruned model measures within 4% of the level (at most --latency-iters conversions; latency does not
   depend on the weights, so this is done before fine-tuning):
   - `tp-l2`: plain Torch-Pruning, one uniform channel ratio, L2 magnitude, no channel rounding;
   - `tp-taylor-global`: Torch-Pruning's global ranking with first-order Taylor importance (gradients on
     validation batches), no channel rounding;
   - `ours`: edgeship's default: sensitivity-measured allocation (NetAdapt path), channel multiple 8,
     the layers that read pruned channels refitted by least squares (pipeline/pruning/reconstruct.py);
3. every pruned model gets the same distillation fine-tune (--finetune-steps, early stopping on validation),
   then is converted and scored on the test split (read only here);
4. each model's files are timed again together in --rounds round-robin passes (median of the per-pass p50s):
   the table's latency (the result is saved after each model).
Prints the table and rewrites the "Pruning methods at equal latency" section of BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import add_data_args, add_output_args, command
from bench.latency_pruning import _convert, _measure_all, _tflite_accuracy
from bench.sections import write_section
from pipeline.artifacts import write_json_atomic
from pipeline.bench import BenchSettings, profile_local
from pipeline.data.sources import DataPlan
from pipeline.deploy import REPO
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.zoo import get_model_spec
from pipeline.pruning.channels import PruneResult, count_macs_params, prune_to_target
from pipeline.pruning.schedule import Planner
from pipeline.pruning.sensitivity import measure_sensitivity
from pipeline.targets import Finetune, PruneTarget, Pruning
from pipeline.train.distill import FinetuneResult, finetune_kd

SECTION = "## Pruning methods at equal latency"
METHODS = {"tp-l2": "plain Torch-Pruning, uniform L2", "tp-taylor-global": "Torch-Pruning global Taylor",
           "ours": "ours (sensitivity, multiple 8, least-squares refit, uniform guard)"}  # fmt: skip
# results saved before the label was stored with each row: `ours` then re-estimated BatchNorm (no refit)
LEGACY = {"ours": "ours (sensitivity, multiple 8, BN re-estimated)"}
log = logging.getLogger("bench.pruning_methods")


@dataclass
class Variant:
    model: str
    method: str
    level: float | None
    tflite: Path
    macs: int
    keep: float = 1.0
    accuracy: float | None = None
    search: list[dict[str, Any]] = field(default_factory=list)  # (keep, measured ratio) tried
    allocation: str | None = None  # ours: which cut the uniform guard kept (sensitivity or uniform)
    val_curve: list[list[float]] = field(default_factory=list)  # fine-tuning: (step, validation accuracy)
    p50s: list[float] = field(default_factory=list)

    @property
    def measured_ms(self) -> float:
        import statistics

        return statistics.median(self.p50s)


def _cfg(method: str, keep: float) -> Pruning:
    target = PruneTarget(metric="macs", keep=min(keep, 1.0))
    if method == "tp-l2":
        return Pruning(target=target, channel_multiple=1, importance="l2", allocation="uniform", recalibrate_bn=False,
                       reconstruct=False)  # fmt: skip
    if method == "tp-taylor-global":
        return Pruning(target=target, channel_multiple=1, importance="taylor", allocation="uniform",
                       global_pruning=True, recalibrate_bn=False, reconstruct=False)  # fmt: skip
    return Pruning(target=target, channel_multiple=8, importance="l2", allocation="sensitivity", compare_uniform=True)


class Methods:
    """Prunes one model by each method to a share of its MACs."""

    def __init__(self, base: torch.nn.Module, ex: torch.Tensor, val: list, bn: list) -> None:
        self.base, self.ex, self.val, self.bn = base, ex, val, bn
        self.sens = measure_sensitivity(base, ex, _cfg("ours", 0.5), val=val, bn=bn)
        self.planner = Planner(base, ex, _cfg("ours", 0.5), val=val, bn=bn, sens=self.sens)

    def prune(self, method: str, keep: float) -> PruneResult:
        if method == "ours":
            return self.planner.at(keep)
        return prune_to_target(self.base, self.ex, _cfg(method, keep), batches=self.val)


def _at_latency(methods: Methods, method: str, level: float, full_ms: float, spec, data, work: Path,
                settings: BenchSettings, iters: int) -> tuple[PruneResult, list[dict[str, Any]]]:  # fmt: skip
    """The pruned model whose converted fp32 file measures closest to `level` x the unpruned p50 (its probe
    marked `chosen`)."""
    keep, tried, best = level, [], None
    for i in range(iters):
        result = methods.prune(method, keep)
        path = _convert(result.model, spec, work / f"probe-{method}-{level:g}-{i}", "fp32", data)
        ratio = profile_local(path, settings)["latency_ms"]["p50"] / full_ms
        tried.append({"keep": round(keep, 4), "macs_kept": round(result.keep_achieved, 4), "ratio": round(ratio, 4)})
        if method == "ours" and methods.planner.guards:
            tried[-1]["guard"] = methods.planner.guards[-1]
        if best is None or abs(ratio - level) < abs(best[1] - level):
            best = (result, ratio, i)
        if abs(ratio / level - 1) <= 0.04:
            break
        keep = min(0.98, max(0.05, keep * (level / ratio) ** 0.8))  # latency ~ MACs, damped; always pruned
    assert best is not None
    tried[best[2]]["chosen"] = True
    return best[0], tried


def _finetune(student: torch.nn.Module, teacher: torch.nn.Module, spec, data: DataPlan, args, val) -> FinetuneResult:
    cfg = Finetune(epochs=0.01, batch_size=args.batch_size, min_steps=args.finetune_steps, evaluations=6,
                   max_train_images=args.train_images)  # fmt: skip
    done = finetune_kd(student, teacher, spec, data.train, cfg, seed=0, val=val)
    assert done.steps >= args.finetune_steps, done.steps  # the fine-tune budget was spent (it once was not)
    return done


def _data(spec, args: argparse.Namespace) -> DataPlan:
    """Fashion-MNIST for the model: the built-in set at 28x28, else resized in memory to the model's input
    (the 3x64x64 bench models, as `make baseline` trained them: pipeline.data.fashion_mnist.fashion_mnist_for)."""
    if spec.input_shape == (1, 28, 28):
        return DataPlan(spec, test_limit=args.test_images)
    if spec.name == "efficientnet_lite0":  # the photo set: crops labelled by the unpruned model (agreement)
        from pipeline.make_photo_set import make_photo_set

        # the folders themselves name the cached set: another list of the same length is another set
        folders = "\n".join(sorted(str(p.resolve()) for p in args.photo_extra))
        tag = f"-extra-{hashlib.sha256(folders.encode()).hexdigest()[:10]}" if args.photo_extra else ""
        photos = REPO / "runs" / "bench-methods" / f"photos-{args.photo_crops}{tag}"
        if not (photos / "README.txt").is_file():
            make_photo_set(photos, crops=args.photo_crops, extra=args.photo_extra)
        return DataPlan(spec, data_dir=photos, test_limit=args.test_images, val_fraction=0.2)
    from pipeline.data.fashion_mnist import fashion_mnist_for

    train = fashion_mnist_for(spec, "train").subset(args.train_images, seed=0)
    test = fashion_mnist_for(spec, "test").subset(args.test_images, seed=0)
    return DataPlan(spec, train_set=train, test_set=test, calibration_set=train.subset(200, seed=1))


def run_model(name: str, args: argparse.Namespace, settings: BenchSettings) -> list[Variant]:
    spec = get_model_spec(name)
    data = _data(spec, args)
    work = REPO / "runs" / "bench-methods" / name
    base = load_checkpoint(REPO / spec.default_checkpoint, spec.build())[0].eval()
    ex = torch.zeros(1, *spec.input_shape)
    macs0, _ = count_macs_params(base, ex)
    val = spec.batches(data.val, limit=500, seed=0)
    bn = spec.batches(data.train, limit=256, seed=1)
    unpruned = Variant(name, "unpruned", None, _convert(base, spec, work / "unpruned", "fp32", data), macs0)
    unpruned.accuracy = _tflite_accuracy(unpruned.tflite, "fp32", base, spec, data, 1)
    full_ms = profile_local(unpruned.tflite, settings)["latency_ms"]["p50"]
    log.info("%s unpruned fp32 %.4f ms, accuracy %.4f", name, full_ms, unpruned.accuracy)
    methods, out = Methods(base, ex, val, bn), [unpruned]
    for level in args.levels:
        for method in args.methods:
            result, tried = _at_latency(methods, method, level, full_ms, spec, data, work, settings,
                                        args.latency_iters)  # fmt: skip
            done = _finetune(result.model, base, spec, data, args, val)
            tuned = done.model
            path = _convert(tuned, spec, work / f"{method}-{level:g}", "fp32", data)
            v = Variant(name, method, level, path, count_macs_params(tuned, ex)[0], result.keep_achieved, search=tried,
                        allocation=next(t.get("guard", {}).get("chosen") for t in tried if t.get("chosen")),
                        val_curve=[list(x) for x in done.val_curve])  # fmt: skip
            v.accuracy = _tflite_accuracy(path, "fp32", tuned, spec, data, 1)
            log.info("%s %s @%g: MACs %.3f, accuracy %.4f", name, method, level, v.macs / macs0, v.accuracy)
            out.append(v)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = BenchSettings(threads=1, warmup=20, runs=200, min_seconds=args.min_seconds)
    t0 = time.perf_counter()
    variants: list[Variant] = []
    result: dict[str, Any] = {}
    for name in args.models:  # each model's files timed together in round-robin passes, then saved
        mine = run_model(name, args, settings)
        _measure_all(mine, settings, args.rounds)  # type: ignore[arg-type]
        variants += mine
        keys = ("model", "method", "level", "macs", "keep", "accuracy", "search", "p50s", "allocation", "val_curve")
        result = {"command": _command(), "seconds": round(time.perf_counter() - t0), "machine": platform.machine(),
                  "cores": len(os.sched_getaffinity(0)), "rounds": args.rounds, "finetune_steps": args.finetune_steps,
                  "batch_size": args.batch_size,
                  "variants": [{**{k: getattr(v, k) for k in keys}, "tflite": str(v.tflite),
                                "label": METHODS.get(v.method, "unpruned"),
                                "measured_ms": v.measured_ms} for v in variants]}  # fmt: skip
        write_json_atomic(REPO / "runs" / "bench-methods" / f"result-{'-'.join(args.models)}.json", result)
    return result


def _command(argv: list[str] | None = None) -> str:
    return command("bench.pruning_methods", argv)


def table(r: dict[str, Any]) -> tuple[list[str], list[str]]:
    rows = ["| model | latency level | method | MACs x | measured p50 ms | x unpruned | accuracy % | drop (points) "
            "| vs plain TP (points) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    notes = []
    by = {(v["model"], v["method"], v["level"]): v for v in r["variants"]}
    for v in r["variants"]:
        un = by[(v["model"], "unpruned", None)]
        drop = 100 * (un["accuracy"] - v["accuracy"])
        plain = by.get((v["model"], "tp-l2", v["level"]))
        vs = f"{100 * (v['accuracy'] - plain['accuracy']):+.2f}" if plain and v["method"] != "tp-l2" else "-"
        level = "-" if v["level"] is None else f"{v['level']:g}"
        name = v.get("label") or LEGACY.get(v["method"]) or METHODS.get(v["method"], "unpruned")
        if v.get("allocation") == "uniform":
            name += ": the uniform cut kept"
        x = v["measured_ms"] / un["measured_ms"]
        rows.append(f"| {v['model']} | {level} | {name} | {v['macs'] / un['macs']:.3f} | {v['measured_ms']:.4f} "
                    f"| {x:.3f} | {100 * v['accuracy']:.2f} | {drop:.2f} | {vs} |")  # fmt: skip
        if v["method"] == "ours" and plain:
            notes.append(f"{v['model']} at {level}x: ours {drop:.2f}-point drop, {vs} points vs plain Torch-Pruning "
                         f"at {v['measured_ms'] / plain['measured_ms']:.2f}x its latency")  # fmt: skip
    return rows, notes


def _undertrained(runs: list[dict[str, Any]]) -> list[str]:
    """A note where a pruned, fine-tuned model beat its unpruned checkpoint (the distillation also trained it)."""
    base = {v["model"]: v["accuracy"] for r in runs for v in r["variants"] if v["method"] == "unpruned"}
    beat = sorted({v["model"] for r in runs for v in r["variants"] if v["accuracy"] > base[v["model"]]})
    if not beat:
        return []
    return ["", f"A negative drop ({', '.join(beat)}): the pruned and fine-tuned model beats the unpruned "
            "checkpoint, which is undertrained (trained here on a subset for a few CPU epochs, models/*.json), so "
            "the distillation steps also train it. There, compare the methods with each other, not with the "
            "unpruned row."]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist_cnn", "resnet_fm", "mobilenetv2_fm"])
    ap.add_argument("--levels", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--finetune-steps", type=int, default=300)
    add_data_args(ap, train_images=30000, test_images=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--latency-iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    add_output_args(ap, results=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = [json.loads(f.read_text()) for f in args.from_result] if args.from_result else [run(args)]
    rows, notes = table({"variants": [v for r in runs for v in r["variants"]]})
    print("\n".join(rows))
    if args.no_write:
        return 0
    r = runs[0]
    commands = "; ".join(f"`{x['command']}` ({x['seconds']} s, {x['finetune_steps']} distillation steps at batch "
                         f"{x.get('batch_size', 128)}" + (f"; {x['note']}" if x.get("note") else "") + ")"
                         for x in runs)  # fmt: skip
    written = f" Written from the saved runs by `{_command(argv)}`." if args.from_result else ""
    body = [SECTION, "", f"Commands (each model's rows measured in one run): {commands}.{written} Machine: "
            f"{r['machine']}, {r['cores']} cores, ai-edge-litert fp32 at 1 thread; every file of a model timed in "
            f"{r['rounds']} "
            "round-robin passes (median of the per-pass p50s). Same fine-tune for every method of a model "
            "(distillation from the unpruned model, early stopping on the validation split); accuracy of the "
            "converted .tflite on the test split. For efficientnet_lite0 the test set is the photo set's held-out "
            "photos labelled by the unpruned model, so its accuracy is top-1 agreement with the unpruned model.",
            "", *rows, "", "Reading: " + "; ".join(notes) + ".", *_undertrained(runs), ""]  # fmt: skip
    write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
