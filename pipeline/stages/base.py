"""What every stage is: a declared object with a name, whether it applies, its inputs, its config and `run`.

`pipeline.deploy` walks the list of stages in order. For each stage that applies, the runner
(pipeline/runner.py) hashes the stage's input files and config; when a finished folder with the same key
exists, the stage is skipped and its result is read back from the figures it recorded; otherwise `run(ctx,
out)` writes into a fresh temporary folder and returns a frozen result whose `to_json()` is recorded.

A result knows its own file names (`model_path`, `tflite(precision)`, ...) relative to its folder, so no
caller spells a file name of another stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.data.sources import DataPlan
    from pipeline.models.spec import ModelSpec
    from pipeline.request import DeployRequest
    from pipeline.runner import StageRecord
    from pipeline.targets import TargetProfile

MODEL_FILE = "model.pt"


class Result(Protocol):
    folder: Path

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> Self: ...


class ModelResult(Result, Protocol):
    """A result that holds a PyTorch checkpoint."""

    @property
    def model_path(self) -> Path: ...


@dataclass(frozen=True)
class FlatResult:
    """A result whose JSON form is its fields (less `folder`), one to one."""

    folder: Path

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "folder"}

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)} - {"folder"}
        return cls(folder=folder, **{k: v for k, v in figures.items() if k in names})


R = TypeVar("R", bound=Result)


@dataclass
class Context:
    """What stages read: the request, the resolved checkpoint, and the results of the stages before."""

    req: DeployRequest
    checkpoint: Path
    results: dict[str, Any] = field(default_factory=dict)
    records: dict[str, StageRecord] = field(default_factory=dict)

    @property
    def target(self) -> TargetProfile:
        return self.req.target

    @property
    def spec(self) -> ModelSpec:
        return self.req.spec

    @property
    def data(self) -> DataPlan:
        return self.req.data

    @property
    def run_dir(self) -> Path:
        return self.req.run_dir

    def get(self, stage: Stage[R]) -> R:
        return self.results[stage.name]

    def has(self, stage: Stage[Any]) -> bool:
        return stage.name in self.results

    def decision_device(self) -> torch.device:
        """Where the pruning decisions are evaluated (sensitivity, search trials, BatchNorm re-estimation): the
        fine-tuning device (`finetune.device`, `--device`), this rank's GPU under DDP."""
        from pipeline.train.ddp import current_world
        from pipeline.train.device import resolve_device

        ft = self.target.finetune
        return resolve_device(ft.device, ft.amp, local_rank=current_world().local_rank).device

    def example(self) -> torch.Tensor:
        import torch

        return torch.zeros(1, *self.spec.input_shape)

    def load(self, path: Path) -> nn.Module:
        from pipeline.models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(path, self.spec.build())
        return model.eval()

    def save(self, model: nn.Module, path: Path, meta: Mapping[str, Any]) -> None:
        from pipeline.models.checkpoint import save_checkpoint

        save_checkpoint(model, path, meta=dict(meta))

    def model_config(self) -> dict[str, Any]:
        s = self.spec
        return {"model": s.name, "input_shape": s.input_shape, "mean": s.mean, "std": s.std}

    def test_config(self) -> dict[str, Any]:
        return {"test": self.data.describe()["test"], "test_limit": self.data.test_limit}


class Stage(Generic[R]):
    """A step of the chain. Subclasses set `name`, `result` (the result type) and `version` (bumped when the
    stage's outputs or figures change shape, so older cached folders are not read as the new form)."""

    name: ClassVar[str] | str
    result: type[R]
    version: ClassVar[int] = 1

    def applies(self, ctx: Context) -> bool:
        return True

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        raise NotImplementedError

    def config(self, ctx: Context) -> Mapping[str, Any]:
        raise NotImplementedError

    def run(self, ctx: Context, out: Path) -> R:
        raise NotImplementedError
