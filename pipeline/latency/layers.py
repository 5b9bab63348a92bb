"""The layers whose latency depends on pruning, their geometry, and which pruning group sets their channels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from pipeline.models.hooks import run_hooked

Kind = Literal["conv", "depthwise", "linear"]


@dataclass(frozen=True)
class Geometry:
    """What a layer's latency depends on besides its channel counts (layers that share it share measurements)."""

    kind: Kind
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: Literal["same", "valid"] = "valid"
    in_hw: tuple[int, int] = (1, 1)

    def key(self) -> str:
        k, s, hw = self.kernel, self.stride, self.in_hw
        return f"{self.kind}:k{k[0]}x{k[1]}:s{s[0]}x{s[1]}:{self.padding}:hw{hw[0]}x{hw[1]}"


@dataclass(frozen=True)
class Layer:
    name: str
    geometry: Geometry
    cin: int
    cout: int
    in_group: str | None  # the pruning group whose kept count is this layer's input channels (None: fixed)
    out_group: str | None  # ... output channels (a depthwise layer has in_group == out_group)

    def channels(self, plan: Mapping[str, int]) -> tuple[int, int]:
        cin = plan.get(self.in_group, self.cin) if self.in_group else self.cin
        cout = plan.get(self.out_group, self.cout) if self.out_group else self.cout
        return cin, cout


def _padding(m: nn.Conv2d) -> Literal["same", "valid"]:
    pad = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
    if isinstance(m.padding, str):
        return "same" if m.padding == "same" else "valid"
    return "same" if all(p == k // 2 for p, k in zip(pad, m.kernel_size, strict=True)) and any(pad) else "valid"


def _input_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=name: sizes.__setitem__(n, tuple(args[0].shape[-2:])))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    run_hooked(model, example, hooks)
    return sizes


def group_of_channels(
    model: nn.Module, example: torch.Tensor, *, ignored: Sequence[nn.Module]
) -> tuple[dict[str, str], dict[str, str]]:
    """For each conv/linear layer, the group (named by its root layer) that sets its input / output channels."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    for group in dg.get_all_groups(ignored_layers=list(ignored), root_module_types=[nn.Conv2d, nn.Linear]):
        root_dep = group[0].dep
        if not dg.is_out_channel_pruning_fn(root_dep.handler):
            continue
        root = names[root_dep.target.module]
        for dep, _ in group:
            m = dep.target.module
            if not isinstance(m, nn.Conv2d | nn.Linear):
                continue
            name = names[m]
            if dg.is_out_channel_pruning_fn(dep.handler):
                out_group[name] = root
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    in_group[name] = root
            elif dg.is_in_channel_pruning_fn(dep.handler):
                in_group[name] = root
    return in_group, out_group


def prunable_layers(
    model: nn.Module, example: torch.Tensor, *, ignored: Sequence[nn.Module] | None = None
) -> list[Layer]:
    """Every Conv2d/Linear layer with its geometry and the groups that set its channels. `ignored` layers (by
    default the output layers, as the pruner keeps them) never get an output group."""
    if ignored is None:
        from pipeline.pruning.channels import ignored_layers

        ignored = ignored_layers(model, example)
    sizes = _input_sizes(model, example)
    in_group, out_group = group_of_channels(model, example, ignored=ignored)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if m.groups > 1 and not depthwise:
                continue  # grouped convs: not modelled (their latency is left to the calibrated remainder)
            geo = Geometry("depthwise" if depthwise else "conv", tuple(m.kernel_size), tuple(m.stride),
                           _padding(m), sizes[name])  # fmt: skip
            layers.append(Layer(name, geo, m.in_channels, m.out_channels, in_group.get(name), out_group.get(name)))
        elif isinstance(m, nn.Linear):
            layers.append(Layer(name, Geometry("linear"), m.in_features, m.out_features, in_group.get(name),
                                out_group.get(name)))  # fmt: skip
    return layers
