"""Latency-aware pruning: table grid and interpolation, layer/group mapping, allocation on staircases, and a
small table measured for real (TensorFlow Lite converter + the benchmark runner)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PruningError
from pipeline.latency.allocate import allocate
from pipeline.latency.layers import Geometry, Layer, prunable_layers
from pipeline.latency.table import LatencyTable, _bilinear, candidates, measure_table, plan_probes
from pipeline.pruning.channels import count_macs_params, prunable_groups
from pipeline.pruning.latency import prune_to_latency
from tests.tiny_models import prune_cfg

EXAMPLE = torch.zeros(1, 1, 28, 28)


# --- the grid -------------------------------------------------------------------------------------------------


def test_candidates_are_multiples_above_the_floor_and_include_the_full_width() -> None:
    assert candidates(64, 8, floor=16, max_points=100) == [16, 24, 32, 40, 48, 56, 64]
    assert candidates(20, 8, floor=8, max_points=100) == [8, 16, 20]  # full width even when not a multiple
    sub = candidates(256, 8, floor=8, max_points=5)
    assert len(sub) == 5 and sub[0] == 8 and sub[-1] == 256
    assert all(c % 8 == 0 for c in sub)


def test_bilinear_is_exact_on_measured_points_and_linear_between() -> None:
    grid = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert _bilinear([8, 16], [8, 16], grid, 8, 16) == 2.0
    assert _bilinear([8, 16], [8, 16], grid, 16, 8) == 3.0
    assert _bilinear([8, 16], [8, 16], grid, 12, 12) == pytest.approx((1 + 2 + 3 + 5) / 4)


def _table(entries: dict, remainder: float = 0.0) -> LatencyTable:
    return LatencyTable("int8", 1, "test", "0", "x86_64", entries, remainder)


def test_table_round_trips_and_refuses_other_formats(tmp_path) -> None:
    t = _table({"conv:k3x3:s1x1:same:hw8x8": {"cin": [8], "cout": [8, 16], "ms": [[0.1, 0.2]]}}, 0.05)
    t.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == t
    (tmp_path / "old.json").write_text('{"format": "edgeship-latency/0"}')
    assert LatencyTable.load(tmp_path / "old.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert LatencyTable.load(tmp_path / "bad.json") is None


# --- which group sets which layer's channels ------------------------------------------------------------------


def test_layers_know_their_geometry_and_coupled_groups(tiny_model) -> None:
    layers = {lay.name: lay for lay in prunable_layers(tiny_model, EXAMPLE)}
    groups = prunable_groups(tiny_model, EXAMPLE)
    assert set(layers) == {"stem.0", "body.0", "body.3", "short.0", "head.1", "head.5"}
    assert layers["stem.0"].geometry == Geometry("conv", (3, 3), (1, 1), "same", (28, 28))
    assert layers["body.0"].geometry.in_hw == (14, 14)
    assert layers["head.1"].geometry.in_hw == (7, 7)
    assert layers["short.0"].geometry.padding == "valid"  # 1x1 without padding
    assert layers["head.5"].geometry.kind == "linear"
    # the input is fixed (1 channel), the classifier's output is fixed (10 classes)
    assert layers["stem.0"].in_group is None and layers["head.5"].out_group is None
    # the residual add couples body.3 and short.0 into one group that also sets head.1's input
    assert layers["body.3"].out_group == layers["short.0"].out_group == layers["head.1"].in_group
    assert layers["body.0"].in_group == layers["short.0"].in_group == layers["stem.0"].out_group
    assert {lay.out_group for lay in layers.values() if lay.out_group} == set(groups)


def test_depthwise_layers_take_input_and_output_from_one_group() -> None:
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 28 * 28, 10),
    )  # fmt: skip
    layers = {lay.name: lay for lay in prunable_layers(model.eval(), EXAMPLE)}
    dw = layers["2"]
    assert dw.geometry.kind == "depthwise"
    assert dw.in_group == dw.out_group == layers["0"].out_group
    probes = plan_probes(list(layers.values()), prunable_groups(model, EXAMPLE), multiple=4, max_ratio=0.75,
                         max_points=16)  # fmt: skip
    key = dw.geometry.key()
    assert probes[key]["cin"] == probes[key]["cout"] == [4, 8, 12, 16]


# --- allocation on a staircase ----------------------------------------------------------------------------------


def _staircase_layers() -> tuple[list[Layer], dict[str, int]]:
    geo_a = Geometry("conv", (3, 3), (1, 1), "same", (14, 14))
    geo_b = Geometry("conv", (3, 3), (1, 1), "same", (7, 7))
    layers = [Layer("a", geo_a, 16, 64, None, "a"), Layer("b", geo_b, 64, 64, "a", "b")]
    return layers, {"a": 64, "b": 64}


def _staircase_table() -> LatencyTable:
    counts = [16, 24, 32, 40, 48, 56, 64]
    # layer a: flat until 32 channels, then one big step; layer b: smooth and cheap
    step = [1.0 if c > 32 else 0.4 for c in counts]
    return _table(
        {
            "conv:k3x3:s1x1:same:hw14x14": {"cin": [16], "cout": counts, "ms": [step]},
            "conv:k3x3:s1x1:same:hw7x7": {
                "cin": counts,
                "cout": counts,
                "ms": [[0.001 * ci * co / 64 for co in counts] for ci in counts],
            },
        }
    )


def test_allocation_crosses_the_step_instead_of_trimming_flat_channels() -> None:
    layers, groups = _staircase_layers()
    table = _staircase_table()
    imp = {g: np.linspace(0.0, 1.0, n) for g, n in groups.items()}  # ascending: pruning order drops low first
    full = table.predict(layers, groups)
    alloc = allocate(layers, groups, imp, table, budget_ms=0.9 * full, multiple=8, max_ratio=0.75)
    assert alloc.predicted_ms <= 0.9 * full
    # only crossing the step at 32 saves meaningful time on layer a; 56/48/40 save nothing there
    assert alloc.plan["a"] == 32
    assert alloc.predicted_ms == pytest.approx(table.predict(layers, alloc.plan))


def test_allocation_keeps_what_fits_already_and_refuses_the_impossible() -> None:
    layers, groups = _staircase_layers()
    table = _staircase_table()
    imp = {g: np.ones(n) for g, n in groups.items()}
    full = table.predict(layers, groups)
    assert allocate(layers, groups, imp, table, budget_ms=full * 1.01, multiple=8, max_ratio=0.75).plan == groups
    with pytest.raises(PruningError, match=r"cannot meet the latency budget.*max_layer_ratio"):
        allocate(layers, groups, imp, table, budget_ms=0.1 * full, multiple=8, max_ratio=0.75)


def test_prune_to_latency_prunes_to_the_allocated_plan(tiny_model) -> None:
    layers = prunable_layers(tiny_model, EXAMPLE)
    groups = prunable_groups(tiny_model, EXAMPLE)
    # a synthetic table where latency is proportional to MACs of each layer (the pruner must then cut channels)
    entries = {}
    for lay in layers:
        key = lay.geometry.key()
        hw = lay.geometry.in_hw[0] * lay.geometry.in_hw[1]
        cin = sorted({4, 8, 12, 16, 20, 24, 28, 32, 64, lay.cin} & set(range(1, lay.cin + 1)))
        cout = sorted({4, 8, 12, 16, 20, 24, 28, 32, 64, lay.cout} & set(range(1, lay.cout + 1)))
        entries[key] = {"cin": cin, "cout": cout, "ms": [[1e-5 * hw * ci * co for co in cout] for ci in cin]}
    table = _table(entries)
    full = table.predict(layers, groups)
    lp = prune_to_latency(tiny_model, EXAMPLE, table, prune_cfg(metric="latency", channel_multiple=4, max_ratio=0.75),
                          budget_ms=0.6 * full, measured_full_ms=full)  # fmt: skip
    assert lp.figures["predicted_ms"] <= 0.6 * full + 1e-6
    pruned = lp.result.model
    assert pruned.stem[0].out_channels == lp.figures["plan"]["stem.0"]
    assert lp.result.macs_after < lp.result.macs_before
    assert count_macs_params(pruned, EXAMPLE)[0] == lp.result.macs_after
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --- measured for real ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_small_table_measured_with_the_real_runtime(tmp_path) -> None:
    geo = Geometry("conv", (3, 3), (1, 1), "same", (14, 14))
    layers = [Layer("c", geo, 16, 32, "a", "c")]
    table = measure_table(layers, {"a": 16, "c": 32}, precision="int8", threads=1, multiple=16, max_ratio=0.5,
                          max_points=4, min_seconds=0.05, work_dir=tmp_path)  # fmt: skip
    e = table.entries[geo.key()]
    assert e["cin"] == [16] and e["cout"] == [16, 32]
    ms = np.asarray(e["ms"])
    assert ms.shape == (1, 2) and (ms > 0).all() and (ms < 50).all()
    assert table.runtime in {"ai-edge-litert", "tflite-runtime", "tensorflow"} and table.runtime_version
    assert table.layer_ms(layers[0], 16, 32) == pytest.approx(ms[0, 1])
    assert not list(tmp_path.iterdir())  # the probes lived in a temporary folder


def test_allocation_spends_the_budget_where_measured_loss_per_millisecond_is_lowest() -> None:
    """With the sensitivity curves' cost, a group whose cut costs much validation loss is spared even where its
    step saves the most time per importance lost."""
    layers, groups = _staircase_layers()
    table = _staircase_table()
    imp = {g: np.linspace(0.0, 1.0, n) for g, n in groups.items()}
    full = table.predict(layers, groups)
    budget = full - 0.02  # reachable by trimming b alone (b is worth ~0.06 ms) or by a's big step
    plain = allocate(layers, groups, imp, table, budget_ms=budget, multiple=8, max_ratio=0.75)
    costly_a = allocate(layers, groups, imp, table, budget_ms=budget, multiple=8, max_ratio=0.75,
                        cost=lambda g, kept, lower: (kept - lower) * (10.0 if g == "a" else 0.01))  # fmt: skip
    assert plain.plan["a"] < 64  # by importance per millisecond, a's step is the better buy
    assert costly_a.plan["a"] == 64 and costly_a.plan["b"] < 64  # by measured loss, b pays instead
    assert costly_a.predicted_ms <= budget
