"""Profile on devices and keep every device's figures: `runs/<target>/profile-devices.json`.

The file holds one entry per device: its latest *finished* figures (when they were measured, the sha256 of
each model file they are for, the runner's results), and, apart from them, its latest failure. A run that
fails on a device never erases what that device measured before; an entry is added or replaced only after
that device's run finished. Both `edgeship deploy DEVICE=...` and `edgeship profile` go through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.artifacts import sha256_file, write_json_atomic
from pipeline.bench import BenchSettings
from pipeline.devices.profile_device import DeviceRun, profile_devices
from pipeline.devices.spec import DeviceSpec
from pipeline.devices.ssh import SshOptions
from pipeline.errors import DevicesFailed

FORMAT = "edgeship-device-figures/1"
FILE_NAME = "profile-devices.json"


def read_record(path: Path) -> dict[str, Any]:
    """The devices' entries recorded at `path` ({} when there is none, or an older or unreadable file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        return {}
    return dict(data["devices"])


def _entry(run: DeviceRun, hashes: Mapping[str, str], now: str, earlier: Mapping[str, Any] | None) -> dict[str, Any]:
    """The device's new entry: its figures when the run finished, else the earlier figures and this failure."""
    if run.ok:
        return {"measured_at": now, "files": dict(hashes), **run.to_json(), "last_failure": None}
    failure = {"at": now, "error": None if run.error is None else str(run.error), "failed": dict(run.failed)}
    if earlier and earlier.get("results"):
        return {**earlier, "last_failure": failure}
    return {"measured_at": None, "files": {}, **run.to_json(), "last_failure": failure}


def profile_and_record(
    files: Mapping[str, Path],
    settings: BenchSettings,
    specs: Sequence[DeviceSpec],
    *,
    record: Path,
    ssh_options: SshOptions | None = None,
) -> dict[str, DeviceRun]:
    """Profile `files` on every device in parallel and merge each device's outcome into `record`.

    Raises DeviceError naming every device that failed, after the record is written."""
    runs = profile_devices(files, settings, specs, ssh_options=ssh_options)
    hashes = {name: sha256_file(path) for name, path in files.items()}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    devices = read_record(record)
    for name, run in runs.items():
        devices[name] = _entry(run, hashes, now, devices.get(name))
    write_json_atomic(record, {"format": FORMAT, "devices": devices})
    bad = {name: run for name, run in runs.items() if not run.ok}
    if bad:
        why = "; ".join(f"{n}: {r.error or r.failed}" for n, r in bad.items())
        raise DevicesFailed(
            f"profiling on {', '.join(bad)} failed ({why}). Earlier figures of every device, and what this run "
            f"measured on the others, are kept in {record}.",
            runs,
        )
    return runs


def current_figures(record: Path, files: Mapping[str, Path]) -> dict[str, Any]:
    """Each device's recorded figures for exactly these model files (matched by sha256), for the report."""
    hashes = {name: sha256_file(path) for name, path in files.items() if path.is_file()}
    wanted = set(hashes.values())
    out = {}
    for name, entry in read_record(record).items():
        by_hash = {entry.get("files", {}).get(m): r for m, r in (entry.get("results") or {}).items()}
        results = {m: by_hash[h] for m, h in hashes.items() if h in by_hash and h in wanted}
        if results:
            out[name] = {**entry, "results": results}
    return out
