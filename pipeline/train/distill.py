"""Recovery fine-tuning of a pruned model by knowledge distillation from the unpruned one.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, label)
(pure distillation when the data has no labels: the teacher is the only signal, so unlabelled images do).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data.imageset import ImageSet
from pipeline.models.spec import ModelSpec
from pipeline.targets import Finetune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    model: nn.Module
    steps: int
    images_seen: int
    final_loss: float
    best_step: int | None = None  # the step of the checkpoint kept (early stopping on validation)
    val_curve: tuple[tuple[int, float], ...] = ()  # (step, validation accuracy) at each evaluation


@torch.no_grad()
def predict(model: nn.Module, spec: ModelSpec, data: ImageSet, *, batch_size: int = 500) -> np.ndarray:
    """Float logits (N, classes) of the model in eval mode."""
    model.eval()
    out = [model(spec.to_tensor(data.images[i : i + batch_size])) for i in range(0, len(data), batch_size)]
    return torch.cat(out).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels).mean())


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (pad + crop): cheap, label-preserving for any image task."""
    _n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def _schedule(opt: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero."""
    n_warm = max(1, round(warmup * total)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor | None, *, alpha: float,
             t: float) -> torch.Tensor:  # fmt: skip
    kd = F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1), reduction="batchmean",
                  log_target=True) * (t * t)  # fmt: skip
    return alpha * kd + (1 - alpha) * F.cross_entropy(s_logits, y) if y is not None and alpha < 1.0 else kd


class _Keeper:
    """Evaluates on validation batches at set steps and keeps the best state (accuracy, then loss)."""

    def __init__(self, model: nn.Module, val: Sequence[Any], teacher: nn.Module, every: int) -> None:
        self.val, self.teacher, self.every = val, teacher, every
        self.best: tuple[float, float] | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.step: int | None = None
        self.curve: list[tuple[int, float]] = []
        if val:
            self.check(model, 0)

    def check(self, model: nn.Module, step: int) -> None:
        from pipeline.pruning.calibrate import evaluate

        loss, acc = evaluate(model, self.val, reference=self.teacher if self.val[0][1] is None else None)
        model.train()
        self.curve.append((step, round(acc, 6)))
        if self.best is None or (acc, -loss) > self.best:
            self.best, self.step = (acc, -loss), step
            self.state = copy.deepcopy(model.state_dict())

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def finetune_kd(
    student: nn.Module,
    teacher: nn.Module,
    spec: ModelSpec,
    train: ImageSet,
    cfg: Finetune,
    *,
    seed: int = 0,
    val: Sequence[Any] = (),
) -> FinetuneResult:
    """Distil `teacher` into a copy of `student` with the profile's `finetune:` settings: AdamW, warm-up then
    cosine, at least `cfg.min_steps` steps however small the data; with `val` batches and early stopping, the
    checkpoint of the best validation accuracy is the one returned."""
    student = copy.deepcopy(student)
    teacher = teacher.eval()
    data = train.subset(cfg.max_train_images, seed=seed)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = max(0, round(cfg.epochs * steps_per_epoch))
    if total == 0:
        return FinetuneResult(student.eval(), 0, 0, float("nan"))
    total = max(total, cfg.min_steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = _schedule(opt, total, cfg.warmup)
    alpha = cfg.alpha if data.labels is not None else 1.0
    keeper = _Keeper(student, val if cfg.early_stopping else (), teacher, max(1, total // cfg.evaluations))
    student.train()
    loss_val, seen, step = float("nan"), 0, 0
    bar = tqdm(total=total, desc="fine-tune (distillation)", unit="step", leave=False, disable=None)
    while step < total:
        order = torch.randperm(len(data), generator=gen).numpy()
        for i in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            idx = order[i : i + cfg.batch_size]
            x = _augment(spec.to_tensor(data.images[idx]), gen)
            with torch.no_grad():
                t_logits = teacher(x)
            y = torch.from_numpy(data.labels[idx]).long() if data.labels is not None else None
            loss = _kd_loss(student(x), t_logits, y, alpha=alpha, t=cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_val, seen, step = float(loss.detach()), seen + len(idx), step + 1
            bar.update(1)
            if keeper.val and (step % keeper.every == 0 or step == total):
                keeper.check(student, step)
    bar.close()
    keeper.restore(student)
    log.info("fine-tuned %d steps on %d images, last loss %.4f, kept step %s", total, seen, loss_val, keeper.step)
    return FinetuneResult(student.eval(), total, seen, loss_val, keeper.step, tuple(keeper.curve))
