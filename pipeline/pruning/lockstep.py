"""Run a model's graph on several batches in lockstep, node by node, with a chance to change a layer before it
runs (what the least-squares refit needs: pipeline/pruning/reconstruct.py).

Refitting layer k needs its input on every batch, computed with layers 1..k-1 already refitted. Capturing that
input by running the model from its input for each layer costs one forward pass per layer (quadratic in depth:
most of the refit's time on EfficientNet-Lite0). Here the model is traced once with torch.fx and its nodes run
in order on all batches together, each activation freed after its last use: when a chosen layer is reached,
`visit` receives its inputs on every batch (and may refit it in place), then the layer runs with what `visit`
left. One forward pass in all. It holds the live activations of every batch at once, so it is used only when
that fits `max_bytes` (measured on the first batch); a model torch.fx cannot trace (data-dependent control
flow) raises `LockstepSkipped` and the caller falls back to capturing layer by layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn


class LockstepSkipped(Exception):
    """The model cannot be run in lockstep (untraceable, several inputs, or too large to hold): why."""


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError ...
        raise LockstepSkipped(f"torch.fx cannot trace the model ({type(exc).__name__}: {exc})") from exc
    if sum(1 for n in gm.graph.nodes if n.op == "placeholder") != 1:
        raise LockstepSkipped("the model's forward takes more than one input")
    return gm


def _last_uses(nodes: list[fx.Node]) -> dict[int, list[fx.Node]]:
    """For each node's position, the nodes whose value is not needed after it."""
    last: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last[used] = i
    out: dict[int, list[fx.Node]] = {}
    for node, i in last.items():
        out.setdefault(i, []).append(node)
    return out


def _run(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any], x: torch.Tensor) -> Any:
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "placeholder":
        return x
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return args[0]  # output


def _bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def peak_live_bytes(gm: fx.GraphModule, x: torch.Tensor) -> int:
    """The most bytes of activations alive at once when `gm` runs on `x` node by node."""
    nodes, env, peak = list(gm.graph.nodes), {}, 0
    frees = _last_uses(nodes)
    for i, node in enumerate(nodes):
        env[node] = _run(gm, node, env, x)
        peak = max(peak, sum(_bytes(v) for v in env.values()))
        for done in frees.get(i, []):
            env.pop(done, None)
    return peak


@torch.no_grad()
def run_lockstep(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], at: set[str],
                 visit: Callable[[str, list[torch.Tensor]], None], *, max_bytes: int) -> None:  # fmt: skip
    """Run `gm` on every tensor of `inputs` node by node; before the first call of each module named in `at`,
    `visit(name, its first argument on every input)`. Raises LockstepSkipped (before visiting anything) when
    the activations alive at once would exceed `max_bytes`."""
    need = peak_live_bytes(gm, inputs[0]) * len(inputs) if inputs else 0
    if need > max_bytes:
        raise LockstepSkipped(f"{need / 2**30:.1f} GiB of activations at once (limit {max_bytes / 2**30:.1f} GiB)")
    nodes = list(gm.graph.nodes)
    frees = _last_uses(nodes)
    envs: list[dict[fx.Node, Any]] = [{} for _ in inputs]
    visited: set[str] = set()
    for i, node in enumerate(nodes):
        name = str(node.target)
        if node.op == "call_module" and name in at and name not in visited:
            visited.add(name)
            visit(name, [env[node.args[0]] for env in envs])  # type: ignore[index]
        for env, x in zip(envs, inputs, strict=True):
            env[node] = _run(gm, node, env, x)
            for done in frees.get(i, []):
                env.pop(done, None)
