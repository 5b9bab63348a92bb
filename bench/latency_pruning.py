"""Benchmark: pruning to a latency budget (ours) vs plain Torch-Pruning at the same MACs, in one run.

    python -m bench.latency_pruning [--precision fp32] [--threads 1] [--budgets 0.8 0.65 0.5] [--variants 20]

For the default model (fmnist_cnn) on this machine's runtime (ai-edge-litert, XNNPACK):
1. the unpruned model is converted at --precision and measured; the per-layer latency table is measured;
2. for each budget (a fraction of the unpruned model's measured p50): ours = channels allocated against the
   table (prune_to_latency, channel multiple 8); plain = Torch-Pruning with one uniform channel ratio picked
   to reach the same MACs as ours (no channel rounding, as Torch-Pruning does by default), and the same with
   channel counts rounded to multiples of 8 (to separate channel alignment from allocation); all fine-tuned
   with the same distillation recipe, exported, converted with onnx2tf and measured in the same session;
3. the latency model's error: --variants randomly pruned models (random channel counts on the table's grid,
   no fine-tune: latency does not depend on weights) predicted vs measured.
Every .tflite file is timed in --rounds round-robin passes (median of the per-pass p50s), so drift of this
noisy machine hits all variants alike. Prints tables and rewrites the "Latency-aware pruning" section of
BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.sections import write_section
from pipeline.artifacts import write_json_atomic
from pipeline.bench import BenchSettings, profile_local
from pipeline.data.sources import DataPlan
from pipeline.deploy import REPO
from pipeline.latency.layers import prunable_layers
from pipeline.latency.table import candidates, measure_table
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.zoo import get_model_spec
from pipeline.pruning.channels import count_macs_params, ignored_layers, prunable_groups, prune_to_plan, prune_to_target
from pipeline.pruning.latency import prune_to_latency
from pipeline.targets import Finetune, PruneTarget, Pruning
from pipeline.train.distill import finetune_kd

SECTION = "## Latency-aware pruning"
MULTIPLE = 8
MAX_RATIO = 0.8
METHODS = {
    "ours": "ours (latency table, multiple 8)",
    "plain": "plain Torch-Pruning, same MACs",
    "plain8": "plain Torch-Pruning, same MACs, channels rounded to 8",
}
log = logging.getLogger("bench.latency_pruning")


@dataclass
class Variant:
    name: str
    kind: str  # unpruned | ours | plain | plain8 | random
    tflite: Path
    macs: int
    budget_ms: float | None = None
    predicted_ms: float | None = None
    accuracy: float | None = None
    layer_sum_ms: float | None = None  # uncalibrated sum of the table entries
    p50s: list[float] = field(default_factory=list)

    @property
    def measured_ms(self) -> float:
        return statistics.median(self.p50s)


def _convert(model: torch.nn.Module, spec, out: Path, precision: str, data: DataPlan) -> Path:
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    onnx = export_onnx(model, spec, out / "model.onnx", check_images=data.calibration.images[:8])
    calib = data.calibration.subset(200, seed=0) if precision == "int8" else None
    files = convert_tflite(onnx, spec, out, precisions=(precision,), calibration=calib, log_path=out / "onnx2tf.log")
    return Path(files[precision].path)


def _tflite_accuracy(path: Path, precision: str, model: torch.nn.Module, spec, data: DataPlan, threads: int) -> float:
    from pipeline.convert.convert_tflite import describe_tflite
    from pipeline.verification import verify_tflite

    report = verify_tflite({precision: describe_tflite(precision, path)}, model, spec, data.test, threads=threads)
    return float(report.record(precision).accuracy)


def _finetune(student, teacher, spec, data: DataPlan, args) -> torch.nn.Module:
    cfg = Finetune(epochs=args.epochs, lr=1e-3, batch_size=128, temperature=4.0, alpha=0.7,
                   max_train_images=args.train_images)  # fmt: skip
    return finetune_kd(student, teacher, spec, data.train, cfg, seed=0).model


def _pruning(metric: str, keep: float | None, multiple: int) -> Pruning:
    return Pruning(target=PruneTarget(metric=metric, keep=keep), channel_multiple=multiple, max_layer_ratio=MAX_RATIO)


def _measure_all(variants: list[Variant], settings: BenchSettings, rounds: int) -> None:
    for r in range(rounds):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for v in order:
            v.p50s.append(profile_local(v.tflite, settings)["latency_ms"]["p50"])
        log.info("timing pass %d/%d done", r + 1, rounds)


def _retime(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Time every file of a finished run again in fresh round-robin passes; the first timing is kept beside."""
    r = json.loads(path.read_text())
    keep = ("name", "kind", "macs", "budget_ms", "predicted_ms", "accuracy")
    variants = [Variant(tflite=Path(v["tflite"]), layer_sum_ms=v.get("layer_sum_ms"), **{k: v[k] for k in keep})
                for v in r["variants"]]  # fmt: skip
    settings = BenchSettings(threads=r["threads"], warmup=20, runs=200, min_seconds=args.min_seconds)
    _measure_all(variants, settings, args.rounds)
    write_json_atomic(path.with_name("result-first-timing.json"), r)
    for v, out in zip(variants, r["variants"], strict=True):
        out["p50s"], out["measured_ms"] = v.p50s, v.measured_ms
    r["rounds"] = args.rounds
    r["retimed"] = {"rounds": args.rounds, "at": time.strftime("%Y-%m-%d %H:%M")}
    write_json_atomic(path, r)
    return r


def _random_plan(groups: dict[str, int], rng: random.Random) -> dict[str, int]:
    plan = {}
    for g, total in groups.items():
        floor = max(min(MULTIPLE, total), math.ceil(total * (1 - MAX_RATIO)))
        plan[g] = rng.choice(candidates(total, MULTIPLE, floor=floor, max_points=10_000))
    return plan


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = get_model_spec(args.model)
    data = DataPlan(spec, data_dir=args.data, test_limit=args.test_images)
    work = REPO / "runs" / "bench-latency" / f"{spec.name}-{args.precision}-t{args.threads}"
    work.mkdir(parents=True, exist_ok=True)
    base = load_checkpoint(REPO / spec.default_checkpoint, spec.build())[0].eval()
    ex = torch.zeros(1, *spec.input_shape)
    macs0, _ = count_macs_params(base, ex)
    settings = BenchSettings(threads=args.threads, warmup=20, runs=200, min_seconds=args.min_seconds)
    t0 = time.perf_counter()

    unpruned = Variant("unpruned", "unpruned", _convert(base, spec, work / "unpruned", args.precision, data), macs0)
    unpruned.accuracy = _tflite_accuracy(unpruned.tflite, args.precision, base, spec, data, args.threads)
    full_ms = profile_local(unpruned.tflite, settings)["latency_ms"]["p50"]
    log.info("unpruned %s: %.4f ms", args.precision, full_ms)

    groups = prunable_groups(base, ex)
    layers = prunable_layers(base, ex, ignored=ignored_layers(base, ex))
    t_table = time.perf_counter()
    table = measure_table(layers, groups, precision=args.precision, threads=args.threads, multiple=MULTIPLE,
                          max_ratio=MAX_RATIO, max_points=args.max_points, work_dir=work)  # fmt: skip
    table_s = time.perf_counter() - t_table
    table.save(work / "table.json")
    layer_sum = table.layer_sum(layers, groups)
    calibrated = table.calibrated(layers, groups, full_ms)

    variants = [unpruned]
    for frac in args.budgets:
        budget = round(frac * full_ms, 5)
        lp = prune_to_latency(base, ex, table, _pruning("latency", None, MULTIPLE), budget_ms=budget,
                              measured_full_ms=full_ms)  # fmt: skip
        keep = lp.result.macs_after / macs0
        plain = prune_to_target(base, ex, _pruning("macs", keep, 1))
        plain8 = prune_to_target(base, ex, _pruning("macs", keep, MULTIPLE))
        for kind, model, predicted in (
            ("ours", lp.result.model, lp.figures["predicted_ms"]),
            ("plain", plain.model, None),
            ("plain8", plain8.model, None),
        ):
            name = f"{kind}@{frac:g}"
            tuned = _finetune(model, base, spec, data, args)
            path = _convert(tuned, spec, work / name.replace("@", "_"), args.precision, data)
            v = Variant(name, kind, path, count_macs_params(tuned, ex)[0], budget, predicted)
            if kind == "ours":
                v.layer_sum_ms = table.layer_sum(layers, lp.figures["plan"])
            v.accuracy = _tflite_accuracy(path, args.precision, tuned, spec, data, args.threads)
            variants.append(v)
            log.info("%s: MACs %.2fx, accuracy %.4f", name, v.macs / macs0, v.accuracy)

    rng = random.Random(args.seed)
    for i in range(args.variants):
        plan = _random_plan(groups, rng)
        model = prune_to_plan(base, ex, plan)
        path = _convert(model, spec, work / f"random_{i:02d}", args.precision, data)
        variants.append(Variant(f"random_{i:02d}", "random", path, count_macs_params(model, ex)[0],
                                predicted_ms=calibrated.predict(layers, plan),
                                layer_sum_ms=table.layer_sum(layers, plan)))  # fmt: skip

    _measure_all(variants, settings, args.rounds)
    result = {
        "model": spec.name,
        "precision": args.precision,
        "threads": args.threads,
        "runtime": f"{table.runtime} {table.runtime_version}",
        "machine": platform.machine(),
        "table_probes": sum(len(r) for e in table.entries.values() for r in e["ms"]),
        "table_seconds": round(table_s, 1),
        "unpruned_predicted_layers_ms": layer_sum,
        "unpruned_first_ms": full_ms,
        "rounds": args.rounds,
        "command": _command(),
        "seconds": round(time.perf_counter() - t0),
        "variants": [
            {**{k: getattr(v, k) for k in ("name", "kind", "macs", "budget_ms", "predicted_ms", "accuracy", "p50s",
                                           "layer_sum_ms")},
             "tflite": str(v.tflite), "measured_ms": v.measured_ms}
            for v in variants
        ],
    }  # fmt: skip
    write_json_atomic(work / "result.json", result)
    return result


def _command(argv: list[str] | None = None) -> str:
    return ("python -m bench.latency_pruning " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()


def _reading(r: dict[str, Any]) -> str:
    """One sentence per budget: ours vs plain Torch-Pruning, measured in the same passes."""
    vs = {v["name"]: v for v in r["variants"]}
    parts = []
    for name, v in vs.items():
        if v["kind"] != "ours":
            continue
        frac = name.split("@")[1]
        plain = vs.get(f"plain@{frac}")
        if plain:
            parts.append(
                f"budget {frac}: ours {v['measured_ms']:.4f} ms at {v['macs'] / plain['macs']:.2f}x plain's MACs, "
                f"{v['measured_ms'] / plain['measured_ms']:.2f}x plain's latency, accuracy "
                f"{100 * (v['accuracy'] - plain['accuracy']):+.2f} points"
            )
    text = "Ours vs plain Torch-Pruning (same timing passes): " + "; ".join(parts) + "."
    pruned = [v for v in vs.values() if v["kind"] in METHODS]
    if pruned and all(v["accuracy"] < 0.05 for v in pruned):
        text += (
            " Every pruned variant lost top-1 agreement with the unpruned model: this little distillation data "
            "cannot recover a pruned ImageNet model, so only the latency columns compare the methods here."
        )
    return text


def _hit(measured: float, budget: float) -> str:
    return "hit" if measured <= budget else f"missed by {100 * (measured / budget - 1):.1f}%"


def _err_stats(errs: list[float]) -> dict[str, Any]:
    return {
        "n": len(errs),
        "within_10": sum(abs(e) <= 10 for e in errs),
        "mean_abs": statistics.mean(abs(e) for e in errs),
        "max_abs": max(abs(e) for e in errs),
        "median": statistics.median(errs),
    }


def _tables(r: dict[str, Any], macs0: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """Budget table and latency-model error table. The machine drifts between the first measurement of the
    unpruned model (which set the budgets and calibrated the table) and the timing passes, so hits are shown
    against the budget as set and against the budget scaled by the unpruned model's own drift, and the
    prediction error with the remainder calibrated either way (only the unpruned model is used to calibrate)."""
    vs = {v["name"]: v for v in r["variants"]}
    un = vs["unpruned"]
    first = r.get("unpruned_first_ms", un["measured_ms"])
    drift = un["measured_ms"] / first
    budget_rows = [
        "| budget (x unpruned) | budget ms as set | method | MACs x | measured p50 ms | x unpruned | predicted ms "
        "| accuracy % | vs budget as set | vs budget x drift |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| - | - | unpruned | 1.00 | {un['measured_ms']:.4f} | 1.00 | - | {100 * un['accuracy']:.2f} | - | - |",
    ]
    for v in r["variants"]:
        if v["kind"] not in METHODS:
            continue
        frac = v["name"].split("@")[1]
        pred = f"{v['predicted_ms']:.4f}" if v["predicted_ms"] is not None else "-"
        budget_rows.append(
            f"| {frac} | {v['budget_ms']:.4f} | {METHODS[v['kind']]} | {v['macs'] / macs0:.2f} "
            f"| {v['measured_ms']:.4f} "
            f"| {v['measured_ms'] / un['measured_ms']:.2f} | {pred} | {100 * v['accuracy']:.2f} "
            f"| {_hit(v['measured_ms'], v['budget_ms'])} | {_hit(v['measured_ms'], v['budget_ms'] * drift)} |"
        )  # fmt: skip
    pruned = [v for v in r["variants"] if v["kind"] in ("random", "ours")]
    full_layers = r["unpruned_predicted_layers_ms"]

    def layer_sum(v: dict[str, Any]) -> float:  # runs before the scale calibration stored no layer sums
        return v["layer_sum_ms"] if v.get("layer_sum_ms") is not None else v["predicted_ms"] - (first - full_layers)

    def errors(full: float) -> dict[str, Any]:
        preds = [(layer_sum(v) * full / full_layers, v["measured_ms"]) for v in pruned]
        return _err_stats([100 * (p - m) / m for p, m in preds])

    as_set, session = errors(first), errors(un["measured_ms"])
    err_rows = [
        "| scale calibrated on the unpruned model measured | pruned variants | within ±10% | mean abs error "
        "| max abs error | median error (pred - meas) |",
        "|---|---|---|---|---|---|",
    ]
    for label, st in ((f"first ({first:.4f} ms, before pruning)", as_set),
                      (f"in the same timing passes ({un['measured_ms']:.4f} ms)", session)):  # fmt: skip
        err_rows.append(
            f"| {label} | {st['n']} | {st['within_10']}/{st['n']} ({100 * st['within_10'] / st['n']:.0f}%) "
            f"| {st['mean_abs']:.1f}% | {st['max_abs']:.1f}% | {st['median']:+.1f}% |"
        )
    return budget_rows, err_rows, {"as_set": as_set, "session": session, "drift": drift}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_cnn")
    ap.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--train-images", type=int, default=30000)
    ap.add_argument("--test-images", type=int, default=None)
    ap.add_argument("--data", type=Path, default=None, help="image folder (models without a built-in dataset)")
    ap.add_argument("--max-points", type=int, default=16)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--from-result", type=Path, help="re-render the tables of a finished run's result.json")
    ap.add_argument("--retime", type=Path, help="re-run only the timing passes of a finished run's result.json "
                    "(every file again, round-robin), e.g. when the machine was busy; then re-render")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.retime:
        r = _retime(args.retime, args)
        args.from_result = args.retime
    else:
        r = json.loads(args.from_result.read_text()) if args.from_result else run(args)
    macs0 = next(v["macs"] for v in r["variants"] if v["kind"] == "unpruned")
    budget_rows, err_rows, stats = _tables(r, macs0)
    print("\n".join(budget_rows), "\n", "\n".join(err_rows), sep="\n")
    if args.no_write:
        return 0
    cmd = r.get("command") or _command(argv)
    what = "timing passes re-run" if args.retime else "tables re-rendered"
    rerender = f" ({what} by `{_command(argv)}`)" if args.from_result else ""
    cores = len(os.sched_getaffinity(0))
    body = [
        f"{SECTION} ({r['model']}, {r['precision']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''})",
        "",
        f"Command: `{cmd}`{rerender} ({r['seconds']} s). Machine: {r['machine']}, {cores} cores, "
        f"{r['runtime']}; every file timed in {r.get('rounds', args.rounds)} round-robin passes (median of the "
        "per-pass p50s). "
        f"Latency table: {r['table_probes']} single-layer probes measured in {r['table_seconds']} s. Fine-tune: "
        f"{args.epochs:g} epoch(s) of distillation on {_data_words(args)[0]}, the same for every method. "
        f"Accuracy: the converted .tflite on {_data_words(args)[1]}.",
        "",
        *budget_rows,
        "",
        _reading(r),
        "",
        f"The machine drifted: the unpruned model measured {r.get('unpruned_first_ms', 0):.4f} ms when the budgets "
        f"were set and the table calibrated, and {stats['drift']:.3f}x that in the timing passes; the last column "
        "judges every method against the budget scaled by that drift.",
        "",
        "Latency model (predicted = sum of per-layer table entries x a scale calibrated on the unpruned "
        f"model), over the {stats['session']['n']} pruned variants (random channel counts on the table's grid, and "
        "ours). Only the unpruned model's measurement calibrates it; the two rows differ in which one:",
        "",
        *err_rows,
        "",
    ]
    write_section(args.out, f"{SECTION} ({r['model']}, {r['precision']}", "\n".join(body))
    return 0


def _data_words(args: argparse.Namespace) -> tuple[str, str]:
    if args.data is None:
        return f"up to {args.train_images} Fashion-MNIST train images", "the Fashion-MNIST test split"
    return (
        f"the train split of {args.data.name} (made by `python -m pipeline.make_photo_set {args.data}`)",
        "its held-out photos, labelled by the unpruned model: top-1 agreement with it, not ImageNet accuracy",
    )


if __name__ == "__main__":
    sys.exit(main())
