"""Run one stage at most once per set of inputs: skip it when its inputs and config are unchanged.

A stage writes only into a fresh temporary folder; when it returns, its manifest (input hashes, config,
tool versions, output hashes, figures) is written last and the folder is renamed into place. A killed run
leaves at most a `.name.tmp` folder, which the next run removes; the next run redoes that stage only.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.artifacts import (
    MANIFEST,
    fresh_temp_dir,
    is_out_of_space,
    outputs_intact,
    read_json,
    replace_dir,
    sha256_file,
    sha256_json,
    storage_error,
    write_json_atomic,
)
from pipeline.errors import StorageError

log = logging.getLogger(__name__)

TOOLS = ("torch", "torch-pruning", "onnx", "onnxruntime", "onnx2tf", "tensorflow", "ai-edge-litert", "numpy")


@cache
def tool_versions() -> dict[str, str]:
    """Installed versions of the tools whose output ends up in artifacts (read from metadata, no imports)."""
    out = {"edgeship": __version__}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class StageRecord:
    name: str
    folder: Path
    figures: Mapping[str, Any]
    skipped: bool
    seconds: float

    def path(self, rel: str) -> Path:
        return self.folder / rel


def stage_key(name: str, inputs: Mapping[str, Path], config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    hashed = {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in sorted(inputs.items())}
    digests = {k: v["sha256"] for k, v in hashed.items()}
    key = sha256_json({"stage": name, "inputs": digests, "config": config, "tools": tool_versions()})
    return key, hashed


def run_stage(
    run_dir: Path,
    name: str,
    work: Callable[[Path], Mapping[str, Any]],
    *,
    inputs: Mapping[str, Path],
    config: Mapping[str, Any],
    force: bool = False,
) -> StageRecord:
    """Run `work(tmp_folder) -> figures` unless a finished folder with the same key exists."""
    folder = run_dir / name
    key, hashed = stage_key(name, inputs, config)
    manifest_path = folder / MANIFEST
    if not force and manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get("key") == key and outputs_intact(folder, manifest):
            log.info("stage %s: up to date, skipped", name)
            return StageRecord(name, folder, manifest.get("figures", {}), True, manifest.get("seconds", 0.0))
        log.info("stage %s: inputs or config changed, running again", name)
    try:
        tmp = fresh_temp_dir(run_dir, name)
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        raise storage_error(exc, run_dir / f".{name}.tmp") from exc
    start = time.perf_counter()
    try:
        figures = dict(work(tmp))
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous result stays in place
        raise StorageError(
            f"stage {name}: cannot write {exc.filename or tmp}: {exc.strerror or exc}; free some space on "
            f"{run_dir} (or raise the limit) and run again: finished stages are kept"
        ) from exc
    except BaseException:  # a failed stage or Ctrl-C: no half-written folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = round(time.perf_counter() - start, 3)
    outputs = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "stage": name,
        "key": key,
        "inputs": hashed,
        "config": config,
        "tools": tool_versions(),
        "outputs": outputs,
        "figures": figures,
        "seconds": seconds,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        write_json_atomic(tmp / MANIFEST, manifest)
    except StorageError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, folder)
    log.info("stage %s: done in %.1f s", name, seconds)
    return StageRecord(name, folder, figures, False, seconds)
