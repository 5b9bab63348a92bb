"""Stage `sensitivity`: each prunable group pruned alone to each level, BatchNorm re-estimated, validation loss
and accuracy measured (pipeline/pruning/sensitivity.py). Only for `pruning.allocation: sensitivity`; the prune
stage spends its cut where these curves say it costs least: for a MAC or parameter target, the accuracy
search, and the latency table's allocation (loss per millisecond saved)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import Context, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.train.ddp import register

BN_IMAGES = 200  # training images BatchNorm statistics are re-estimated on


@dataclass(frozen=True)
class SensitivityResult:
    folder: Path
    base: Mapping[str, Any]  # the unpruned model: validation loss, accuracy, MACs, params
    groups: Mapping[str, Any]  # group root -> {"channels", "levels": [{keep, loss, accuracy, macs, params}]}
    val_images: int

    def curves(self) -> dict[str, Any]:
        return {"base": dict(self.base), "groups": dict(self.groups), "val_images": self.val_images}

    def channels(self) -> dict[str, int]:
        """Each prunable group's channel count in the unpruned model."""
        return {g: int(e["channels"]) for g, e in self.groups.items()}

    def to_json(self) -> dict[str, Any]:
        return self.curves()

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> SensitivityResult:
        return cls(folder, figures["base"], figures["groups"], figures["val_images"])


def decision_batches(ctx: Context) -> tuple[list[Any], list[Any]]:
    """(validation batches, BatchNorm batches from train) for the pruning decisions; never the test split."""
    p = ctx.target.pruning
    val = ctx.spec.batches(ctx.data.val, limit=p.sensitivity.images, seed=ctx.req.seed)
    bn = ctx.spec.batches(ctx.data.train_sample(BN_IMAGES, seed=ctx.req.seed + 1))  # decodes only these
    return val, bn


class SensitivityStage(Stage[SensitivityResult]):
    name = "sensitivity"
    result = SensitivityResult

    def applies(self, ctx: Context) -> bool:
        p = ctx.target.pruning
        return p.enabled and p.allocation == "sensitivity"

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"model": ctx.get(BASELINE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        p = ctx.target.pruning
        return {"importance": p.importance, "multiple": p.channel_multiple, "max_ratio": p.max_layer_ratio,
                "keep_layers": p.keep_layers, "sensitivity": p.sensitivity.model_dump(mode="json"),
                "recalibrate_bn": p.recalibrate_bn, "val": ctx.data.describe()["val"], "bn_images": BN_IMAGES,
                "seed": ctx.req.seed}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> SensitivityResult:
        from pipeline.artifacts import write_json_atomic
        from pipeline.pruning.calibrate import decisions_on
        from pipeline.train.ddp import checkpoint_bytes, current_session

        val, bn = decision_batches(ctx)
        model = ctx.load(ctx.get(BASELINE).model_path)
        session = current_session()
        if session is not None:  # every rank measures its share (`_serve` below)
            session.send({"kind": "sensitivity", "module": __name__, "model": checkpoint_bytes(model),
                          "val": _digest(val, bn), "pruning": ctx.target.pruning})  # fmt: skip
        with decisions_on(ctx.decision_device()):
            sens = _measure(model, ctx, ctx.target.pruning, val, bn, session)
        write_json_atomic(out / "sensitivity.json", sens)
        return SensitivityResult(out, sens["base"], sens["groups"], sens["val_images"])


def _measure(model: Any, ctx: Context, cfg: Any, val: list[Any], bn: list[Any], session: Any) -> dict[str, Any]:
    """The sensitivity curves, alone or, under torchrun, this rank's share gathered with the others'."""
    from pipeline.pruning.sensitivity import measure_sensitivity, merge_parts
    from pipeline.train.ddp import gather

    if session is None:
        return measure_sensitivity(model, ctx.example(), cfg, val=val, bn=bn)
    w = session.world
    mine = measure_sensitivity(model, ctx.example(), cfg, val=val, bn=bn, part=(w.rank, w.size))
    return merge_parts(gather(session, mine))


def _digest(val: list[Any], bn: list[Any]) -> str:
    """A fingerprint of the decision batches (every rank must measure on the same images)."""
    import hashlib

    h = hashlib.sha256()
    for x, y in (*val, *bn):
        h.update(x.numpy().tobytes())
        h.update(b"" if y is None else y.numpy().tobytes())
    return h.hexdigest()[:16]


def _serve(job: dict[str, Any], req: Any, session: Any) -> None:
    """A rank other than 0: its share of the sensitivity measurements, sent back to everyone."""
    from pipeline.pruning.calibrate import decisions_on
    from pipeline.train.ddp import DistributedError, load_bytes

    ctx = Context(req, Path(req.spec.default_checkpoint or "."))
    val, bn = decision_batches(ctx)
    if _digest(val, bn) != job["val"]:
        raise DistributedError(f"rank {session.world.rank}: its validation images are not rank 0's; give every "
                               "node the same --data and --seed")  # fmt: skip
    with decisions_on(ctx.decision_device()):
        _measure(load_bytes(job["model"], req).eval(), ctx, job["pruning"], val, bn, session)


register("sensitivity", _serve)
SENSITIVITY = SensitivityStage()
