"""Stage `profile`: every TFLite file timed where it will run: on the devices named by DEVICE or by the
profile's transport (over ssh or adb), else on this machine as a stand-in (the report says which)."""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json_atomic
from pipeline.bench import RUNNER, bench_settings, host_cores, profile_local
from pipeline.stages.base import Context, Stage
from pipeline.stages.verify import tflite_files


@dataclass(frozen=True)
class ProfileResult:
    folder: Path
    files: Mapping[str, Mapping[str, Any]]  # file label (fp32, fp16, int8, baseline) -> the runner's figures
    devices: Mapping[str, Any] | None  # every device's run (DeviceRun.to_json) when profiled on devices
    op_profile: Mapping[str, Any] | None = None  # the shipped model per op on the first device (devices/op_profile.py)

    def to_json(self) -> dict[str, Any]:
        return {"files": dict(self.files), "devices": None if self.devices is None else dict(self.devices),
                "op_profile": None if self.op_profile is None else dict(self.op_profile)}  # fmt: skip

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> ProfileResult:
        return cls(folder, figures["files"], figures.get("devices"), figures.get("op_profile"))


def device_specs(req: Any) -> tuple[Any, ...]:
    """The devices to profile on: DEVICE when given, else the profile's own when it names one (ssh host, adb
    serial); none means this machine stands in (and the report says so)."""
    from pipeline.devices.spec import target_devices

    return target_devices(req)


class ProfileStage(Stage[ProfileResult]):
    name = "profile"
    result = ProfileResult
    version = 3  # figures: {"files": {...}, "devices": ..., "op_profile": ...}

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {**tflite_files(ctx), "runner": RUNNER}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t, specs = ctx.target, device_specs(ctx.req)
        where = {"devices": [s.name for s in specs]} if specs else {"host": platform.node(), "cores": host_cores()}
        return {**t.profiling.model_dump(mode="json"), **where, "power": t.power.model_dump(mode="json")}

    def run(self, ctx: Context, out: Path) -> ProfileResult:
        files, specs = tflite_files(ctx), device_specs(ctx.req)
        if not specs:
            settings = bench_settings(ctx.target, on_host=True)
            result = ProfileResult(out, {name: profile_local(path, settings) for name, path in files.items()}, None)
        else:
            from pipeline.devices.record import FILE_NAME, profile_and_record

            runs = profile_and_record(files, bench_settings(ctx.target, on_host=False), specs,
                                      record=ctx.run_dir / FILE_NAME, ssh_options=ctx.req.ssh_options)  # fmt: skip
            primary = runs[specs[0].name]
            devices = {name: run.to_json() for name, run in runs.items()}
            result = ProfileResult(out, {name: primary.results[name] for name in files}, devices)
        result = replace(result, op_profile=_op_profile(ctx, files[ctx.target.quantize.plan_precision], specs))
        write_json_atomic(out / "profile.json", result.to_json())
        return result


def _op_profile(ctx: Context, shipped: Path, specs: tuple[Any, ...]) -> dict[str, Any]:
    """Per-op times of the shipped model on the first device (or this machine), linked to the PyTorch layers."""
    from pipeline.devices import open_transport
    from pipeline.devices.op_profile import profile_ops
    from pipeline.devices.spec import DeviceSpec
    from pipeline.stages.finetune import FINETUNE

    spec = specs[0] if specs else DeviceSpec("local", python=sys.executable)
    transport = open_transport(spec, ssh_options=ctx.req.ssh_options)
    try:
        threads = bench_settings(ctx.target, on_host=not specs).threads
        model = ctx.load(ctx.get(FINETUNE).model_path) if ctx.has(FINETUNE) else None
        return profile_ops(shipped, transport, threads=threads, torch_model=model, example=ctx.example())
    finally:
        transport.close()


PROFILE = ProfileStage()
