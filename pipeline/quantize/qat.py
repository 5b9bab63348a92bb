"""Remedy (d): quantization-aware fine-tuning by distillation, with fake quantization matching TFLite int8.

The student is a BatchNorm-folded torch.fx copy of the model (so the weights it learns are the ones TFLite
quantizes). Weights are fake-quantized per output channel, symmetric (scale = max |w| / 127); activations per
tensor, asymmetric, at the points where TFLite keeps an int8 tensor: the input, every layer output except a
conv/linear whose only consumer is a ReLU (TFLite fuses the pair), adds, concatenations and pools. Activation
ranges start at the calibration images' min/max and follow an exponential moving average of each batch's
min/max; after 60% of the steps they are set to the min/max of the calibration images through the network
as it is then (weights on the int8 grid) and frozen. Given a range method (`ranges`: "mse" or "percentile:Q",
the one the calibration remedy chose), the ranges are instead the ones that method picks from each tensor's
histogram on the calibration images (pipeline/quantize/ranges.py, the same code tfconv runs), from the start
and at every recalibration, with no moving average. The loss is distillation from the float teacher (KL of
softened logits, T = 2) alone: the goal is agreement with the float model, so labels are not needed.

Checkpoints: given held-out images (`val`; remedies.py holds QAT_HOLDOUT training images out of QAT's
training for it, so the validation split that judges the result is not the one that picked it), the student
is scored every EVAL_EVERY steps, step 0 (the post-training-quantized start) included: its ranges
recalibrated on the calibration images as the converter would, fake-quantized, top-1 agreement with the
teacher (ties: lower KL). Training goes on with those ranges (periodic recalibration), and the best-scoring
weights are the ones exported: a run that diverges ships its start, not its last step. Measured on
branch_concat (bench/quantization.py, three learning rates), the score rose and fell by +-0.01 between
checkpoints at 500 images: picking the best checkpoint on the validation split itself then reported
0.990-0.992 there, where picking it on held-out training images gave 0.980-0.986 on the validation split.

What ships: the weights end on TFLite's grid (the fake-quantized values are written into the model, so the
converter's per-channel max |w| / 127 reproduces them), and the last 40% of the steps trained against the
activation ranges the exported model is then given from the same calibration images, so the ranges the
network learned to live with are the ones the int8 file gets. The fake-quant nodes are removed and the model
goes through the same export and onnx2tf conversion as every other remedy, then remedies.py has tfconv write
the ranges (the method's, else "measured": the true min/max). Not TFLite's calibrator's min/max: it records
an in-place op's output range for its input (ranges.py), which the student never saw. Measured on
branch_concat (a conv before x * 30; 500 validation images): 300 QAT steps shipped with the calibrator's
ranges agreed 0.948 (its checkpoints scored 0.99-1.0 on held-out training images); shipped with the
measured ones, 0.976. The ranges are computed, not learned clipping values: onnx2tf 1.29 takes no given ranges.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.quantize.equalize import EqualizeSkipped
from pipeline.quantize.ranges import Histogram, range_picker
from pipeline.quantize.scheme import fake_quant_act, fake_quant_weight

log = logging.getLogger(__name__)

NO_QUANT_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)
FUSED_ACT = (nn.ReLU, nn.ReLU6)
QUANT_FUNCS = {
    operator.add,
    operator.mul,
    torch.add,
    torch.mul,
    torch.cat,
    torch.relu,
    nn.functional.relu,
    nn.functional.silu,
    nn.functional.hardswish,
    nn.functional.adaptive_avg_pool2d,
    nn.functional.avg_pool2d,
    nn.functional.max_pool2d,
    nn.functional.interpolate,
    torch.sigmoid,
}
TEMPERATURE = 2.0
CE_WEIGHT = 0.0  # the goal is agreement with the float model: pure distillation (labels not needed)
FREEZE_AT = 0.6
EMA = 0.05
OBSERVE_BATCH = 64
EVAL_EVERY = 25  # QAT steps between validation scores of the student
LR = 2e-5
SCHEDULE = "constant"  # constant | cosine (5% linear warm-up, then cosine decay to 0)


class ActQuant(nn.Module):
    """Per-tensor asymmetric int8 fake quantization of one activation, its range a moving average."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.mode = "observe"  # observe | histogram | train | frozen
        self.edge = False  # the model's input or output: tfconv keeps their min/max whatever the range method
        self.hist: Histogram | None = None  # filled in mode "histogram"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "histogram":
            assert self.hist is not None
            self.hist.add(x.detach().numpy())
            return x
        if self.mode == "observe":
            self.lo.fill_(min(float(self.lo), float(x.min())))
            self.hi.fill_(max(float(self.hi), float(x.max())))
            return x
        if self.mode == "train":
            self.lo.mul_(1 - EMA).add_(EMA * x.detach().min())
            self.hi.mul_(1 - EMA).add_(EMA * x.detach().max())
        return fake_quant_act(x, float(self.lo), float(self.hi))


class _WeightQuant(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, 0)


@dataclass(frozen=True)
class QatRecord:
    steps: int
    act_points: int
    final_loss: float
    calibration_images: int  # the images whose min/max froze the ranges (the converter's calibration set)
    kept_step: int = -1  # the checkpoint shipped (the best on validation; `steps` without validation)
    scores: tuple[dict, ...] = ()  # {"step", "agreement", "kl"}: the simulated int8 student on `val`
    selection_images: int = 0  # how many images the checkpoints were scored on (0: none, the last one kept)
    ranges: str = "minmax"  # the activation ranges trained against (and shipped): min/max or a range method

    def to_dict(self) -> dict:
        return {"steps": self.steps, "act_points": self.act_points, "final_loss": self.final_loss,
                "calibration_images": self.calibration_images, "kept_step": self.kept_step,
                "selection_images": self.selection_images, "ranges": self.ranges,
                "scores": [dict(r) for r in self.scores]}  # fmt: skip


def _fused_into_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if len(node.users) != 1 or node.op != "call_module":
        return False
    if not isinstance(gm.get_submodule(str(node.target)), (nn.Conv2d, nn.Linear)):
        return False
    user = next(iter(node.users))
    if user.op == "call_module":
        return isinstance(gm.get_submodule(str(user.target)), FUSED_ACT)
    return user.op == "call_function" and user.target in (torch.relu, nn.functional.relu)


def _wants_quant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "placeholder":
        return True
    if node.op == "call_module":
        return not isinstance(gm.get_submodule(str(node.target)), NO_QUANT_MODULES) and not _fused_into_relu(gm, node)
    return node.op == "call_function" and node.target in QUANT_FUNCS


def insert_act_quant(gm: torch.fx.GraphModule) -> list[ActQuant]:
    """An ActQuant after every node where TFLite keeps an int8 tensor; returns them in graph order."""
    quants = []
    for node in list(gm.graph.nodes):
        if not _wants_quant(gm, node):
            continue
        q = ActQuant()
        name = f"actq_{len(quants)}"
        gm.add_submodule(name, q)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        q.edge = node.op == "placeholder" or any(u.op == "output" for u in new.users)
        quants.append(q)
    gm.graph.lint()
    gm.recompile()
    return quants


def _student(model: nn.Module) -> torch.fx.GraphModule:
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError ...
        raise EqualizeSkipped(f"torch.fx cannot trace the model for QAT ({type(exc).__name__}: {exc})") from exc


def _set_mode(quants: list[ActQuant], mode: str) -> None:
    for q in quants:
        q.mode = mode


@dataclass(frozen=True)
class Calibration:
    """The images the exported model's ranges are computed on, and the method (tfconv's "ranges": "mse" |
    "percentile:Q"; None: their min/max, which tfconv writes as "measured")."""

    images: torch.Tensor
    ranges: str | None = None


def _observe(gm: nn.Module, quants: list[ActQuant], calibration: Calibration) -> None:
    """Ranges = the min/max of the activations on the calibration images (weights already on the int8 grid),
    in eval mode (no dropout): what TFLite's converter calibrates for the exported model from the same images.
    In batches of OBSERVE_BATCH: the min/max of the batches' min/max. With `ranges` ("mse" | "percentile:Q"),
    a second pass counts each inner tensor's values into a histogram over that min/max and its range becomes
    the one the method picks from it: what tfconv writes for the exported model given the same method and
    images (the model's input and output keep their min/max there too)."""
    for q in quants:
        q.lo.fill_(float("inf"))
        q.hi.fill_(float("-inf"))
    _set_mode(quants, "observe")
    calib, ranges = calibration.images, calibration.ranges
    _forward_all(gm, calib)
    pick = None if ranges is None else range_picker(ranges)
    if ranges is not None and pick is None:
        raise ValueError(f"QAT: {ranges!r} is not a range method")
    inner = [q for q in quants if not q.edge]
    if pick is None or not inner:
        return
    for q in inner:
        q.hist = Histogram.over(float(q.lo), float(q.hi))
        q.mode = "histogram"
    _forward_all(gm, calib)
    for q in inner:
        assert q.hist is not None
        lo, hi = pick(q.hist)
        q.lo.fill_(lo)
        q.hi.fill_(hi)
        q.hist = None
        q.mode = "observe"


def _forward_all(gm: nn.Module, calib: torch.Tensor) -> None:
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        for start in range(0, len(calib), OBSERVE_BATCH):
            gm(calib[start : start + OBSERVE_BATCH])
    gm.train(was_training)


def _without(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph with the ActQuant nodes taken out: the exported model carries only TFLite's own quantization."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ActQuant):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            delattr(gm, str(node.target))
    gm.graph.lint()
    gm.recompile()
    return gm


def lr_at(step: int, steps: int, lr: float) -> float:
    """The learning rate of one QAT step (SCHEDULE)."""
    if SCHEDULE == "constant":
        return lr
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@dataclass(frozen=True)
class _Val:
    """The validation images and the float teacher's answers on them: what QAT's checkpoints are scored on."""

    x: torch.Tensor
    top1: torch.Tensor
    logits: torch.Tensor


def _score(gm: nn.Module, quants: list[ActQuant], calib: Calibration, val: _Val) -> tuple[float, float]:
    """(top-1 agreement, -KL) with the teacher of the student as the converter would ship it now: its
    ranges recalibrated on the calibration images (`_observe`), fake-quantized, in eval mode. The ranges stay
    at that calibration (training goes on with them: periodic recalibration)."""
    mode = quants[0].mode if quants else "frozen"
    _observe(gm, quants, calib)
    _set_mode(quants, "frozen")
    was_training = gm.training
    gm.eval()
    agree, kl = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(val.x), OBSERVE_BATCH):
            s = gm(val.x[start : start + OBSERVE_BATCH])
            t = val.logits[start : start + OBSERVE_BATCH]
            agree += int((s.argmax(1) == val.top1[start : start + OBSERVE_BATCH]).sum())
            kl += float(_kl(s, t)) * len(s)
    gm.train(was_training)
    _set_mode(quants, "frozen" if mode == "observe" else mode)
    return agree / max(1, len(val.x)), -kl / max(1, len(val.x))


def _kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Distillation loss: KL of the temperature-softened logits, scaled by T^2."""
    kl = nn.functional.kl_div(nn.functional.log_softmax(s / TEMPERATURE, 1),
                              nn.functional.softmax(t / TEMPERATURE, 1), reduction="batchmean")  # fmt: skip
    return kl * TEMPERATURE**2


def _train(gm: nn.Module, teacher: nn.Module, quants: list[ActQuant], data: tuple, calib: Calibration,
           val: _Val | None, *, steps: int, lr: float, batch: int, seed: int) -> tuple[float, list, int]:  # fmt: skip
    """Distil for `steps`; with `val`, score the student every EVAL_EVERY steps (step 0, the post-training
    quantized start, included) and end on the best-scoring weights. Returns the last loss, the scores and the
    step whose weights it ends on."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(0.0)
    _set_mode(quants, "frozen" if calib.ranges else "train")
    scores: list[dict] = []
    best: tuple[tuple[float, float], dict, int] | None = None
    every = max(1, min(EVAL_EVERY, steps // 4))
    for step in range(steps + 1):
        if val is not None and (step % every == 0 or step == steps):
            score = _score(gm, quants, calib, val)
            scores.append({"step": step, "agreement": score[0], "kl": round(-score[1], 6)})
            if best is None or score > best[0]:
                best = (score, copy.deepcopy(gm.state_dict()), step)
        if step == steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        if step == int(FREEZE_AT * steps):
            _observe(gm, quants, calib)
            _set_mode(quants, "frozen")
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen)
        with torch.no_grad():
            t = teacher(x[idx])
        s = gm(x[idx])
        loss = _kl(s, t)
        if y is not None and CE_WEIGHT:
            loss = (1 - CE_WEIGHT) * loss + CE_WEIGHT * nn.functional.cross_entropy(s, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if best is None:
        return float(loss.detach()), scores, steps
    gm.load_state_dict(best[1])
    return float(loss.detach()), scores, best[2]


def qat_finetune(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, calib: torch.Tensor, *,
    val: torch.Tensor | None = None, steps: int = 300, lr: float = LR, batch: int = 64, seed: int = 0,
    ranges: str | None = None,
) -> tuple[nn.Module, QatRecord]:  # fmt: skip
    """A QAT-fine-tuned copy of `model` (the teacher) ready to export, its weights on TFLite's int8 grid.
    `x`, `y`: normalized training images (NCHW) and labels (or None); `calib`: the calibration images, all of
    the ones the converter will calibrate the exported model on (a subset would freeze narrower ranges than
    the converter's min/max over all of them, and the model would ship with ranges it never trained with);
    `val`: held-out images (never test images, and best not the ones the result is then judged on) to keep
    the best checkpoint on (None: the last one); `ranges`: the range method the exported model will be
    quantized with (tfconv "ranges"; None: min/max): the student then trains against the ranges that method
    picks on `calib` from the start (recalibrated at every score and at FREEZE_AT; no moving average, which
    would pull them back toward min/max)."""
    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).eval()
    gm = _student(model)
    quants = insert_act_quant(gm)
    # "measured" is the true min/max, what _observe measures anyway (it only tells tfconv to write them)
    calibration = Calibration(calib, None if ranges == "measured" else ranges)
    _observe(gm, quants, calibration)  # ranges start at the calibration's
    for mod in list(gm.modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(mod, "weight", _WeightQuant())
    scored = None
    if val is not None:
        from pipeline.verification import _torch_logits

        logits = torch.from_numpy(_torch_logits(teacher, val))
        scored = _Val(val, logits.argmax(1), logits)
    gm.train()
    final, scores, kept = _train(gm, teacher, quants, (x, y), calibration, scored, steps=steps, lr=lr, batch=batch,
                                 seed=seed)  # fmt: skip
    for mod in list(gm.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    gm = _without(gm.eval())
    log.info("QAT: %d steps, %d activation points, loss %.4f, kept step %d", steps, len(quants), final, kept)
    held = 0 if val is None else len(val)
    return gm, QatRecord(steps, len(quants), final, len(calib), kept, tuple(scores), held, ranges or "minmax")
