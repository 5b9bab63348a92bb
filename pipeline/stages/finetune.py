"""Stage `finetune`: recover the pruned model by distillation from the unpruned one (pipeline/train)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import MODEL_FILE, Context, FlatResult, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.stages.prune import PRUNE

VAL_IMAGES = 1000  # validation images early stopping evaluates on


@dataclass(frozen=True)
class FinetuneOutcome(FlatResult):
    accuracy: float | None
    macs: int
    params: int
    steps: int
    images_seen: int
    final_loss: float | None
    best_step: int | None = None  # early stopping: the step whose checkpoint was kept
    val_curve: tuple = ()  # (step, validation accuracy) at each evaluation

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE


class FinetuneStage(Stage[FinetuneOutcome]):
    """Recover the pruned model by distillation from the unpruned one (a copy when pruning is off)."""

    name = "finetune"
    result = FinetuneOutcome
    version = 2  # min_steps, warm-up + cosine, early stopping on the validation split

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"student": ctx.get(PRUNE).model_path, "teacher": ctx.get(BASELINE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t = ctx.target
        return {**t.finetune.model_dump(mode="json"), "seed": ctx.req.seed, "train": ctx.data.describe()["train"],
                "pruning": t.pruning.enabled, "val": ctx.data.describe()["val"], **ctx.test_config()}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> FinetuneOutcome:
        import torch

        from pipeline.pruning.channels import count_macs_params
        from pipeline.train.distill import accuracy, finetune_kd, predict

        student = ctx.load(ctx.get(PRUNE).model_path)
        teacher = ctx.load(ctx.get(BASELINE).model_path)
        torch.manual_seed(ctx.req.seed)
        enabled = ctx.target.pruning.enabled
        if enabled:
            val = ctx.spec.batches(ctx.data.val, limit=VAL_IMAGES, seed=ctx.req.seed)
            result = finetune_kd(student, teacher, ctx.spec, ctx.data.train, ctx.target.finetune, seed=ctx.req.seed,
                                 val=val)  # fmt: skip
        model = result.model if enabled else student
        macs, params = count_macs_params(model, ctx.example())
        test = ctx.data.test
        acc = accuracy(predict(model, ctx.spec, test), test.labels)
        ctx.save(model, out / MODEL_FILE, {"stage": "finetune"})
        if not enabled:
            return FinetuneOutcome(out, acc, macs, params, 0, 0, None)
        return FinetuneOutcome(out, acc, macs, params, result.steps, result.images_seen, result.final_loss,
                               result.best_step, tuple(map(list, result.val_curve)))  # fmt: skip


FINETUNE = FinetuneStage()
