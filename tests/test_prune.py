"""Structured pruning through real Torch-Pruning: channels physically removed, the MAC target met."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.channels import (
    count_macs_params,
    prunable_groups,
    prune_to_plan,
    prune_to_target,
    uniform_plan,
)
from tests.tiny_models import prune_cfg

EXAMPLE = torch.zeros(1, 1, 28, 28)


@pytest.mark.parametrize(("metric", "keep"), [("macs", 0.5), ("macs", 0.3), ("params", 0.5)])
def test_reaches_the_stated_target(tiny_model: nn.Module, metric: str, keep: float) -> None:
    result = prune_to_target(tiny_model, EXAMPLE, prune_cfg(metric=metric, keep=keep, channel_multiple=4))
    macs, params = count_macs_params(result.model, EXAMPLE)
    value = macs / result.macs_before if metric == "macs" else params / result.params_before
    assert value == pytest.approx(result.keep_achieved)
    assert value <= keep
    assert value >= keep - 0.2  # the least-pruned model that meets it, not an over-pruned one
    assert macs == result.macs_after and params == result.params_after


def test_channels_are_physically_removed_and_multiples_kept(tiny_model: nn.Module) -> None:
    result = prune_to_target(tiny_model, EXAMPLE, prune_cfg(metric="macs", keep=0.5, channel_multiple=8))
    m = result.model
    assert m.stem[0].out_channels < 16 and m.stem[0].weight.shape[0] == m.stem[0].out_channels
    # coupled layers agree: BN after conv, residual branches, next layer's input
    assert m.stem[1].num_features == m.stem[0].out_channels == m.body[0].in_channels == m.short[0].in_channels
    assert m.body[3].out_channels == m.short[0].out_channels == m.head[1].in_channels
    for layer in result.layers:
        if layer.kind == "conv":
            assert layer.after % 8 == 0
    # the classifier keeps its classes
    assert m.head[-1].out_features == 10
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_importance_keeps_the_strongest_channels(tiny_model: nn.Module) -> None:
    with torch.no_grad():
        w = tiny_model.stem[0].weight
        w.mul_(0.01)
        w[3].fill_(1.0)  # one channel far stronger than the rest
        strong = w[3].clone()
    pruned = prune_to_plan(tiny_model, EXAMPLE, {"stem.0": 4})
    kept = pruned.stem[0].weight
    assert kept.shape[0] == 4
    assert any(torch.equal(kept[i], strong) for i in range(4))


def test_keep_layers_are_left_alone(tiny_model: nn.Module) -> None:
    result = prune_to_target(
        tiny_model, EXAMPLE, prune_cfg(metric="macs", keep=0.6, channel_multiple=4, keep_layers=["stem.0"])
    )
    assert result.model.stem[0].out_channels == 16
    assert "stem.0" not in prunable_groups(tiny_model, EXAMPLE, keep_layers=["stem.0"])


def test_unknown_keep_layer_suggests(tiny_model: nn.Module) -> None:
    with pytest.raises(PruningError, match=r"no layer 'stem.9'; did you mean stem\.\d"):
        prune_to_target(
            tiny_model, EXAMPLE, prune_cfg(metric="macs", keep=0.5, channel_multiple=4, keep_layers=["stem.9"])
        )


def test_unreachable_target_is_a_clear_error(tiny_model: nn.Module) -> None:
    with pytest.raises(PruningError, match=r"cannot keep only 1% of the macs"):
        prune_to_target(tiny_model, EXAMPLE, prune_cfg(metric="macs", keep=0.01, channel_multiple=8, max_ratio=0.5))


def test_uniform_plan_bounds() -> None:
    plan = uniform_plan({"a": 16, "b": 64, "c": 6}, 0.5, multiple=8, max_ratio=0.8)
    assert plan == {"a": 8, "b": 32, "c": 6}
    assert uniform_plan({"a": 64}, 0.01, multiple=8, max_ratio=0.5) == {"a": 32}


def test_keep_everything_is_identity(tiny_model: nn.Module) -> None:
    result = prune_to_target(tiny_model, EXAMPLE, prune_cfg(metric="macs", keep=1.0, channel_multiple=8))
    assert result.macs_after == result.macs_before
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(result.model(x), tiny_model(x))
