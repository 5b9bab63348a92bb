"""Least-squares refit of the layers that read pruned channels (pipeline/pruning/reconstruct.py), and the
record of which output channels each pruned layer kept (pipeline/pruning/channels.kept_outputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.pruning.channels import kept_outputs, prunable_groups, prune_to_plan
from pipeline.pruning.reconstruct import forward_order, reconstruct
from tests.tiny_models import TinyResidualCNN, tiny_resnet


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


@pytest.mark.parametrize(
    "geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (2, 2, 0, 1), (1, 2, 0, 1)]
)
def test_patches_at_sampled_positions_are_the_rows_of_a_full_unfold(geometry: tuple[int, int, int, int]) -> None:
    """kernel, stride, padding, dilation: gathering only the sampled positions gives the same rows (same order,
    same feature layout) as unfolding the whole batch and sampling after."""
    from pipeline.pruning.reconstruct import _features

    k, stride, pad, dil = geometry
    layer = nn.Conv2d(5, 3, k, stride=stride, padding=pad, dilation=dil, bias=True)
    x = torch.randn(3, 5, 11, 9)
    patches = torch.nn.functional.unfold(x, k, dilation=dil, padding=pad, stride=stride)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    full = torch.cat([rows, torch.ones(len(rows), 1)], 1)
    assert torch.equal(_features(layer, x), full)
    pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(1))[: len(full) // 3]
    assert torch.equal(_features(layer, x, pick), full[pick])


class Untraceable(TinyResidualCNN):
    """Data-dependent control flow: torch.fx cannot trace it, so the refit captures layer by layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if float(x.sum()) > -1e30 else x


def _layer_by_layer(base: nn.Module, pruned: nn.Module, kept: dict, ex: torch.Tensor, fit: list) -> dict:
    """The refit the slow way: every layer's input and target captured by its own forward passes."""
    from pipeline.pruning.reconstruct import refit_layer, refittable, restore_bn_stats

    restore_bn_stats(base, pruned, kept)
    modules = dict(base.named_modules())
    todo = [n for n in forward_order(pruned, ex) if refittable(modules[n], pruned.get_submodule(n))]
    return {n: round(refit_layer(base, pruned, n, kept.get(n), fit), 6) for n in todo}


@pytest.mark.parametrize("case", ["lockstep", "too large to hold", "untraceable"])
def test_the_one_pass_refit_gives_the_layer_by_layer_weights_and_falls_back_where_it_cannot_run(
    case: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The refit runs the pruned model once, all batches in lockstep (pipeline/pruning/lockstep.py), where
    capturing each layer's input took a forward pass per layer: the weights are bit-identical to that slow way
    (28x28 batches of 32 have more positions than are sampled, so the sampled rows must line up too). Where the
    activations would not fit, or torch.fx cannot trace the model, it falls back to the slow way and says so."""
    import copy
    import logging

    from pipeline.pruning import reconstruct as rc

    torch.manual_seed(0)
    base = _randomized(Untraceable() if case == "untraceable" else TinyResidualCNN(), 2)
    ex = torch.zeros(1, 1, 28, 28)
    groups = prunable_groups(base, ex)
    pruned = prune_to_plan(base, ex, {g: n // 2 for g, n in groups.items()})
    kept = kept_outputs(pruned)
    fit = [(torch.randn(32, 1, 28, 28), None) for _ in range(3)]
    if case == "too large to hold":
        monkeypatch.setattr(rc, "LOCKSTEP_BYTES", 1)
    slow = copy.deepcopy(pruned)
    with caplog.at_level(logging.INFO, logger=rc.__name__):
        errors = reconstruct(base, pruned, kept, ex, fit)
    want = _layer_by_layer(base, slow, kept, ex, fit)
    assert list(errors) == list(want) and len(errors) >= 3 and errors == want
    for (name, a), b in zip(pruned.state_dict().items(), slow.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fell_back = "refit layer by layer" in caplog.text
    assert fell_back == (case != "lockstep"), caplog.text
    if case == "too large to hold":
        assert "GiB of activations at once" in caplog.text
    if case == "untraceable":
        assert "torch.fx cannot trace the model" in caplog.text
