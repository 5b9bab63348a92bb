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
class VariantFigures:
    """One .tflite file of a finished deploy: size, accuracy and agreement on the test set, latency."""

    precision: str
    size_bytes: int
    accuracy: float | None
    agreement: float | None  # top-1 agreement with PyTorch
    latency_p50_ms: float
    latency_p99_ms: float | None
    measured_on: str  # device name (machine, transport)

    @classmethod
    def from_summary(cls, precision: str, v: Mapping[str, Any]) -> VariantFigures:
        lat = v["latency_ms"]
        return cls(precision, int(v["size_bytes"]), v.get("accuracy"), v.get("agreement"), float(lat["p50"]),
                   lat.get("p99"), str(v["measured_on"]))  # fmt: skip


@dataclass(frozen=True)
class BudgetCheck:
    """One budget of the target profile against what the deploy measured."""

    name: str
    value: Any
    limit: Any
    status: str  # "met", "missed" or "not checked" (e.g. latency measured elsewhere than on the target)
    note: str = ""


@dataclass(frozen=True)
class DeployResult:
    """What a finished deploy gives back: the published bundle, its report, and every figure (`summary`, the
    content of summary.json), with typed views of the figures a caller reads most."""

    bundle: Path | None
    report: Path  # report.md in the bundle
    summary: Mapping[str, Any]

    @property
    def report_html(self) -> Path:
        return self.report.with_name("report.html")

    @property
    def shipped_precision(self) -> str:
        return str(self.summary["shipped_precision"])

    @property
    def figures(self) -> dict[str, VariantFigures]:
        """The pruned, fine-tuned model's files, by precision."""
        return {p: VariantFigures.from_summary(p, v) for p, v in self.summary["variants"].items()}

    @property
    def baseline(self) -> VariantFigures:
        """The unpruned model in the shipped precision (the "before")."""
        return VariantFigures.from_summary(self.shipped_precision, self.summary["baseline"]["tflite"])

    @property
    def budgets(self) -> tuple[BudgetCheck, ...]:
        return tuple(BudgetCheck(b["name"], b["value"], b["limit"], b["status"], b.get("note") or "")
                     for b in self.summary["budgets"])  # fmt: skip

    @property
    def measured_on(self) -> str:
        """Where the shipped model's latency was measured."""
        return self.figures[self.shipped_precision].measured_on

    @property
    def macs(self) -> tuple[int, int]:
        """(unpruned, pruned) multiply-accumulates for one input."""
        return int(self.summary["baseline"]["macs"]), int(self.summary["pruned"]["macs"])

    @property
    def params(self) -> tuple[int, int]:
        """(unpruned, pruned) parameters."""
        return int(self.summary["baseline"]["params"]), int(self.summary["pruned"]["params"])

    def table(self) -> str:
        """The before/after table and the budgets, as `edgeship deploy` prints them."""
        rows = [("variant", "size B", "accuracy", "agreement", "p50 ms", "p99 ms")]
        named = [(f"unpruned {self.shipped_precision}", self.baseline)]
        named += [(f"pruned {p}", v) for p, v in self.figures.items()]
        for label, v in named:
            rows.append((label, f"{v.size_bytes:,}", _fixed(v.accuracy, 4), _fixed(v.agreement, 4),
                         _fixed(v.latency_p50_ms, 3), _fixed(v.latency_p99_ms, 3)))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        out += [f"budget {b.name}: {b.value} (limit {b.limit}) {b.status}" for b in self.budgets]
        return "\n".join(out)


def _fixed(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


Progress = Callable[[str, "StageRecord"], None]
