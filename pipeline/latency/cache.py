"""The latency-table cache: probe timings per device, shared by every model and deploy that runs there.

A device is named by its fingerprint, never by its host name or address: the CPU (model string and core
count), the OS and architecture, the TFLite runtime and its version, the thread count and the delegate. Two
boards of the same kind share one table; the same board after a runtime upgrade gets a new one.

Layout: `<root>/<fingerprint key>.json`, root = `$EDGESHIP_CACHE/tables` when EDGESHIP_CACHE is set (tests),
else `$XDG_CACHE_HOME/edgeship/tables` (default `~/.cache/edgeship/tables`). Each file holds the fingerprint,
where it was measured, and one entry per probe keyed by its geometry and channel counts
(`int8|conv:k3x3:s1x1:same:hw28x28|16x32`), so models that share a layer geometry share its measurements.
Every batch measured is merged in under a lock and written atomically: a device lost half-way keeps what it
measured, and the next run measures only what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json_atomic

FORMAT = "edgeship-table-cache/1"
# How the probes are built (pipeline/latency/build_layers.py): a change there must not reuse old timings.
PROBE_RECIPE = "keras-layer+relu, TFLiteConverter, random int8 calibration/1"


def cache_root() -> Path:
    """Where the tables live: $EDGESHIP_CACHE/tables, else $XDG_CACHE_HOME/edgeship/tables."""
    if env := os.environ.get("EDGESHIP_CACHE"):
        return Path(env) / "tables"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgeship" / "tables"


@dataclass(frozen=True)
class Fingerprint:
    """What a latency table depends on about the device (and nothing about its name)."""

    cpu: str
    cores: int
    system: str
    machine: str
    runtime: str
    runtime_version: str
    threads: int
    delegate: str = "none"

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.machine}-{hashlib.sha256(blob).hexdigest()[:16]}"

    def describe(self) -> str:
        return (f"{self.cpu} x{self.cores}, {self.system} {self.machine}, {self.runtime} {self.runtime_version}, "
                f"{self.threads} thread(s), delegate {self.delegate}")  # fmt: skip

    @staticmethod
    def from_probe(info: Mapping[str, Any], *, threads: int, delegate: str | None = None) -> Fingerprint:
        """From the device probe (pipeline.devices.probe_device) and the benchmark settings."""
        return Fingerprint(
            cpu=str(info.get("cpu") or "unknown"),
            cores=int(info.get("cores") or 0),
            system=str(info.get("system") or "unknown"),
            machine=str(info.get("machine") or "unknown"),
            runtime=str(info.get("runtime") or "unknown"),
            runtime_version=str(info.get("runtime_version") or "unknown"),
            threads=threads,
            delegate=delegate or "none",
        )


def probe_key(precision: str, geometry_key: str, cin: int, cout: int) -> str:
    return f"{precision}|{geometry_key}|{cin}x{cout}"


class TableCache:
    """The cached probe timings of every device fingerprint under `root`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()

    def path(self, fp: Fingerprint) -> Path:
        return self.path_for_key(fp.key())

    def path_for_key(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("probe_recipe") != PROBE_RECIPE:
            return None
        return data

    def entries(self, fp: Fingerprint) -> dict[str, dict[str, Any]]:
        """{probe key: {"p50", "mean", "runs", "at"}} measured on devices with this fingerprint."""
        data = self._read(self.path(fp))
        return dict(data["entries"]) if data and isinstance(data.get("entries"), dict) else {}

    @contextlib.contextmanager
    def _locked(self, fp: Fingerprint) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{fp.key()}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def merge(self, fp: Fingerprint, new: Mapping[str, Mapping[str, Any]], *, device: str) -> int:
        """Add `new` probe timings (measured on `device`) to the fingerprint's table; the entry count after."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._locked(fp):
            path = self.path(fp)
            data = self._read(path) or {"format": FORMAT, "probe_recipe": PROBE_RECIPE, "fingerprint": asdict(fp),
                                        "created": now, "entries": {}, "devices": []}  # fmt: skip
            data["entries"].update({k: {**v, "at": now} for k, v in new.items()})
            if device not in data["devices"]:
                data["devices"].append(device)
            data["updated"] = now
            write_json_atomic(path, data)
            return len(data["entries"])

    def list_tables(self) -> list[dict[str, Any]]:
        """One row per cached table: its key, fingerprint, probe count, devices that measured it, dates."""
        rows = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            data = self._read(path)
            if data is None:
                rows.append({"key": path.stem, "path": str(path), "error": "unreadable or another format"})
                continue
            by_precision: dict[str, int] = {}
            for k in data["entries"]:
                by_precision[k.split("|", 1)[0]] = by_precision.get(k.split("|", 1)[0], 0) + 1
            rows.append({"key": path.stem, "path": str(path), "fingerprint": data["fingerprint"],
                         "probes": len(data["entries"]), "by_precision": by_precision,
                         "devices": data.get("devices", []), "created": data.get("created"),
                         "updated": data.get("updated")})  # fmt: skip
        return rows
