"""What a deploy is asked to do: the one record the CLI (and any other caller) hands to `pipeline.deploy`.

It imports nothing of the pipeline at run time, so every layer may name it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.sources import DataPlan
    from pipeline.devices.ssh import SshOptions
    from pipeline.models.spec import ModelSpec
    from pipeline.runner import StageRecord
    from pipeline.targets import TargetProfile


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
    ssh_options: SshOptions | None = None  # known_hosts, identity; None: the user's ssh config

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.target.name

    @property
    def bundle_dir(self) -> Path:
        return self.artifacts_dir / self.target.name


@dataclass(frozen=True)
class DeployResult:
    bundle: Path | None
    report: Path
    summary: Mapping[str, Any]


Progress = Callable[[str, "StageRecord"], None]
