"""The deploy chain for one target: the stage order lives here, each stage's work in pipeline/stages/.

baseline -> export_baseline -> convert_baseline -> prune -> finetune -> export -> convert -> verify
-> profile -> bundle. Every stage but the bundle is cached under runs/<target>/<stage>/ (runner.py).
"""

from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.artifacts import run_lock, write_json_atomic
from pipeline.data.sources import DataPlan, fingerprint
from pipeline.errors import BudgetError, CheckpointError
from pipeline.models.spec import ModelSpec
from pipeline.runner import StageRecord, run_stage
from pipeline.targets import TargetProfile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DeployRequest:
    target: TargetProfile
    spec: ModelSpec
    checkpoint: Path | None
    data: DataPlan
    runs_dir: Path = Path("runs")
    artifacts_dir: Path = Path("artifacts")
    force: bool = False
    allow_budget_miss: bool = False
    seed: int = 0
    devices: str | None = None  # DEVICE: "pi@host", "adb:SERIAL", "a,b,c"; None: the profile's own, else here
    ssh_options: Any = None  # pipeline.devices.SshOptions (known_hosts, identity) or None for the user's config


@dataclass(frozen=True)
class DeployResult:
    bundle: Path | None
    report: Path
    summary: Mapping[str, Any]


Progress = Callable[[str, StageRecord], None]


def _load(spec: ModelSpec, path: Path) -> nn.Module:
    from pipeline.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path, spec.build())
    return model.eval()


def _save(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    from pipeline.models.checkpoint import save_checkpoint

    save_checkpoint(model, path, meta=meta)


def _example(spec: ModelSpec) -> torch.Tensor:
    return torch.zeros(1, *spec.input_shape)


def deploy(req: DeployRequest, on_stage: Progress | None = None) -> DeployResult:
    run_dir = req.runs_dir / req.target.name
    with run_lock(run_dir):
        return _deploy_locked(req, run_dir, on_stage or (lambda name, rec: None))


def _deploy_locked(req: DeployRequest, run_dir: Path, on_stage: Progress) -> DeployResult:
    from pipeline.stages import bundle as bundle_stage
    from pipeline.stages.finetune import FinetuneConfig, accuracy, finetune_kd, predict
    from pipeline.stages.prune import count_macs_params, prune_to_target

    t, spec, data = req.target, req.spec, req.data
    checkpoint = req.checkpoint or (REPO / spec.default_checkpoint if spec.default_checkpoint else None)
    if checkpoint is None:
        raise CheckpointError(f"model {spec.name} has no default checkpoint; give --checkpoint PATH")
    if not checkpoint.is_file():
        raise CheckpointError(
            f"{checkpoint}: no such checkpoint file; train one with `make baseline` or give --checkpoint PATH"
        )
    records: dict[str, StageRecord] = {}

    def stage(
        name: str, work: Callable[[Path], Mapping[str, Any]], *, inputs: Mapping[str, Path], config: Mapping[str, Any]
    ) -> StageRecord:
        rec = run_stage(run_dir, name, work, inputs=inputs, config=config, force=req.force)
        records[name] = rec
        on_stage(name, rec)
        return rec

    model_cfg = {"model": spec.name, "input_shape": spec.input_shape, "mean": spec.mean, "std": spec.std}
    test_cfg = {"test": data.describe()["test"], "test_limit": data.test_limit}

    # 1. baseline: the user's model as given, measured.
    def baseline_work(out: Path) -> dict[str, Any]:
        model = _load(spec, checkpoint)
        macs, params = count_macs_params(model, _example(spec))
        acc = accuracy(predict(model, spec, data.test), data.test.labels)
        _save(model, out / "model.pt", {"stage": "baseline", "source": str(checkpoint)})
        return {
            "macs": macs,
            "params": params,
            "accuracy": acc,
            "test_images": len(data.test),
            "test_fingerprint": fingerprint(data.test),
        }

    base = stage("baseline", baseline_work, inputs={"checkpoint": checkpoint}, config={**model_cfg, **test_cfg})
    calib_cfg = {"calibration": str(data.calibration_file), "n": t.quantize.calibration_images}

    def export_convert(prefix: str, ckpt: Path, precisions: tuple[str, ...]) -> StageRecord:
        from pipeline.stages.convert_tflite import convert_tflite
        from pipeline.stages.export_onnx import export_onnx

        def export_work(out: Path) -> dict[str, Any]:
            result = export_onnx(_load(spec, ckpt), spec, out / "model.onnx", check_images=data.calibration.images[:8])
            return {"max_abs_diff_vs_torch": result.max_abs_diff, "opset": result.opset, "exporter": result.exporter}

        onnx = stage(f"export{prefix}", export_work, inputs={"model": ckpt}, config=model_cfg)

        def convert_work(out: Path) -> dict[str, Any]:
            from pipeline.stages.export_onnx import OnnxExport  # noqa: F401  (record type of the input)

            calib = data.calibration.subset(t.quantize.calibration_images, seed=req.seed)
            fixes = _conversion_fixes(t, onnx.path("model.onnx"))
            files = convert_tflite(
                _onnx_record(onnx), spec, out, precisions=precisions,
                calibration=calib if "int8" in precisions else None, int8_io=t.quantize.int8_io,
                log_path=out / "onnx2tf.log", extra_args=fixes.args,
            )  # fmt: skip
            figures: dict[str, Any] = {p: {"file": f.path.name, "size_bytes": f.size_bytes} for p, f in files.items()}
            return {**figures, "fixes": fixes.to_dict()}

        return stage(
            f"convert{prefix}",
            convert_work,
            inputs={"onnx": onnx.path("model.onnx")},
            config={"precisions": precisions, "int8_io": t.quantize.int8_io, **calib_cfg,
                    "accelerator": t.hardware.accelerator},
        )  # fmt: skip

    ship = t.quantize.ship
    conv_base = export_convert("_baseline", base.path("model.pt"), (ship,))

    # 2. prune to the profile's MAC/parameter target, or to its latency budget through a measured table.
    by_latency = t.pruning.enabled and t.pruning.target.metric == "latency"
    prune_inputs = {"model": base.path("model.pt")}
    if by_latency:
        table_rec = _latency_table_stage(stage, req, spec, base.path("model.pt"))
        prune_inputs |= {"table": table_rec.path("table.json"), "baseline": conv_base.path(f"model_{ship}.tflite")}

    def prune_work(out: Path) -> dict[str, Any]:
        model = _load(spec, base.path("model.pt"))
        if not t.pruning.enabled:
            _save(model, out / "model.pt", {"stage": "prune", "pruned": False})
            return {"enabled": False}
        p = t.pruning
        extra: dict[str, Any] = {}
        if by_latency:
            from pipeline.latency.table import LatencyTable
            from pipeline.stages.prune_latency import prune_to_latency

            measured = _bench(prune_inputs["baseline"], t)["latency_ms"]["p50"]
            lp = prune_to_latency(
                model, _example(spec), LatencyTable.load(prune_inputs["table"]), budget_ms=t.budgets.latency_ms,
                measured_full_ms=measured, channel_multiple=p.channel_multiple, importance=p.importance,
                keep_layers=p.keep_layers, max_ratio=p.max_layer_ratio,
            )  # fmt: skip
            result, extra = lp.result, {"latency": lp.figures}
        else:
            result = prune_to_target(
                model, _example(spec), metric=p.target.metric, keep=p.target.keep,
                channel_multiple=p.channel_multiple, importance=p.importance, keep_layers=p.keep_layers,
                max_ratio=p.max_layer_ratio,
            )  # fmt: skip
        acc = accuracy(predict(result.model, spec, data.test), data.test.labels)
        _save(result.model, out / "model.pt", {"stage": "prune", **result.figures()})
        return {"enabled": True, **result.figures(), **extra, "accuracy_before_finetune": acc}

    pruned = stage(
        "prune",
        prune_work,
        inputs=prune_inputs,
        config={**t.pruning.model_dump(mode="json"), **test_cfg, "budget_ms": t.budgets.latency_ms},
    )

    # 3. recover with distillation from the unpruned model.
    def finetune_work(out: Path) -> dict[str, Any]:
        student = _load(spec, pruned.path("model.pt"))
        teacher = _load(spec, base.path("model.pt"))
        f = t.finetune
        cfg = FinetuneConfig(
            epochs=f.epochs,
            lr=f.lr,
            batch_size=f.batch_size,
            temperature=f.temperature,
            alpha=f.alpha,
            max_train_images=f.max_train_images,
            seed=req.seed,
        )
        torch.manual_seed(req.seed)
        result = finetune_kd(student, teacher, spec, data.train, cfg) if t.pruning.enabled else None
        model = result.model if result else student
        macs, params = count_macs_params(model, _example(spec))
        acc = accuracy(predict(model, spec, data.test), data.test.labels)
        _save(model, out / "model.pt", {"stage": "finetune"})
        return {
            "accuracy": acc,
            "macs": macs,
            "params": params,
            "steps": result.steps if result else 0,
            "images_seen": result.images_seen if result else 0,
            "final_loss": result.final_loss if result else None,
        }

    tuned = stage(
        "finetune",
        finetune_work,
        inputs={"student": pruned.path("model.pt"), "teacher": base.path("model.pt")},
        config={
            **t.finetune.model_dump(mode="json"),
            "seed": req.seed,
            "train": data.describe()["train"],
            "pruning": t.pruning.enabled,
            **test_cfg,
        },
    )

    conv = export_convert("", tuned.path("model.pt"), t.quantize.precisions)

    # 4. verify every TFLite file on the test set against PyTorch.
    def verify_work(out: Path) -> dict[str, Any]:
        from pipeline.stages.verify import check_parity, verify_tflite

        reports = {}
        for label, conv_rec, ckpt in (
            ("pruned", conv, tuned.path("model.pt")),
            ("baseline", conv_base, base.path("model.pt")),
        ):
            files = _tflite_records(conv_rec)
            report = verify_tflite(files, _load(spec, ckpt), spec, data.test, threads=t.profiling.threads)
            reports[label] = report.to_dict()
            check_parity(report)
        write_json_atomic(out / "verify.json", reports)
        return reports

    # 3b. Edge TPU: analysis of the shipped int8 model with the PyTorch layer behind each op; compiler if present.
    if t.hardware.accelerator == "edgetpu":
        from pipeline.stages.edgetpu import run_edgetpu_stage

        def edgetpu_work(out: Path) -> dict[str, Any]:
            return run_edgetpu_stage(
                conv.path(f"model_{ship}.tflite"), _load(spec, tuned.path("model.pt")), _example(spec), out,
                sram_mb=t.hardware.edgetpu_sram_mb or 8.0, fixes=conv.figures.get("fixes", {}),
            )  # fmt: skip

        stage(
            "edgetpu",
            edgetpu_work,
            inputs={"tflite": conv.path(f"model_{ship}.tflite"), "model": tuned.path("model.pt")},
            config={
                "sram_mb": t.hardware.edgetpu_sram_mb,
                "compiler": shutil.which("edgetpu_compiler") or "absent",
                "format": "edgeship-edgetpu/1",
            },
        )

    tfl_inputs = {f"{p}": conv.path(f"model_{p}.tflite") for p in t.quantize.precisions}
    tfl_inputs["baseline"] = conv_base.path(f"model_{ship}.tflite")
    stage("verify", verify_work, inputs={**tfl_inputs, "model": tuned.path("model.pt")}, config=test_cfg)

    # 5. profile every TFLite file: on the devices named by DEVICE or the profile, else on this machine.
    specs = device_specs(req)

    def profile_work(out: Path) -> dict[str, Any]:
        if not specs:
            results = {name: _bench(path, t) for name, path in tfl_inputs.items()}
        else:
            results = _profile_on_devices(req, specs, tfl_inputs, run_dir)
        write_json_atomic(out / "profile.json", results)
        return results

    from pipeline.stages.profile import RUNNER

    where = {"devices": [s.name for s in specs]} if specs else {"host": platform.node(), "cores": _host_cores()}
    stage(
        "profile",
        profile_work,
        inputs={**tfl_inputs, "runner": RUNNER},
        config={**t.profiling.model_dump(mode="json"), **where, "power": t.power.model_dump(mode="json")},
    )

    summary = bundle_stage.summarize(req, records=records)
    report_path = run_dir / "report.md"
    bundle_stage.write_report(summary, report_path)
    from pipeline.report import write_report as write_html_report

    write_html_report(summary, run_dir)  # runs/<target>/report.html, plots inline
    misses = [b for b in summary["budgets"] if b["status"] == "missed"]
    if misses and not req.allow_budget_miss:
        lines = "; ".join(f"{b['name']}: {b['value']} vs limit {b['limit']}" for b in misses)
        raise BudgetError(
            f"target {t.name}: the result misses its budget ({lines}). Nothing was published to "
            f"{req.artifacts_dir / t.name}; see {report_path}. {_budget_hint(t, misses, summary)}"
            " Or pass --allow-budget-miss to ship it anyway."
        )
    shipped = _tflite_records(conv)[ship]
    io = {
        "layout": "NHWC",
        "input": {
            "shape": list(shipped.input_shape),
            "dtype": shipped.input_dtype,
            "quantization": shipped.input_quantization,
        },
        "output": {
            "shape": list(shipped.output_shape),
            "dtype": shipped.output_dtype,
            "quantization": shipped.output_quantization,
        },
    }
    spec_meta = {
        "mean": list(spec.mean),
        "std": list(spec.std),
        "class_names": list(spec.class_names),
        "normalization": "x = (pixel / 255 - mean) / std, then quantized with input.quantization "
        "(q = round(x / scale) + zero_point) when the input is integer",
    }
    bundle_dir = bundle_stage.publish(
        summary, conv, req.artifacts_dir / t.name, report_path=report_path, spec_meta=spec_meta, io=io
    )
    return DeployResult(bundle_dir, bundle_dir / "report.md", summary)


def _conversion_fixes(t: TargetProfile, onnx_path: Path):
    """onnx2tf options that keep ops on the target's accelerator (none for CPU targets)."""
    from pipeline.edgetpu.fixes import ConversionFixes, edgetpu_fixes

    return edgetpu_fixes(onnx_path) if t.hardware.accelerator == "edgetpu" else ConversionFixes((), ())


def _budget_hint(t: TargetProfile, misses: list[dict[str, Any]], summary: Mapping[str, Any]) -> str:
    """What to change, per missed budget and pruning mode."""
    hints = []
    names = {b["name"] for b in misses}
    if "accuracy drop" in names:
        hints.append(
            "For accuracy: prune less, fine-tune longer (finetune.epochs) or allow more budgets.max_accuracy_drop."
        )
    if "size (KiB)" in names:
        hints.append("For size: prune more (a lower pruning.target.keep) or ship int8.")
    if "latency p50 (ms)" in names:
        lm = summary.get("latency_model")
        if lm:
            hints.append(
                f"For latency: the table predicted {lm['predicted_ms']:.4g} ms and {lm['measured_ms']:.4g} ms was "
                f"measured ({lm['error_pct']:+.1f}% error): set budgets.latency_ms about {abs(lm['error_pct']):.0f}% "
                "lower to leave that margin, or raise pruning.target.max_points for a finer table."
            )
        else:
            hints.append("For latency: prune to it directly with pruning.target: {metric: latency}.")
    return " ".join(hints)


def _power_args(t: TargetProfile) -> tuple[str, ...]:
    """Runner options that sample the profile's power source (none when power.kind is none)."""
    import json

    from pipeline.power.energy import sampler_options

    pw = t.power
    if pw.kind == "none":
        return ()
    args = ["--power", pw.kind, "--power-options", json.dumps(sampler_options(pw)), "--idle-seconds", str(pw.idle_s)]
    return (*args, "--power-rate", str(pw.rate_hz)) if pw.rate_hz else tuple(args)


def _bench(path: Path, t: TargetProfile) -> dict[str, Any]:
    """Benchmark one .tflite file here with the profile's settings (threads capped at this machine's cores).
    Power is sampled only when this machine is the target itself (a local transport)."""
    from pipeline.stages.profile import BenchSettings, profile_local

    p = t.profiling
    settings = BenchSettings(
        threads=min(p.threads, _host_cores()), warmup=p.warmup, runs=p.runs, min_seconds=p.min_seconds,
        extra_args=_power_args(t) if t.transport.kind == "local" else (),
    )  # fmt: skip
    return profile_local(path, settings)


def device_bench_settings(t: TargetProfile) -> Any:
    """The benchmark settings on the target's own device: the profile's threads (not capped at this host's
    cores) and its power source sampled."""
    from pipeline.stages.profile import BenchSettings

    p = t.profiling
    return BenchSettings(threads=p.threads, warmup=p.warmup, runs=p.runs, min_seconds=p.min_seconds,
                         extra_args=_power_args(t))  # fmt: skip


def device_specs(req: DeployRequest) -> tuple[Any, ...]:
    """The devices to profile on: DEVICE when given, else the profile's own when it names one (ssh host, adb
    serial); none means this machine stands in (and the report says so)."""
    from pipeline.devices import from_profile, parse_devices

    tr = req.target.transport
    if req.devices:
        return parse_devices(req.devices, tr)
    if (tr.kind == "ssh" and tr.host) or (tr.kind == "adb" and tr.serial):
        return (from_profile(tr, target=req.target.name),)
    return ()


def _profile_on_devices(req: DeployRequest, specs: tuple[Any, ...], files: Mapping[str, Path],
                        run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Profile every file on every device in parallel. The figures of the first device are the deploy's; all
    devices' are kept under "devices". A device that fails stops the stage with a DeviceError, after whatever
    was measured has been written to runs/<target>/profile-devices.json."""
    from pipeline.devices import profile_devices
    from pipeline.errors import DeviceError

    runs = profile_devices(files, device_bench_settings(req.target), specs, ssh_options=req.ssh_options)
    record = {name: run.to_json() for name, run in runs.items()}
    partial = run_dir / "profile-devices.json"
    write_json_atomic(partial, record)
    bad = {name: run for name, run in runs.items() if not run.ok}
    if bad:
        why = "; ".join(f"{n}: {r.error or r.failed}" for n, r in bad.items())
        raise DeviceError(f"profiling on {', '.join(bad)} failed ({why}). What was measured is kept in {partial}.")
    primary = runs[specs[0].name]
    return {**{name: primary.results[name] for name in files}, "devices": record}


def _latency_table_stage(stage: Callable[..., StageRecord], req: DeployRequest, spec: ModelSpec,
                         model_path: Path) -> StageRecord:  # fmt: skip
    """The measured per-layer latency table of this model on this runtime, cached like any stage."""
    t = req.target
    p = t.pruning
    threads = min(t.profiling.threads, _host_cores())

    def work(out: Path) -> dict[str, Any]:
        from pipeline.latency.layers import prunable_layers
        from pipeline.latency.table import measure_table
        from pipeline.stages.prune import ignored_layers, prunable_groups

        model = _load(spec, model_path)
        ex = _example(spec)
        groups = prunable_groups(model, ex, keep_layers=p.keep_layers)
        layers = prunable_layers(model, ex, ignored=ignored_layers(model, ex, p.keep_layers))
        table = measure_table(layers, groups, precision=t.quantize.ship, threads=threads,
                              multiple=p.channel_multiple, max_ratio=p.max_layer_ratio,
                              max_points=p.target.max_points, work_dir=out)  # fmt: skip
        table.save(out / "table.json")
        return {
            "geometries": len(table.entries),
            "probes": sum(len(row) for e in table.entries.values() for row in e["ms"]),
            "runtime": f"{table.runtime} {table.runtime_version}",
            "machine": table.machine,
            "threads": threads,
        }

    config = {"precision": t.quantize.ship, "threads": threads, "multiple": p.channel_multiple,
              "max_ratio": p.max_layer_ratio, "max_points": p.target.max_points, "keep_layers": p.keep_layers,
              "host": platform.node(), "runtime": _runtime_versions(), "format": "edgeship-latency/1"}  # fmt: skip
    return stage("latency_table", work, inputs={"model": model_path}, config=config)


def _runtime_versions() -> dict[str, str]:
    """The TFLite runtimes installed here: a table measured under other versions is measured again."""
    from importlib import metadata

    found = {}
    for dist in ("ai-edge-litert", "tflite-runtime", "tensorflow"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def _host_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _onnx_record(rec: StageRecord):
    from pipeline.stages.export_onnx import OnnxExport

    return OnnxExport.from_path(rec.path("model.onnx"))


def _tflite_records(rec: StageRecord):
    from pipeline.stages.convert_tflite import describe_tflite

    return {p: describe_tflite(p, rec.path(v["file"])) for p, v in rec.figures.items() if p != "fixes"}
