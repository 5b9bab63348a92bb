"""Recovery fine-tuning of a pruned model by knowledge distillation from the unpruned one.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, label)
(pure distillation when the data has no labels: the teacher is the only signal, so unlabelled images do).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

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


def finetune_kd(
    student: nn.Module, teacher: nn.Module, spec: ModelSpec, train: ImageSet, cfg: Finetune, *, seed: int = 0
) -> FinetuneResult:
    """Distil `teacher` into a copy of `student` with the profile's `finetune:` settings."""
    student = copy.deepcopy(student)
    teacher = teacher.eval()
    data = train.subset(cfg.max_train_images, seed=seed)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = max(0, round(cfg.epochs * steps_per_epoch))
    if total == 0:
        return FinetuneResult(student.eval(), 0, 0, float("nan"))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    alpha = cfg.alpha if data.labels is not None else 1.0
    t = cfg.temperature
    student.train()
    loss_val = float("nan")
    seen = 0
    bar = tqdm(total=total, desc="fine-tune (distillation)", unit="step", leave=False, disable=None)
    step = 0
    while step < total:
        order = torch.randperm(len(data), generator=gen).numpy()
        for i in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            idx = order[i : i + cfg.batch_size]
            x = _augment(spec.to_tensor(data.images[idx]), gen)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(
                F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1), reduction="batchmean", log_target=True
            ) * (t * t)
            loss = alpha * kd
            if alpha < 1.0:
                y = torch.from_numpy(data.labels[idx]).long()
                loss = loss + (1 - alpha) * F.cross_entropy(s_logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
            seen += len(idx)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
    bar.close()
    log.info("fine-tuned %d steps on %d images, last loss %.4f", total, seen, loss_val)
    return FinetuneResult(student.eval(), total, seen, loss_val)
