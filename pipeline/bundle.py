"""Publishing: the bundle folder `artifacts/<target>/` an app or a device takes the model from.

The bundle is built in a temporary folder beside `artifacts/<target>/` and renamed into place when whole: a
failed run leaves the previous bundle untouched. Every file in it is listed with its sha256 in
`manifest.json`, which is written last (atomically) and carries the deploy's summary.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import fresh_temp_dir, replace_dir, sha256_file, wait_lock, write_json_atomic
from pipeline.convert.convert_tflite import tflite_name
from pipeline.ship.metadata import bundle_metadata
from pipeline.ship.version import timestamp_version
from pipeline.stages import CONVERT, EDGETPU, Context

if TYPE_CHECKING:
    from pipeline.convert.convert_tflite import TfliteFile
    from pipeline.models.spec import ModelSpec
    from pipeline.stages.edgetpu import EdgetpuResult

BUNDLE_FORMAT = "edgeship-bundle/1"
REPORT_FILES = ("report.md", "report.html")


def _io(f: TfliteFile) -> dict[str, Any]:
    """The shipped model's input and output tensors, as the interpreter reports them."""
    return {
        "input": {"shape": f.input_shape, "dtype": f.input_dtype, "quantization": f.input_quantization},
        "output": {"shape": f.output_shape, "dtype": f.output_dtype, "quantization": f.output_quantization},
    }


def publish(ctx: Context, summary: Mapping[str, Any], *, report_dir: Path) -> Path:
    """Publish the finished chain of `ctx` as `artifacts/<target>/`."""
    conv = ctx.get(CONVERT)
    return publish_bundle(ctx.req.bundle_dir, summary, conv.files(), spec=ctx.spec, report_dir=report_dir,
                          edgetpu=ctx.get(EDGETPU) if ctx.has(EDGETPU) else None)  # fmt: skip


def _copy_models(tmp: Path, files: Mapping[str, TfliteFile], ship: str, edgetpu: EdgetpuResult | None) -> None:
    shutil.copyfile(files[ship].path, tmp / "model.tflite")
    (tmp / "variants").mkdir()
    for p, f in files.items():
        shutil.copyfile(f.path, tmp / "variants" / tflite_name(p))
    if edgetpu is not None:
        if edgetpu.compiled_model is not None:
            shutil.copyfile(edgetpu.compiled_model, tmp / "model_edgetpu.tflite")
        shutil.copyfile(edgetpu.json_path, tmp / "edgetpu.json")


def publish_bundle(
    dest: Path,
    summary: Mapping[str, Any],
    files: Mapping[str, TfliteFile],
    *,
    spec: ModelSpec,
    report_dir: Path,
    edgetpu: EdgetpuResult | None = None,
) -> Path:
    """Write the bundle (`files`: the converted model per precision) into a temporary folder beside `dest`,
    then rename it into place. Two publishers of the same bundle (deploys with different --runs-dir) take
    turns: the lock covers the temporary folder too. `report_dir` holds the deploy's report.md and .html."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with wait_lock(dest.parent / f".{dest.name}.publish.lock"):
        tmp = fresh_temp_dir(dest.parent, dest.name)
        now = datetime.now(UTC).replace(microsecond=0)
        ship = summary["shipped_precision"]
        _copy_models(tmp, files, ship, edgetpu)
        (tmp / "labels.txt").write_text("\n".join(spec.class_names) + "\n", encoding="utf-8")
        meta = bundle_metadata(summary, _io(files[ship]), mean=spec.mean, std=spec.std,
                               class_names=spec.class_names, version=timestamp_version(now))  # fmt: skip
        write_json_atomic(tmp / "metadata.json", meta)
        for name in REPORT_FILES:
            if (report_dir / name).is_file():
                shutil.copyfile(report_dir / name, tmp / name)
        listing = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        created = now.isoformat(timespec="seconds")
        manifest = {"format": BUNDLE_FORMAT, "created": created, "files": listing, "summary": summary}
        write_json_atomic(tmp / "manifest.json", manifest)
        replace_dir(tmp, dest)
        return dest
