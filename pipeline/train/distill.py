"""Recovery fine-tuning of a pruned model by knowledge distillation from the unpruned one.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, label)
(pure distillation when the data has no labels: the teacher is the only signal, so unlabelled images do).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data.imageset import ImageSet
from pipeline.data.stream import ImageIndex
from pipeline.models.spec import ModelSpec
from pipeline.targets import Finetune
from pipeline.train.device import TrainDevice, resolve_device
from pipeline.train.world import World

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    model: nn.Module
    steps: int
    images_seen: int
    final_loss: float
    best_step: int | None = None  # the step of the checkpoint kept (early stopping on validation)
    val_curve: tuple[tuple[int, float], ...] = ()  # (step, validation accuracy) at each evaluation
    device: str = "cpu"  # where it ran, e.g. "cuda:0 (NVIDIA H200), bf16 autocast, channels_last"
    world_size: int = 1  # processes (DDP ranks) that trained
    images_per_s: float | None = None  # training images per second, all ranks together (evaluations excluded)
    train_seconds: float = 0.0
    resized: int = 0  # training images read that had to be resized to the model's input
    workers: int = 0  # DataLoader decoding processes per rank
    bn_frozen: bool = False  # BatchNorm kept its running statistics while training (`finetune.bn`)


@torch.no_grad()
def predict(model: nn.Module, spec: ModelSpec, data: ImageSet, *, batch_size: int = 500,
            device: torch.device | str | None = None) -> np.ndarray:  # fmt: skip
    """Float logits (N, classes) of the model in eval mode (on `device` when given: the model is moved there
    and back to where it was)."""
    model.eval()
    if device is None:
        out = [model(spec.to_tensor(data.images[i : i + batch_size])) for i in range(0, len(data), batch_size)]
        return torch.cat(out).numpy()
    home = next(model.parameters()).device
    model.to(device)
    try:
        out = [model(spec.to_tensor(data.images[i : i + batch_size]).to(device)).float().cpu()
               for i in range(0, len(data), batch_size)]  # fmt: skip
    finally:
        model.to(home)
    return torch.cat(out).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels).mean())


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


SMALL_BATCH = 16  # per-process batches below this train with BatchNorm statistics frozen


def train_mode(model: nn.Module, *, freeze_bn: bool) -> nn.Module:
    """`model.train()`; with `freeze_bn` its BatchNorm layers stay in eval mode: the running statistics of the
    unpruned model (re-estimated after pruning) are used and kept, since a batch of a few images estimates
    them badly (and a batch of one cannot), while their scale and shift still learn."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


class _Keeper:
    """Evaluates on validation batches at set steps and keeps the best state (accuracy, then loss)."""

    def __init__(self, model: nn.Module, val: Sequence[Any], teacher: nn.Module, every: int,
                 device: torch.device) -> None:  # fmt: skip
        from pipeline.pruning.calibrate import pseudo_labelled

        # unlabelled batches: scored as agreement with the teacher, whose answers are computed once here
        self.val = pseudo_labelled(val, teacher, device=device) if val else val
        self.teacher, self.every, self.device = teacher, every, device
        self.best: tuple[float, float] | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.step: int | None = None
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0
        self.freeze_bn = False
        if val:
            self.check(model, 0)

    def check(self, model: nn.Module, step: int) -> None:
        from pipeline.pruning.calibrate import evaluate

        start = time.perf_counter()
        loss, acc = evaluate(model, self.val, device=self.device)
        train_mode(model, freeze_bn=self.freeze_bn)
        self.curve.append((step, round(acc, 6)))
        if self.best is None or (acc, -loss) > self.best:
            self.best, self.step = (acc, -loss), step
            self.state = copy.deepcopy(model.state_dict())
        self.seconds += time.perf_counter() - start

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


@dataclass
class _Run:
    """One rank's training run: its model (DDP-wrapped when distributed), optimiser and counters."""

    model: nn.Module
    student: nn.Module
    teacher: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dev: TrainDevice
    spec: ModelSpec
    alpha: float
    temperature: float
    rgb: torch.Generator | None = None  # the spec's "rgb" augmentation (pipeline/train/augment.py), seeded per rank
    seen: int = 0
    resized: int = 0
    loss: float = float("nan")

    def step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        from pipeline.data.loader import normalize

        xb, yb, rb = batch
        d = self.dev
        if self.rgb is not None:  # crops, flips, jitter on the CPU batch (the loader's shifts are off)
            from pipeline.train.augment import rgb

            x = rgb(normalize(xb, self.spec.mean, self.spec.std, device=torch.device("cpu")), self.spec, self.rgb)
            x = x.to(d.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last) if d.channels_last else x
        else:
            x = normalize(xb, self.spec.mean, self.spec.std, device=d.device, channels_last=d.channels_last)
        y = yb.to(d.device, non_blocking=True) if int(yb[0]) >= 0 else None
        with torch.autocast(d.device.type, dtype=d.amp or torch.float32, enabled=d.amp is not None):
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = _kd_loss(self.model(x).float(), t_logits.float(), y, alpha=self.alpha, t=self.temperature)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.loss, self.seen, self.resized = float(loss.detach()), self.seen + len(xb), self.resized + int(rb.sum())


def _prepare(student: nn.Module, teacher: nn.Module, dev: TrainDevice, world: World) -> tuple[nn.Module, nn.Module]:
    """(the module to train, DDP-wrapped when distributed; the teacher), both on the device."""
    for m in (student, teacher):
        m.to(dev.device, memory_format=torch.channels_last) if dev.channels_last else m.to(dev.device)
    teacher.eval()
    if not world.distributed:
        return student, teacher
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.device.index] if dev.is_cuda else None
    # a conv with one input channel has weight strides that DDP's flat buckets never match: harmless, said once
    # per step and rank otherwise
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(student, device_ids=ids), teacher


def finetune_kd(
    student: nn.Module,
    teacher: nn.Module,
    spec: ModelSpec,
    train: ImageSet | ImageIndex,
    cfg: Finetune,
    *,
    seed: int = 0,
    val: Sequence[Any] = (),
    device: str | None = None,
    world: World | None = None,
) -> FinetuneResult:
    """Distil `teacher` into a copy of `student` with the profile's `finetune:` settings: AdamW, warm-up then
    cosine, at least `cfg.min_steps` steps however small the data; with `val` batches and early stopping, the
    checkpoint of the best validation accuracy is the one returned (on rank 0; evaluated there only).

    `train` is streamed through a DataLoader (pipeline/data/loader.py): an ImageIndex is decoded in worker
    processes as it is read. `device` (default `cfg.device`) as in pipeline/train/device.py. Under
    torch.distributed (`world`, from torchrun's environment; the process group initialised) every rank trains
    on its DistributedSampler share of each global batch of `cfg.batch_size` images and DDP averages the
    gradients; seeds are `seed` for the data order and the shifts (shared: drawn per image) and `seed + rank`
    for torch and a spec's "rgb" augmentation (crops, flips, jitter: per rank, so DDP matches one process only
    in distribution for such models)."""
    from pipeline.data.loader import make_loader

    world = world or World()
    dev = resolve_device(device or cfg.device, cfg.amp, local_rank=world.local_rank)
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    data = train.subset(cfg.max_train_images, seed=seed)
    if cfg.epochs == 0 or len(data) == 0:  # epochs: 0 is the way to ask for no fine-tuning
        return FinetuneResult(student.eval(), 0, 0, float("nan"), device=dev.describe(), world_size=world.size)
    # a fraction of an epoch that rounds to no step still trains: min_steps, and never fewer than one step
    total = max(1, round(cfg.epochs * math.ceil(len(data) / cfg.batch_size)), cfg.min_steps)
    per_rank = math.ceil(cfg.batch_size / world.size)
    c, h, w = spec.input_shape
    photos = getattr(spec, "augment", "shift") == "rgb"
    feed = make_loader(data, size=(h, w), channels=c, batch_size=per_rank, seed=seed, rank=world.rank,
                       world_size=world.size, workers=cfg.workers, pin_memory=dev.is_cuda,
                       shift=0 if photos else 2)  # fmt: skip
    torch.manual_seed(seed + world.rank)
    model, teacher = _prepare(student, teacher, dev, world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    run = _Run(model, student, teacher, opt, _schedule(opt, total, cfg.warmup),
               torch.amp.GradScaler(dev.device.type, enabled=dev.needs_scaler), dev, spec,
               cfg.alpha if feed.labelled else 1.0, cfg.temperature,
               torch.Generator().manual_seed(seed + world.rank) if photos else None)  # fmt: skip
    keeper = _Keeper(student, val if cfg.early_stopping and world.is_main else (), teacher,
                     max(1, total // cfg.evaluations), dev.device)  # fmt: skip
    keeper.freeze_bn = cfg.bn == "frozen" or (cfg.bn == "auto" and per_rank < SMALL_BATCH)
    seconds = _loop(run, feed, keeper, total, world)
    keeper.restore(student)
    seen, resized, loss = _totals(run, world)
    rate = seen / seconds if seconds > 0 else None
    log.info("fine-tuned %d steps on %d images (%s, %d rank(s), %.0f images/s, BatchNorm %s), last loss %.4f, "
             "kept step %s", total, seen, dev.describe(), world.size, rate or 0.0,
             "frozen" if keeper.freeze_bn else "training", loss, keeper.step)  # fmt: skip
    return FinetuneResult(student.cpu().eval(), total, seen, loss, keeper.step, tuple(keeper.curve),
                          device=dev.describe(), world_size=world.size, images_per_s=rate,
                          train_seconds=round(seconds, 3), resized=resized, workers=feed.workers,
                          bn_frozen=keeper.freeze_bn)  # fmt: skip


def _loop(run: _Run, feed: Any, keeper: _Keeper, total: int, world: World) -> float:
    """Train `total` steps (epochs of the sampler as needed); the seconds spent, less the evaluations."""
    train_mode(run.model, freeze_bn=keeper.freeze_bn)
    step, epoch = 0, 0
    bar = tqdm(total=total, desc="fine-tune (distillation)", unit="step", leave=False,
               disable=None if world.is_main else True)  # fmt: skip
    start = time.perf_counter()
    while step < total:
        feed.sampler.set_epoch(epoch)
        for batch in feed.loader:
            if step >= total:
                break
            run.step(batch)
            step += 1
            bar.update(1)
            if keeper.val and (step % keeper.every == 0 or step == total):
                keeper.check(run.student, step)
        epoch += 1
    if run.dev.is_cuda:
        torch.cuda.synchronize(run.dev.device)
    bar.close()
    return time.perf_counter() - start - keeper.seconds


def _totals(run: _Run, world: World) -> tuple[int, int, float]:
    """(images seen, images resized, mean last loss) over all ranks."""
    if not world.distributed:
        return run.seen, run.resized, run.loss
    import torch.distributed as dist

    t = torch.tensor([run.seen, run.resized, run.loss], dtype=torch.float64, device=run.dev.device)
    dist.all_reduce(t)
    return int(t[0]), int(t[1]), float(t[2]) / world.size
