"""Stage `prune`: structured channel pruning (pipeline/pruning) to the profile's MAC/parameter target, with
channels allocated from the measured sensitivity, uniformly, or by Torch-Pruning's global ranking; or to its
latency budget through the measured table. BatchNorm statistics are then re-estimated on training images and
the validation accuracy right after pruning is recorded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import MODEL_FILE, Context, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.stages.convert_baseline import CONVERT_BASELINE
from pipeline.stages.latency_table import LATENCY_TABLE
from pipeline.stages.sensitivity import SENSITIVITY, decision_batches


@dataclass(frozen=True)
class PruneOutcome:
    folder: Path
    enabled: bool
    pruning: Mapping[str, Any] | None = None  # PruneResult.figures(): metric, keep_target/achieved, layers...
    latency: Mapping[str, Any] | None = None  # latency-aware pruning: budget, prediction, plan
    accuracy_before_finetune: float | None = None  # on the validation split, BatchNorm re-estimated
    allocation: Mapping[str, Any] | None = None  # how the channels were shared out, and why

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    def figure(self, key: str) -> Any:
        return (self.pruning or {}).get(key)

    @property
    def layers(self) -> list[Mapping[str, Any]]:
        return list(self.figure("layers") or [])

    def to_json(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        extra = {"latency": dict(self.latency)} if self.latency is not None else {}
        return {"enabled": True, **dict(self.pruning or {}), **extra, "allocation": dict(self.allocation or {}),
                "accuracy_before_finetune": self.accuracy_before_finetune}  # fmt: skip

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> PruneOutcome:
        if not figures.get("enabled"):
            return cls(folder, False)
        own = ("enabled", "latency", "accuracy_before_finetune", "allocation")
        rest = {k: v for k, v in figures.items() if k not in own}
        return cls(folder, True, rest, figures.get("latency"), figures.get("accuracy_before_finetune"),
                   figures.get("allocation"))  # fmt: skip


class PruneStage(Stage[PruneOutcome]):
    name = "prune"
    result = PruneOutcome
    version = 6  # the uniform guard (pruning.compare_uniform)

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        out = {"model": ctx.get(BASELINE).model_path}
        if ctx.has(LATENCY_TABLE):
            base_tflite = ctx.get(CONVERT_BASELINE).tflite(ctx.target.quantize.plan_precision)
            out |= {"table": ctx.get(LATENCY_TABLE).table_path, "baseline": base_tflite}
        if ctx.has(SENSITIVITY):
            out |= {"sensitivity": ctx.get(SENSITIVITY).folder / "sensitivity.json"}
        return out

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t, data = ctx.target, ctx.data.describe()
        trains = t.pruning.target.metric == "accuracy" or t.pruning.steps > 1  # trials / steps distil
        extra = {"finetune": t.finetune.model_dump(mode="json"), "train": data["train"]} if trains else {}
        return {**t.pruning.model_dump(mode="json"), "val": data["val"], "seed": ctx.req.seed,
                "budget_ms": t.budgets.latency_ms, "max_accuracy_drop": t.budgets.max_accuracy_drop,
                **extra}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> PruneOutcome:
        from pipeline.pruning.calibrate import decisions_on

        with decisions_on(ctx.decision_device()):  # every evaluation on the fine-tuning device
            return self._run(ctx, out)

    def _run(self, ctx: Context, out: Path) -> PruneOutcome:
        from pipeline.pruning.calibrate import evaluate
        from pipeline.pruning.reconstruct import recover, recovery_name

        model = ctx.load(ctx.get(BASELINE).model_path)
        p = ctx.target.pruning
        if not p.enabled:
            ctx.save(model, out / MODEL_FILE, {"stage": "prune", "pruned": False})
            return PruneOutcome(out, False)
        val, bn = decision_batches(ctx)
        latency = None
        if p.target.metric == "accuracy":
            result, allocation = _search(ctx, model, val, bn)  # trials are recovered (refit or BatchNorm)
        else:
            result, latency, allocation = self._prune(ctx, model, val)
            if p.steps > 1:
                result, allocation = _iterate(ctx, model, val, bn, allocation)
            else:
                allocation["recovery"] = recover(model, result.model, p, ctx.example(), bn)
                if allocation["method"] == "sensitivity" and p.compare_uniform:
                    result, allocation["uniform_guard"] = _guard(ctx, model, result, val, bn)
        allocation.setdefault("recovery", {"recovery": recovery_name(p)})  # search, steps: each trial/step
        _, acc = evaluate(result.model, val, reference=model if val and val[0][1] is None else None)
        ctx.save(result.model, out / MODEL_FILE, {"stage": "prune", **result.figures()})
        return PruneOutcome(out, True, result.figures(), latency, acc, allocation)

    @staticmethod
    def _prune(ctx: Context, model: Any, val: list[Any]) -> tuple[Any, Mapping[str, Any] | None, dict[str, Any]]:
        t, p = ctx.target, ctx.target.pruning
        if ctx.has(SENSITIVITY) and not ctx.has(LATENCY_TABLE):
            from pipeline.pruning.sensitivity import allocate

            _, bn = decision_batches(ctx)
            result, fig = allocate(model, ctx.example(), p, ctx.get(SENSITIVITY).curves(), val=val, bn=bn)
            return result, None, {"method": "sensitivity", **fig}
        if not ctx.has(LATENCY_TABLE):
            from pipeline.pruning.channels import prune_to_target

            method = "global" if p.global_pruning else "uniform"
            return prune_to_target(model, ctx.example(), p, batches=val), None, {"method": method}
        from pipeline.pruning.latency import prune_to_latency

        table, measured = _table(ctx)
        sens = ctx.get(SENSITIVITY).curves() if ctx.has(SENSITIVITY) else None
        lp = prune_to_latency(model, ctx.example(), table, p, budget_ms=t.budgets.latency_ms,
                              measured_full_ms=measured, sensitivity=sens)  # fmt: skip
        method = "latency table, measured sensitivity" if sens is not None else "latency table"
        return lp.result, lp.figures, {"method": method}


def _guard(ctx: Context, model: Any, result: Any, val: list[Any], bn: list[Any]) -> tuple[Any, dict[str, Any]]:
    """The sensitivity allocation's model, or the uniform cut of its size where that scores better on the
    validation split (pipeline/pruning/guard.py), described against the unpruned model."""
    from pipeline.pruning.channels import describe
    from pipeline.pruning.guard import uniform_alternative

    kept, record = uniform_alternative(model, result.model, ctx.target.pruning, ctx.example(), val=val, bn=bn,
                                       base=(result.macs_before, result.params_before))  # fmt: skip
    if kept is result.model:
        return result, record
    return describe(model, kept, ctx.example(), metric=result.metric, keep_target=result.keep_target,
                    base=(result.macs_before, result.params_before)), record  # fmt: skip


def _distiller(ctx: Context, teacher: Any) -> Any:
    """(student, steps) -> the student distilled from `teacher` for that many steps (trials, iterative steps);
    under torchrun every rank trains its share (a `finetune` job, pipeline/train/ddp.py)."""
    import math

    from pipeline.train.ddp import checkpoint_bytes, collective_error, current_session, make_job
    from pipeline.train.distill import finetune_kd

    cfg, train = ctx.target.finetune, ctx.data.train_stream  # streamed: nothing decoded up front
    n = min(len(train), cfg.max_train_images or len(train))
    session, teacher_blob = current_session(), None

    def distill(student: Any, steps: int) -> Any:
        nonlocal teacher_blob
        short = cfg.model_copy(update={"epochs": 1.0 / max(1, math.ceil(n / cfg.batch_size)), "min_steps": steps,
                                       "early_stopping": False})  # fmt: skip
        if session is None:
            return finetune_kd(student, teacher, ctx.spec, train, short, seed=ctx.req.seed).model
        teacher_blob = teacher_blob or checkpoint_bytes(teacher)
        session.send(make_job(checkpoint_bytes(student), teacher_blob, short, seed=ctx.req.seed,
                              data=ctx.data.fingerprints()["train"]))  # fmt: skip
        try:
            return finetune_kd(student, teacher, ctx.spec, train, short, seed=ctx.req.seed, world=session.world).model
        except RuntimeError as exc:  # torch.distributed's errors are RuntimeErrors
            raise collective_error(exc, session.world) from exc

    return distill


def _search(ctx: Context, model: Any, val: list[Any], bn: list[Any]) -> tuple[Any, dict[str, Any]]:
    """`metric: accuracy`: the accuracy search (pipeline/pruning/search.py) over the share of MACs kept."""
    import copy

    from pipeline.pruning.calibrate import evaluate
    from pipeline.pruning.schedule import Planner
    from pipeline.pruning.search import search_keep

    t, p = ctx.target, ctx.target.pruning
    sens = ctx.get(SENSITIVITY).curves() if ctx.has(SENSITIVITY) else None
    planner = Planner(model, ctx.example(), p, val=val, bn=bn, sens=sens)
    scored = ctx.spec.batches(ctx.data.val, limit=p.search.images, seed=ctx.req.seed)
    reference = model if scored and scored[0][1] is None else None
    distill = _distiller(ctx, model)

    def score(pruned: Any) -> float:
        tuned = distill(pruned, p.search.finetune_steps) if p.search.finetune_steps else pruned
        return evaluate(tuned, scored, reference=reference)[1]

    base_acc = evaluate(model, scored, reference=reference)[1]
    predict = _predictor(ctx, model) if ctx.has(LATENCY_TABLE) else None
    found = search_keep(planner.at, score, base_accuracy=base_acc, max_drop=t.budgets.max_accuracy_drop, cfg=p.search,
                        predict=predict)  # fmt: skip
    result = found.result or planner.result(copy.deepcopy(model), 1.0)
    method = "sensitivity" if sens is not None else ("global" if p.global_pruning else "uniform")
    extra = {"uniform_guard_trials": planner.guards} if planner.guards else {}
    return result, {"method": method, "search": found.figures(), "val_images_scored": sum(len(b[0]) for b in scored),
                    **extra}  # fmt: skip


def _table(ctx: Context) -> tuple[Any, float]:
    """The target's latency table, and the unpruned model's p50 on the table's own device (timed on this host
    when the table was measured here without one)."""
    from pipeline.bench import bench_settings, profile_local
    from pipeline.latency.table import LatencyTable

    t = ctx.target
    table = LatencyTable.load(ctx.get(LATENCY_TABLE).table_path)
    measured = table.measured_full_ms
    if measured is None:
        base_tflite = ctx.get(CONVERT_BASELINE).tflite(t.quantize.plan_precision)
        measured = profile_local(base_tflite, bench_settings(t, on_host=True))["latency_ms"]["p50"]
    return table, measured


def _predictor(ctx: Context, model: Any) -> Any:
    """pruned model -> its latency predicted by the target's table (`search.rank: latency`)."""
    from pipeline.latency.layers import prunable_layers
    from pipeline.pruning.channels import ignored_layers, prunable_groups

    p, ex = ctx.target.pruning, ctx.example()
    table, measured = _table(ctx)
    layers = prunable_layers(model, ex, ignored=ignored_layers(model, ex, p.keep_layers))
    groups = prunable_groups(model, ex, keep_layers=p.keep_layers)
    calibrated = table.calibrated(layers, groups, measured)
    return lambda pruned: calibrated.predict(layers, prunable_groups(pruned, ex, keep_layers=p.keep_layers))


def _iterate(ctx: Context, model: Any, val: list[Any], bn: list[Any], allocation: dict[str, Any]) -> tuple[Any, dict]:
    """`pruning.steps: N`: the one-shot allocation's target reached in N prune -> BN -> distil rounds."""
    from pipeline.pruning.schedule import Planner, prune_iteratively

    p = ctx.target.pruning
    sens = ctx.get(SENSITIVITY).curves() if ctx.has(SENSITIVITY) else None
    planner = Planner(model, ctx.example(), p, val=val, bn=bn, sens=sens)
    final = allocation.get("plan") if sens is not None else None
    if sens is not None:
        planner.path = [(1.0, dict(ctx.get(SENSITIVITY).channels()))] + [
            (s["achieved"], s["plan"]) for s in allocation.get("steps", [])]  # fmt: skip
    assert p.target.keep is not None
    result, rows = prune_iteratively(planner, p.target.keep, p.steps, distill=_distiller(ctx, model),
                                     step_finetune=p.step_finetune_steps, final_plan=final)  # fmt: skip
    return result, {**allocation, "iterative": rows}


PRUNE = PruneStage()
