"""Benchmark: int8 that keeps accuracy. Plain post-training quantization, then each remedy in order.

    python -m bench.quantization [--models fmnist_cnn silu_hswish ...] [--qat-steps 300] [--val 1000]

Models: the bench models that have a checkpoint in models/ (fmnist_cnn; resnet_fm and mobilenetv2_fm when
their checkpoints exist) and small int8-hostile nets trained here for --train-steps on Fashion-MNIST
(SiLU + hard-swish, a concat of branches with different ranges, grouped + depthwise 5x5 convolutions, a
residual add after a wide-range branch). For each: pipeline/quantize/remedies.py with an unreachable
min_agreement, so every remedy runs and is measured (each row: the candidate that remedy produced, kept
only when it beats the best so far; the pipeline itself stops at the first row reaching 0.99). Agreement and
accuracy are on --val held-out *training* images (the validation split the pipeline decides on), size is
the .tflite file, p50 is this host (benchmark runner, 1 thread). Coral: the same rows without `selective`
(Edge TPU stays full-integer). Rewrites the "Quantization" section of BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.sections import write_section
from pipeline.bench import BenchSettings, profile_local
from pipeline.data.imageset import ImageSet
from pipeline.deploy import REPO
from pipeline.models.spec import ModelSpec
from pipeline.quantize.budget import drop_within
from pipeline.quantize.remedies import FLOAT_REMEDIES
from pipeline.targets import RANGE_METHODS, Quantize, range_method

SECTION = "## Quantization"
GOAL = 0.99
GOAL_DROP = 0.005  # the goal: at most half a point below fp32 (quantize.max_accuracy_drop: 0.005)
RESULTS = REPO / "bench" / "results"
log = logging.getLogger("bench.quantization")


def _cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), act())


class SiluHswish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(1, 16, act=nn.SiLU), _cbr(16, 32, s=2, act=nn.Hardswish),
                                  _cbr(32, 32, act=nn.SiLU), _cbr(32, 64, s=2, act=nn.Hardswish))  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class BranchConcat(nn.Module):
    """Two branches whose outputs differ ~30x in range, concatenated into one int8 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, s=2)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.mix = _cbr(32, 32, s=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([torch.relu(self.a(x)) * 30.0, torch.relu(self.b(x))], dim=1)
        return self.head(self.mix(y).mean(dim=(2, 3)))


class GroupedDw5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(1, 32, s=2), _cbr(32, 32, k=5, g=32), _cbr(32, 64, g=4),
                                  _cbr(64, 64, k=5, s=2, g=64), _cbr(64, 64, k=1))  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class WideResidual(nn.Module):
    """A residual add whose branch has a ~50x wider range than the identity path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 32, s=2)
        self.branch = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.out = _cbr(32, 64, s=2)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + 50.0 * self.branch(x))
        return self.head(self.out(x).mean(dim=(2, 3)))


HOSTILE = {"silu_hswish": SiluHswish, "branch_concat": BranchConcat, "grouped_dw5x5": GroupedDw5,
           "wide_residual": WideResidual}  # fmt: skip
ZOO = ("fmnist_cnn", "resnet_fm", "mobilenetv2_fm")


def _fmnist_spec(name: str, build: Any) -> ModelSpec:
    from pipeline.data.fashion_mnist import CLASS_NAMES

    return ModelSpec(name=name, build=build, input_shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,),
                     class_names=CLASS_NAMES)  # fmt: skip


def _train(model: nn.Module, spec: ModelSpec, train: ImageSet, steps: int) -> nn.Module:
    torch.manual_seed(0)
    x, y = spec.to_tensor(train.images), torch.from_numpy(train.labels).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _splits(spec: ModelSpec, n_val: int) -> dict[str, ImageSet]:
    from pipeline.data.sources import DataPlan

    plan = DataPlan(spec)
    return {"train": plan.train_sample(6000, seed=0), "val": plan.val.subset(n_val, seed=0),
            "calibration": plan.calibration.subset(200, seed=0)}  # fmt: skip


def _model(name: str, args: argparse.Namespace) -> tuple[nn.Module, ModelSpec, dict[str, ImageSet]] | None:
    if name in HOSTILE:
        spec = _fmnist_spec(name, HOSTILE[name])
        data = _splits(spec, args.val)
        torch.manual_seed(0)  # the same initial weights whichever models ran before in this process
        return _train(spec.build(), spec, data["train"], args.train_steps), spec, data
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.models.zoo import get_model_spec

    spec = get_model_spec(name)
    ckpt = REPO / (spec.default_checkpoint or "")
    if not spec.default_checkpoint or not ckpt.is_file():
        log.warning("%s: no checkpoint at %s: left out", name, ckpt)
        return None
    model, _ = load_checkpoint(ckpt, spec.build())
    return model.eval(), spec, _splits(spec, args.val)


def _bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import export_onnx
    from pipeline.quantize.remedies import REMEDIES, RemedyJob, run_remedies

    got = _model(name, args)
    if got is None:
        return None
    model, spec, data = got
    out = work / name
    onnx = export_onnx(model, spec, out / "model.onnx", check_images=data["calibration"].images[:8])
    files = convert_tflite(onnx, spec, out, precisions=("fp32", "int8"), calibration=data["calibration"],
                           saved_model_dir=out / "saved_model")  # fmt: skip
    timing = BenchSettings(threads=1, warmup=10, runs=100, min_seconds=0.5)
    job = RemedyJob(model=model, spec=spec, onnx=onnx.path, fp32=files["fp32"].path, int8=files["int8"].path,
                    saved_model=out / "saved_model", val=data["val"], calibration=data["calibration"],
                    extra_calibration=data["train"], train=data["train"], min_agreement=1.01, remedies=REMEDIES,
                    int8_io="int8", full_integer_only=False, max_float_ops=args.max_float_ops,
                    qat_steps=args.qat_steps, threads=1, seed=0, calibration_ranges=tuple(args.calibration_ranges),
                    timing=lambda p: float(profile_local(p, timing)["latency_ms"]["p50"]))  # fmt: skip
    start = time.perf_counter()
    rec = run_remedies(job, out)
    return {"model": name, "fp32_accuracy": rec["fp32_accuracy"], "fp32_size": files["fp32"].size_bytes, "record": rec,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _eligible(rows: list[dict[str, Any]], skip_float: bool) -> list[dict[str, Any]]:
    """The measured rows, in the order the pipeline tries them; for Coral without float or int16 ones."""
    return [r for r in rows if not r.get("skipped")
            and not (skip_float and r["remedy"].startswith(FLOAT_REMEDIES))]  # fmt: skip


def _first_meeting(rows: list[dict[str, Any]], fp32_acc: float, skip_float: bool = False) -> dict[str, Any] | None:
    """The first row with agreement >= GOAL and a drop <= GOAL_DROP."""
    return next((r for r in _eligible(rows, skip_float)
                 if r["agreement"] >= GOAL and drop_within(fp32_acc - r["accuracy"], GOAL_DROP)), None)  # fmt: skip


def _flips(r: dict[str, Any]) -> str:
    """'n, <= m (k)': images where int8 disagrees, the float model's largest top-1/top-2 margin among them,
    and how many validation images have a margin that small ('' for rows saved before it was recorded)."""
    f = r.get("flips") or {}
    if f.get("images") is None:
        return ""
    return "0" if not f["images"] else f"{f['images']}, <= {f['max_float_margin']:.3f} ({f['images_within']})"


def _table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | step | int8 agreement | accuracy drop from fp32 | size | p50 | flips, float margin | kept |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        rec, acc = res["record"], res["fp32_accuracy"]
        lines.append(f"| {res['model']} | fp32 | 1 | 0 (accuracy {acc:.4f}) | {res['fp32_size']:,} B | "
                     f"{rec['fp32_p50_ms']:.3f} ms | | |")  # fmt: skip
        for r in rec["steps"]:
            if r.get("skipped"):
                lines.append(f"| {res['model']} | {r['remedy']} | skipped: {r['skipped']} | | | | | |")
                continue
            drop, kept = 100 * (acc - r["accuracy"]), "yes" if r["kept"] else "no"
            lines.append(f"| {res['model']} | {r['remedy']} | {r['agreement']:.4f} | {drop:+.2f} pt | "
                         f"{r['size_bytes']:,} B | {r['p50_ms']:.3f} ms | {_flips(r)} | {kept} |")  # fmt: skip
    return lines


def _goal_cells(rows: list[dict[str, Any]], acc: float, fp32_ms: float, skip_float: bool) -> list[str]:
    r = _first_meeting(rows, acc, skip_float)
    if r is None:
        best = max(_eligible(rows, skip_float), key=lambda x: (x["agreement"], x["accuracy"]))
        f = best.get("flips") or {}
        why = (f"; its {f['images']} flips are all among the {f['images_within']} validation images whose float "
               f"top-1 and top-2 are within {f['max_float_margin']:.3f}" if f.get("images") else "")  # fmt: skip
        return [f"not reached (best: {best['remedy']}, {best['agreement']:.4f}, "
                f"{100 * (acc - best['accuracy']):+.2f} pt{why})", "", ""]  # fmt: skip
    plain = rows[0]["p50_ms"]
    cost = f"{r['p50_ms'] / plain:.2f}x plain int8, {r['p50_ms'] / fp32_ms:.2f}x fp32"
    return [r["remedy"], f"{r['agreement']:.4f}, {100 * (acc - r['accuracy']):+.2f} pt", cost]


def _goals(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | CPU: first step meeting both | agreement, drop | p50 | Coral (full-integer): first step "
             "meeting both | agreement, drop | p50 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        rows, acc, fp32_ms = res["record"]["steps"], res["fp32_accuracy"], res["record"]["fp32_p50_ms"]
        cells = [c for skip in (False, True) for c in _goal_cells(rows, acc, fp32_ms, skip)]
        lines.append(f"| {res['model']} | " + " | ".join(cells) + " |")
    return lines


def _save(res: dict[str, Any], folder: Path) -> Path:
    """The figures the tables are made of, for `--from-result` (the per-op error lists left out)."""
    keep = ("steps", "fp32_p50_ms", "plain_p50_ms", "agreement", "accuracy", "shipped", "val_images", "data")
    out = {**{k: res[k] for k in ("model", "fp32_accuracy", "fp32_size", "seconds", "command")},
           "record": {k: res["record"].get(k) for k in keep}}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"quantization-{res['model']}.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return path


def _command(argv: list[str] | None) -> str:
    return ("python -m bench.quantization " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()


def _report(results: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None) -> None:
    cmd = _command(argv)
    runs: dict[tuple[str, str], list[str]] = {}  # (command, note) -> the models whose saved rows it made
    for r in results:
        if r.get("command") and r["command"] != cmd:
            runs.setdefault((r["command"], r.get("note", "")), []).append(r["model"])
    val = ", ".join(sorted({str(r["record"].get("val_images") or args.val) for r in results}))
    saved = "; ".join(f"{', '.join(models)} from `{c}`" + (f" ({note})" if note else "")
                      for (c, note), models in runs.items())  # fmt: skip
    saved = f" The saved rows: {saved}." if saved else ""
    body = [f"{SECTION} (int8 remedies, {platform.machine()}, 1 thread)", "",
            f"Command: `{cmd}`.{saved} Agreement = top-1 agreement of the int8 file with PyTorch, "
            f"accuracy drop = fp32 PyTorch accuracy minus the int8 file's, both on {val} held-out training images (the "
            "validation split); size = .tflite bytes; p50 = this host, benchmark runner, 1 thread, 100 runs. "
            "Every remedy runs (unreachable min_agreement) and each row is the model that remedy produced; "
            "`kept` = it beat the best so far, so later rows start from it. Flips, float margin = the validation "
            "images where the int8 file's top-1 differs from PyTorch's, the largest top-1 minus top-2 probability "
            "of the float model among them, and (in brackets) how many validation images have a margin that "
            "small: flips confined to a few near-ties are rounding at a decision boundary, not a broken op. "
            f"Hostile models trained here for {args.train_steps} steps.", "", *_table(results), "",
            "Goals: at least 0.99 agreement and at most a 0.5-point drop from fp32. The pipeline with "
            "`quantize.max_accuracy_drop: 0.005` stops at the first step meeting both (without it, at the first "
            "reaching min_agreement 0.99). Coral never keeps ops float or int16, so its column skips `selective` "
            "and `int16x8`; `int16x8` is opt-in in a profile and runs on TFLite's reference kernels, so its p50 "
            "is shown against plain int8 and fp32:",
            "", *_goals(results), ""]  # fmt: skip
    print("\n".join(body), flush=True)
    if not args.no_write:
        write_section(args.out, SECTION, "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="default: every bench model, or none with "
                    "--from-result")  # fmt: skip
    ap.add_argument("--from-result", nargs="+", type=Path, default=[], help="saved quantization-*.json to table")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where each model's figures are saved")
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--max-float-ops", type=int, default=4)
    ap.add_argument(
        "--calibration-ranges",
        nargs="*",
        default=list(Quantize().calibration_ranges),
        help="range methods the calibration remedy tries beside min/max (quantize.calibration_ranges)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if bad := [m for m in args.calibration_ranges if range_method(m) is None]:
        ap.error(f"--calibration-ranges: {bad} not range methods; valid: {RANGE_METHODS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    results: list[dict[str, Any]] = [json.loads(p.read_text()) for p in args.from_result]
    models = args.models if args.models is not None else ([] if args.from_result else [*ZOO, *HOSTILE])
    cmd = _command(argv)
    if results and not models:
        _report(results, args, argv)
    try:
        for name in models:  # the section is rewritten after every model: a long run keeps what it measured
            if (r := _bench_model(name, args, work)) is not None:
                results = [x for x in results if x["model"] != name] + [r]
                if not args.no_write:
                    _save({**r, "command": cmd}, args.results)
                _report(results, args, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
