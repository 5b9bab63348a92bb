"""Least-squares refit of the layers that read pruned channels (pipeline/pruning/reconstruct.py), and the
record of which output channels each pruned layer kept (pipeline/pruning/channels.kept_outputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.pruning.channels import kept_outputs, prunable_groups, prune_to_plan
from pipeline.pruning.reconstruct import forward_order, reconstruct
from tests.tiny_models import tiny_resnet


class Planted(nn.Module):
    """conv1 (8 channels) -> ReLU -> conv2 (1x1) -> ReLU -> pool -> fc. conv1's channels 4-7 are 0.5 x its
    channels 0-3 (after the ReLU still exactly so): whichever channel pruning removes, its twin can stand in for
    it, so a refit of conv2 can undo the loss exactly, where plain pruning changes conv2's output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            w = torch.randn(4, 1, 3, 3, generator=g) + 0.5
            self.conv1.weight.copy_(torch.cat([w, 0.5 * w]))
            self.conv2.weight.copy_(torch.randn(6, 8, 1, 1, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


@torch.no_grad()
def _conv2_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    ya, yb = a.conv2(torch.relu(a.conv1(x))), b.conv2(torch.relu(b.conv1(x)))
    return float((ya - yb).norm() / ya.norm())


def test_refit_undoes_the_loss_of_a_channel_that_its_neighbours_can_stand_in_for() -> None:
    torch.manual_seed(0)
    base, ex = Planted().eval(), torch.zeros(1, 1, 12, 12)
    pruned = prune_to_plan(base, ex, {"conv1": 7})
    assert len(kept_outputs(pruned)["conv1"]) == 7 == pruned.conv1.out_channels
    fit = [(torch.randn(16, 1, 12, 12), None) for _ in range(2)]
    held_out = torch.randn(16, 1, 12, 12)
    before = _conv2_error(base, pruned, held_out)
    errors = reconstruct(base, pruned, kept_outputs(pruned), ex, fit, ridge=1e-9)
    assert list(errors) == ["conv2"]  # the only layer that reads pruned channels (fc's inputs were not pruned)
    assert before > 0.05
    assert errors["conv2"] < 1e-4  # on the images it was fitted on
    assert _conv2_error(base, pruned, held_out) < 1e-4  # and on others
    with torch.no_grad():
        assert torch.allclose(pruned(held_out), base(held_out), atol=1e-4)


def test_kept_channels_compose_over_pruning_steps_and_refit_helps_a_residual_net() -> None:
    """Two pruning steps: the record still points at the unpruned layer's channels (the pruned weights are
    exactly those rows); refitting brings the logits closer to the unpruned model's on images it never saw."""
    torch.manual_seed(0)
    base, ex = tiny_resnet(0).eval(), torch.zeros(1, 1, 28, 28)
    groups = prunable_groups(base, ex)
    first = prune_to_plan(base, ex, {g: max(1, n * 3 // 4) for g, n in groups.items()})
    second = prune_to_plan(first, ex, {g: max(1, n // 2) for g, n in groups.items() if g in groups})
    kept = kept_outputs(second)
    assert kept and kept_outputs(base) == {}
    stem = forward_order(base, ex)[0]  # its inputs are the image: its rows are the unpruned rows, exactly
    assert torch.equal(second.get_submodule(stem).weight, base.get_submodule(stem).weight[kept[stem]])
    for name, idx in kept.items():
        layer = second.get_submodule(name)
        width = layer.num_features if isinstance(layer, nn.BatchNorm2d) else layer.out_channels
        assert len(idx) == width and len(set(idx.tolist())) == len(idx)
    for bn in ("stem.1", "body.1"):
        second.get_submodule(bn).running_mean.fill_(7.0)  # as a re-estimate on other images would leave them
    fit = [(torch.randn(32, 1, 28, 28), None) for _ in range(4)]
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        want = base(x)
        before = float((second(x) - want).norm())
        errors = reconstruct(base, second, kept, ex, fit)
        after = float((second(x) - want).norm())
    assert errors and all(0 <= e < 1 for e in errors.values())
    assert after < 0.8 * before
    for bn in ("stem.1", "body.1"):  # the unpruned statistics, for the channels kept
        assert torch.equal(second.get_submodule(bn).running_mean, base.get_submodule(bn).running_mean[kept[bn]])


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Distinct BatchNorm parameters and statistics per channel, so that a wrong channel map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["silu_hswish", "branch_concat", "grouped_dw5x5", "wide_residual", "mobilenetv2_fm"])
def test_the_channel_record_is_right_on_branches_groups_and_inverted_residuals(name: str) -> None:
    """Concatenated branches, grouped and depthwise 5x5 convolutions, a residual add, inverted residuals: every
    BatchNorm's affine parameters after pruning are exactly the unpruned ones at the recorded channels, and
    the refit (k x k convolutions through their patches) gives finite weights and an output the model runs."""
    from bench.quantization import HOSTILE
    from pipeline.models.zoo import get_model_spec

    torch.manual_seed(0)
    if name in HOSTILE:
        base, ex = _randomized(HOSTILE[name](), 1), torch.randn(2, 1, 28, 28)
    else:
        spec = get_model_spec(name)
        base, ex = _randomized(spec.build(), 1), torch.randn(2, *spec.input_shape)
    groups = prunable_groups(base, ex[:1])
    pruned = prune_to_plan(base, ex[:1], {g: max(4, n // 2 // 4 * 4) for g, n in groups.items()})
    kept = kept_outputs(pruned)
    bns = [n for n, m in pruned.named_modules() if isinstance(m, nn.BatchNorm2d) and n in kept]
    assert bns, "nothing was pruned"
    for bn in bns:
        assert torch.equal(pruned.get_submodule(bn).weight, base.get_submodule(bn).weight[kept[bn]]), bn
        assert torch.equal(pruned.get_submodule(bn).bias, base.get_submodule(bn).bias[kept[bn]]), bn
    errors = reconstruct(base, pruned, kept, ex[:1], [(torch.randn(8, *ex.shape[1:]), None)])
    assert errors and all(e == e and e < float("inf") for e in errors.values())
    with torch.no_grad():
        assert torch.isfinite(pruned(ex)).all()
