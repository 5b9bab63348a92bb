"""The uniform guard (`pruning.compare_uniform`): a sensitivity allocation ships only where it beats a uniform
cut of the same size on the validation split; both are recovered the same way (the refit) and recorded."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.pruning.calibrate import evaluate
from pipeline.pruning.channels import count_macs_params, prunable_groups, prune_to_plan
from pipeline.pruning.guard import uniform_alternative
from pipeline.pruning.reconstruct import recover
from pipeline.pruning.schedule import Planner
from pipeline.pruning.sensitivity import measure_sensitivity
from tests.conftest import needs_fmnist
from tests.tiny_models import SPEC, prune_cfg, read_fashion_mnist, train_tiny

EXAMPLE = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def trained():
    train = read_fashion_mnist("train", 3000)
    model = train_tiny(train.subset(2000, seed=0), steps=150).eval()
    val = SPEC.batches(train.subset(400, seed=9), batch_size=200)
    bn = SPEC.batches(train.subset(256, seed=1), batch_size=128)
    return model, val, bn


def _macs(model) -> int:
    return count_macs_params(model, EXAMPLE)[0]


@needs_fmnist
def test_a_bad_allocation_loses_to_the_uniform_cut_of_its_size(trained) -> None:
    model, val, bn = trained
    cfg = prune_cfg(keep=0.7, channel_multiple=4)
    # a planted bad allocation: the whole cut taken from the last conv, the classifier left 4 features
    bad = prune_to_plan(model, EXAMPLE, {"down.0": 4}, groups=prunable_groups(model, EXAMPLE))
    recover(model, bad, cfg, EXAMPLE, bn)
    kept, record = uniform_alternative(model, bad, cfg, EXAMPLE, val=val, bn=bn)
    assert record["chosen"] == "uniform" and kept is not bad
    s, u = record["sensitivity"], record["uniform"]
    assert u["val_accuracy"] > s["val_accuracy"]
    assert _macs(kept) <= _macs(bad) and u["keep"] <= s["keep"]  # never bigger than what it replaces
    assert evaluate(kept, val)[1] == pytest.approx(u["val_accuracy"], abs=1e-6)  # the recorded score is its own


def _with_dead_channels(model: torch.nn.Module, extra: int = 16) -> torch.nn.Module:
    """`model` with `extra` more channels in its residual block's first conv, all dead: zero weights in and
    out and a zero BatchNorm scale and shift before the ReLU, so the function is exactly the same."""
    wide = copy.deepcopy(model)
    conv, bn, conv2 = model.block[0], model.block[1], model.block[3]
    n = conv.out_channels
    c1 = torch.nn.Conv2d(conv.in_channels, n + extra, 3, padding=1, bias=False)
    b1 = torch.nn.BatchNorm2d(n + extra)
    c2 = torch.nn.Conv2d(n + extra, conv2.out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        c1.weight.zero_()
        c1.weight[:n] = conv.weight
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(b1, name).copy_(torch.cat([getattr(bn, name), torch.zeros(extra)]))
        b1.running_var[n:] = 1
        c2.weight.zero_()
        c2.weight[:, :n] = conv2.weight
    wide.block[0], wide.block[1], wide.block[3] = c1, b1, c2
    return wide.eval()


@needs_fmnist
def test_a_good_allocation_is_kept(trained) -> None:
    """Dead channels cost nothing to remove: an allocation that takes the cut there keeps the model's function
    exactly, which no uniform cut of that size does."""
    model, val, bn = trained
    wide = _with_dead_channels(model)
    assert evaluate(wide, val)[1] == pytest.approx(evaluate(model, val)[1], abs=1e-6)
    cfg = prune_cfg(keep=0.5, channel_multiple=4)
    good = prune_to_plan(wide, EXAMPLE, {"block.0": 16}, groups=prunable_groups(wide, EXAMPLE))
    recover(wide, good, cfg, EXAMPLE, bn)
    assert _macs(good) < 0.7 * _macs(wide)
    kept, record = uniform_alternative(wide, good, cfg, EXAMPLE, val=val, bn=bn)
    assert record["chosen"] == "sensitivity" and kept is good, record
    assert record["sensitivity"]["val_accuracy"] == pytest.approx(evaluate(model, val)[1], abs=1e-6)
    assert record["uniform"]["val_loss"] > record["sensitivity"]["val_loss"]


@needs_fmnist
def test_the_planner_guards_each_prune_from_the_original_and_only_when_asked(trained) -> None:
    model, val, bn = trained
    cfg = prune_cfg(keep=0.5, channel_multiple=4).model_copy(update={"compare_uniform": True})
    sens = measure_sensitivity(model, EXAMPLE, cfg, val=val, bn=bn)
    planner = Planner(model, EXAMPLE, cfg, val=val, bn=bn, sens=sens)
    result = planner.at(0.5)
    (record,) = planner.guards
    best = max(record["sensitivity"]["val_accuracy"], record["uniform"]["val_accuracy"])
    assert evaluate(result.model, val)[1] == pytest.approx(best, abs=1e-6)
    assert result.keep_achieved <= 0.5 * 1.02
    planner.prune(copy.deepcopy(model), 0.4)  # iterative steps prune a copy, then its descendants: not guarded
    assert len(planner.guards) == 1
    off = Planner(model, EXAMPLE, cfg.model_copy(update={"compare_uniform": False}), val=val, bn=bn, sens=sens)
    off.at(0.5)
    assert off.guards == []


@needs_fmnist
def test_an_allocation_smaller_than_any_uniform_cut_is_kept_and_the_report_says_why(trained) -> None:
    from pipeline.report.markdown import _allocation

    model, val, bn = trained
    cfg = prune_cfg(keep=0.1, channel_multiple=4, max_ratio=0.5)  # a uniform cut removes at most half of a group
    groups = prunable_groups(model, EXAMPLE)
    tiny = prune_to_plan(model, EXAMPLE, dict.fromkeys(groups, 4), groups=groups)
    recover(model, tiny, cfg, EXAMPLE, bn)
    kept, record = uniform_alternative(model, tiny, cfg, EXAMPLE, val=val, bn=bn)
    assert kept is tiny and record["chosen"] == "sensitivity" and record["uniform"] is None
    assert "max_layer_ratio" in record["why"]
    assert "no uniform cut is that small" in _allocation({"allocation": "sensitivity", "uniform_guard": record})
