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
    device: str | None = None  # where it ran: "cuda:0 (NVIDIA H200), bf16 autocast, channels_last", "cpu (...)"
    world_size: int = 1  # DDP processes that trained (torchrun ranks)
    images_per_s: float | None = None  # training throughput, all ranks together, evaluations excluded
    train_seconds: float | None = None
    train_images: int | None = None  # in the training split (streamed, not held in memory when on disk)
    resized: int = 0  # training images read that were resized to the model's input
    data_workers: int = 0  # DataLoader decoding processes per rank
    bn_frozen: bool = False  # BatchNorm kept its running statistics while training (`finetune.bn`)

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE


class FinetuneStage(Stage[FinetuneOutcome]):
    """Recover the pruned model by distillation from the unpruned one (a copy when pruning is off)."""

    name = "finetune"
    result = FinetuneOutcome
    version = 4  # streamed through a DataLoader (per-image shifts), device, DDP; finetune.bn recorded

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"student": ctx.get(PRUNE).model_path, "teacher": ctx.get(BASELINE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        from pipeline.train.ddp import current_world

        t = ctx.target
        return {**t.finetune.model_dump(mode="json"), "seed": ctx.req.seed, "train": ctx.data.describe()["train"],
                "pruning": t.pruning.enabled, "val": ctx.data.describe()["val"], **ctx.test_config(),
                "world_size": current_world().size, "fingerprints": ctx.data.fingerprints()}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> FinetuneOutcome:
        import torch

        from pipeline.pruning.channels import count_macs_params
        from pipeline.train.distill import accuracy, predict

        student = ctx.load(ctx.get(PRUNE).model_path)
        torch.manual_seed(ctx.req.seed)
        enabled = ctx.target.pruning.enabled
        result = _distil(ctx, student) if enabled else None
        model = result.model if result is not None else student
        macs, params = count_macs_params(model, ctx.example())
        test = ctx.data.test
        acc = accuracy(predict(model, ctx.spec, test), test.labels)
        ctx.save(model, out / MODEL_FILE, {"stage": "finetune"})
        if result is None:
            return FinetuneOutcome(out, acc, macs, params, 0, 0, None)
        return FinetuneOutcome(out, acc, macs, params, result.steps, result.images_seen, result.final_loss,
                               result.best_step, tuple(map(list, result.val_curve)), result.device,
                               result.world_size, _round(result.images_per_s), result.train_seconds,
                               len(ctx.data.train_stream), result.resized, result.workers,
                               result.bn_frozen)  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _distil(ctx: Context, student: Any) -> Any:
    """The distillation run, on this process alone or, under torchrun, with every rank (pipeline/train/ddp.py):
    the job is sent to the other ranks first; a failed collective is a DistributedError."""
    from pipeline.train.ddp import collective_error, current_session, make_job
    from pipeline.train.distill import finetune_kd

    teacher = ctx.load(ctx.get(BASELINE).model_path)
    val = ctx.spec.batches(ctx.data.val, limit=VAL_IMAGES, seed=ctx.req.seed)
    cfg, seed, session = ctx.target.finetune, ctx.req.seed, current_session()
    if session is None:
        return finetune_kd(student, teacher, ctx.spec, ctx.data.train_stream, cfg, seed=seed, val=val)
    session.send(make_job(ctx.get(PRUNE).model_path, ctx.get(BASELINE).model_path, cfg, seed=seed,
                          data=ctx.data.fingerprints()["train"]))  # fmt: skip
    try:
        return finetune_kd(student, teacher, ctx.spec, ctx.data.train_stream, cfg, seed=seed, val=val,
                           world=session.world)  # fmt: skip
    except RuntimeError as exc:  # torch.distributed's errors (DistBackendError, gloo's) are RuntimeErrors
        raise collective_error(exc, session.world) from exc


FINETUNE = FinetuneStage()
