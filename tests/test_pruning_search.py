"""Issue 13: the accuracy search (`pruning.target: {metric: accuracy}`), iterative pruning (`pruning.steps`),
`quantize.ship: auto`, and the clear errors for their bad settings.

Real Torch-Pruning, real distillation and real Fashion-MNIST on a tiny seeded residual CNN."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import TargetConfigError
from pipeline.pruning.calibrate import evaluate
from pipeline.pruning.schedule import Planner, prune_iteratively
from pipeline.pruning.search import search_keep
from pipeline.report.precision import choose_precision
from pipeline.targets import Finetune, Search, load_target
from tests.conftest import needs_fmnist
from tests.tiny_models import SPEC, prune_cfg, read_fashion_mnist, train_tiny

EXAMPLE = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def trained():
    train = read_fashion_mnist("train", 3000)
    model = train_tiny(train.subset(2000, seed=0), steps=150)
    val = SPEC.batches(read_fashion_mnist("train", 3000).subset(400, seed=9), batch_size=200)
    return model, train, val


def _distiller(teacher, train):
    from pipeline.train.distill import finetune_kd

    def distill(student, steps):
        cfg = Finetune(epochs=0.01, batch_size=64, min_steps=steps, early_stopping=False)
        return finetune_kd(student, teacher, SPEC, train, cfg, seed=0).model

    return distill


@needs_fmnist
def test_the_search_never_chooses_a_trial_over_the_budget_and_ends_near_its_edge(trained) -> None:
    model, train, val = trained
    cfg = prune_cfg(keep=0.5, channel_multiple=4)
    planner = Planner(model, EXAMPLE, cfg, val=val, bn=val, sens=None)
    distill = _distiller(model, train)
    base = evaluate(model, val)[1]

    def score(pruned):
        return evaluate(distill(pruned, 20), val)[1]

    def predict(pruned):  # a stand-in for the latency table's prediction: ms proportional to params here
        return sum(p.numel() for p in pruned.parameters()) / 1e5

    found = search_keep(planner.at, score, base_accuracy=base, max_drop=0.03,
                        cfg=Search(trials=6, min_keep=0.15, tolerance=0.01), predict=predict)  # fmt: skip
    trials = found.trials
    assert 1 <= found.figures()["trials_scored"] <= 6 and len(trials) <= 18  # keeps landing on a tried model are free
    assert (
        sum(1 for r in trials if r["keep_achieved"] is not None and "same_as" not in r)
        == found.figures()["trials_scored"]
    )
    for row in trials:  # every trial recorded, with what it measured
        assert {"keep_target", "keep_achieved", "val_accuracy", "passed", "seconds"} <= set(row)
        if row["val_accuracy"] is not None:
            assert row["passed"] == (row["val_accuracy"] >= base - 0.03 - 1e-12)
    assert trials[0]["keep_target"] == pytest.approx((0.15 + 1) / 2, abs=1e-4)  # halves [min_keep, 1] first
    assert all(r["keep_target"] >= 0.15 for r in trials)
    if found.chosen is None:
        assert not any(r["passed"] for r in trials) and found.result is None
    else:
        chosen = trials[found.chosen]
        assert chosen["passed"] and chosen["val_accuracy"] >= base - 0.03
        assert chosen["predicted_ms"] == min(r["predicted_ms"] for r in trials if r["passed"])  # ranked by it
        assert found.result is not None and found.result.keep_achieved == pytest.approx(chosen["keep_achieved"], 1e-3)
        fig = found.figures()
        assert fig["distance_to_edge"] >= 0 and fig["chosen_keep"] == chosen["keep_achieved"]


@needs_fmnist
def test_iterative_pruning_reaches_the_target_in_steps_with_batchnorm_re_estimated(trained) -> None:
    model, train, val = trained
    cfg = prune_cfg(keep=0.4, channel_multiple=4)
    planner = Planner(model, EXAMPLE, cfg, val=val, bn=val, sens=None)
    calls = []

    def distill(student, steps):
        calls.append(steps)
        return _distiller(model, train)(student, steps)

    result, rows = prune_iteratively(planner, 0.4, 3, distill=distill, step_finetune=10)
    assert [r["step"] for r in rows] == [1, 2, 3] and calls == [10, 10]  # distilled between steps, not after
    achieved = [r["keep_achieved"] for r in rows]
    assert achieved == sorted(achieved, reverse=True) and achieved[0] < 1.0
    assert result.keep_achieved <= 0.4 + 1e-9 and result.macs_before > result.macs_after
    assert all(r.after % 4 == 0 or r.after == r.before for r in result.layers)
    out = result.model(EXAMPLE)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("pruning.importance=magnitude",), "pruning -> importance: .*'taylor'.*got 'magnitude'"),
        (("pruning.steps=0",), "pruning -> steps: .*greater than or equal to 1"),
        (("pruning.target.metric=accuracy",), "remove keep"),
        (("pruning.search.trials=1",), "pruning -> search -> trials"),
        (("pruning.steps=3", "pruning.target.metric=latency", "pruning.target.keep=null"), "steps"),
        (("quantize.ship=int4",), "quantize -> ship"),
    ],
)
def test_bad_search_and_step_settings_name_the_field(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(TargetConfigError, match=message):
        load_target("host", overrides=overrides)


def test_an_accuracy_search_without_an_accuracy_budget_is_a_clear_error(tmp_path) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_text("name: mine\nhardware: {arch: x86_64, cpu: x, cores: 2, memory_mb: 1024}\n"
                       "pruning: {target: {metric: accuracy}}\n")  # fmt: skip
    with pytest.raises(TargetConfigError, match=r"mine.yaml.*budgets.max_accuracy_drop.*0.01 = one point"):
        load_target(str(profile))
    assert load_target(str(profile), overrides=("budgets.max_accuracy_drop=0.01",)).pruning.target.metric == "accuracy"
    with pytest.raises(TargetConfigError, match=r"budgets\.max_accuracy_drop"):
        load_target(str(profile), overrides=("budgets.max_accuracy_drop=0",))


def test_an_accuracy_search_with_an_explicit_budget_and_ship_auto_load() -> None:
    t = load_target("host", overrides=("pruning.target.metric=accuracy", "pruning.target.keep=null",
                                       "budgets.max_accuracy_drop=0.01", "quantize.ship=auto"))  # fmt: skip
    assert t.pruning.target.metric == "accuracy" and t.quantize.ship == "auto"
    assert t.quantize.plan_precision == t.quantize.precisions[0]
    assert t.quantize.baseline_precisions == t.quantize.precisions
    with pytest.raises(TargetConfigError, match="Edge TPU"):
        load_target("coral", overrides=("quantize.ship=auto",))


def _variant(p50: float, acc: float | None) -> dict:
    return {"latency_ms": {"p50": p50}, "accuracy": acc}


def test_ship_auto_takes_the_fastest_precision_within_the_budget() -> None:
    variants = {"fp32": _variant(0.175, 0.90), "fp16": _variant(0.18, 0.90), "int8": _variant(0.218, 0.895)}
    ship, choice = choose_precision(variants, ("fp32", "fp16", "int8"), base_acc=0.90, max_drop=0.02)
    assert ship == "fp32" and choice["chosen"] == "fp32" and len(choice["candidates"]) == 3
    variants["int8"] = _variant(0.10, 0.895)
    assert choose_precision(variants, ("fp32", "fp16", "int8"), base_acc=0.90, max_drop=0.02)[0] == "int8"
    variants["int8"] = _variant(0.10, 0.85)  # fastest, but outside the accuracy budget
    assert choose_precision(variants, ("fp32", "fp16", "int8"), base_acc=0.90, max_drop=0.02)[0] == "fp32"
    worst = {"fp32": _variant(0.2, 0.80), "int8": _variant(0.1, 0.70)}
    ship, choice = choose_precision(worst, ("fp32", "int8"), base_acc=0.90, max_drop=0.02)
    assert ship == "fp32" and "no precision" in choice["why"]  # the accuracy budget row then stops the deploy


@needs_fmnist
def test_small_batches_fine_tune_with_batchnorm_statistics_frozen(trained) -> None:
    """Below 16 images a batch, BatchNorm keeps the running statistics it came with (its scale and shift still
    learn); at 32 they move. Real distillation on Fashion-MNIST."""
    from torch import nn

    from pipeline.train.distill import finetune_kd

    model, train, _ = trained
    small = train.subset(64, seed=1)

    def stats(m):
        bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
        assert bns, "the tiny model has BatchNorm"
        return torch.cat([torch.cat([b.running_mean, b.running_var]) for b in bns])

    for batch, frozen in ((4, True), (32, False)):
        cfg = Finetune(epochs=1.0, batch_size=batch, min_steps=6, early_stopping=False, workers=0)
        tuned = finetune_kd(model, model, SPEC, small, cfg, seed=0).model
        assert torch.equal(stats(tuned), stats(model)) == frozen, batch
        weights_moved = any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), model.parameters(), strict=True))
        assert weights_moved


class _Staircase:
    """A prune whose reached keep is a staircase of the one asked for (channel multiples do this: asking
    0.35 and 0.32 both land on 0.296), with a known accuracy at each step; records what was fine-tuned."""

    def __init__(self, steps: list[float]) -> None:
        self.steps, self.scored = steps, []

    def at(self, keep: float):
        from types import SimpleNamespace

        reached = max((s for s in self.steps if s <= keep + 1e-9), default=self.steps[0])
        macs = round(reached * 10_000)
        return SimpleNamespace(model=reached, keep_achieved=reached, macs_after=macs, params_after=macs)

    def score(self, model: float) -> float:
        self.scored.append(model)
        return 0.70 + 0.2 * min(1.0, model / 0.4) ** 2  # 0.9 at keep >= 0.4, falling fast below it


def test_the_search_never_fine_tunes_one_pruned_model_twice_and_reaches_the_edge_between_stairs() -> None:
    stairs = _Staircase([0.15, 0.2964, 0.32, 0.34, 0.36, 0.38, 0.40, 0.5452, 0.7, 1.0])
    found = search_keep(stairs.at, stairs.score, base_accuracy=0.90, max_drop=0.02,
                        cfg=Search(trials=8, min_keep=0.15, tolerance=0.005))  # fmt: skip
    assert len(stairs.scored) == len(set(stairs.scored)) <= 8  # each distinct model fine-tuned once
    for row in found.trials:
        if "same_as" in row:
            twin = found.trials[row["same_as"]]
            assert (twin["macs"], twin["val_accuracy"]) == (row["macs"], row["val_accuracy"])
    chosen = found.trials[found.chosen]
    assert chosen["passed"] and 0 <= chosen["val_accuracy"] - 0.88 <= 0.005  # keep 0.38 scores 0.8805
    assert chosen["keep_achieved"] == 0.38 and found.figures()["trials_scored"] == len(stairs.scored)


def test_the_search_stops_at_its_trial_budget_when_every_trial_fails() -> None:
    stairs = _Staircase([i / 100 for i in range(15, 101)])
    found = search_keep(stairs.at, lambda m: 0.5, base_accuracy=0.90, max_drop=0.02,
                        cfg=Search(trials=4, min_keep=0.15, tolerance=0.005))  # fmt: skip
    assert found.chosen is None and found.result is None and found.figures()["trials_scored"] == 4
    assert [r["passed"] for r in found.trials] == [False] * 4
