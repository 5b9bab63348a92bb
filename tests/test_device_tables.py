"""Latency tables measured on the device (pipeline/latency/device_table.py, cache.py) and per-op profiles
(pipeline/devices/op_profile.py).

Real parts throughout: probes built with TensorFlow Lite's converter, copied over a real loopback sshd, the adb
client against tests/adb_device.py, or the emulated arm64 Pi (tests/qemu_rootfs.py), and timed there by the
device runner's `--many`. Timings under emulation (and on this shared machine) mean nothing, so these tests check
the path, the cache key and the resume, never the values.

The per-op profile parser is tested against benchmark_model output in its documented format: no benchmark_model
binary can be installed here, so tests/data/benchmark_model/op_profiling_*.txt were written line for line in the
layout of TFLite's StatsCalculator (tensorflow/core/util/stats_calculator.cc: the older layout with a `[start]`
column, and the newer xla/tsl one without it) as fed by tensorflow/lite/profiling/profile_summarizer.cc; they are
not recordings of a real run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.devices.op_profile import link_layers, parse_op_profile, profile_ops
from pipeline.devices.transport import LocalTransport
from pipeline.errors import DeviceError
from pipeline.latency.cache import Fingerprint, TableCache, cache_root
from pipeline.latency.device_table import TableSettings, latency_table, measure_device_tables
from pipeline.latency.layers import Geometry, Layer, prunable_layers
from pipeline.pruning.channels import prunable_groups

pytest_plugins = ("devices_fixtures",)

DATA = Path(__file__).parent / "data" / "benchmark_model"
FAST = TableSettings(threads=1, warmup=2, runs=5, min_seconds=0.0, max_seconds=5.0, batch_size=2)
GEO = Geometry("conv", (3, 3), (1, 1), "same", (8, 8))
LAYERS = [Layer("c", GEO, 16, 24, "a", "c")]  # cin {8, 16} x cout {16, 24}: 4 probes
GROUPS = {"a": 16, "c": 24}
PLAN = {"precision": "fp32", "multiple": 8, "max_ratio": 0.5, "max_points": 4}
needs_adb = pytest.mark.skipif(
    shutil.which("adb") is None, reason="adb client missing: run .ci/setup_devices.sh (apt-get install adb)"
)


def _model_a() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))  # fmt: skip


def _model_b() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 10))  # fmt: skip


def _layers_groups(model: nn.Module) -> tuple[list[Layer], dict[str, int]]:
    ex = torch.zeros(1, 1, 8, 8)
    return prunable_layers(model.eval(), ex), prunable_groups(model, ex)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every probe these tests use, built once (one TensorFlow process)."""
    from pipeline.latency.device_table import keyed_entries
    from pipeline.latency.table import build_probes, plan_probes

    entries = {}
    for layers, groups in ((LAYERS, GROUPS), _layers_groups(_model_a()), _layers_groups(_model_b())):
        probes = plan_probes(layers, groups, multiple=8, max_ratio=0.5, max_points=4)
        entries.update({e["file"]: e for e in keyed_entries(probes, "fp32")})
    folder = tmp_path_factory.mktemp("probes") / "fp32"
    build_probes(list(entries.values()), "fp32", folder)
    return folder


def _measure(transports, cache: TableCache, probe_dir: Path, *, layers=LAYERS, groups=GROUPS, settings=FAST,
             on_progress=None):  # fmt: skip
    return measure_device_tables(layers, groups, transports, settings=settings, probe_dir=probe_dir, cache=cache,
                                 on_progress=on_progress, **PLAN)  # fmt: skip


# ------------------------------------------------------------------ fingerprint and cache


def _probe_info(**kw) -> dict:
    base = {"cpu": "Cortex-A76", "cores": 4, "system": "Linux", "machine": "aarch64", "runtime": "ai-edge-litert",
            "runtime_version": "2.1.0", "node": "pi-kitchen"}  # fmt: skip
    return {**base, **kw}


def test_fingerprint_is_the_device_kind_not_its_name() -> None:
    fp = Fingerprint.from_probe(_probe_info(), threads=2)
    assert Fingerprint.from_probe(_probe_info(node="pi-garage"), threads=2).key() == fp.key()  # host name: same
    assert fp.key().startswith("aarch64-")
    others = [Fingerprint.from_probe(_probe_info(), threads=4), Fingerprint.from_probe(_probe_info(), threads=2,
              delegate="edgetpu"), Fingerprint.from_probe(_probe_info(runtime_version="2.3.0"), threads=2),
              Fingerprint.from_probe(_probe_info(cpu="Cortex-A72"), threads=2),
              Fingerprint.from_probe(_probe_info(cores=8), threads=2)]  # fmt: skip
    assert len({fp.key(), *(o.key() for o in others)}) == 6


def test_cache_merges_batches_and_is_listed_by_edgeship_tables(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("EDGESHIP_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" / "tables"
    cache, fp = TableCache(), Fingerprint.from_probe(_probe_info(), threads=2)
    assert cache.merge(fp, {"fp32|g|8x8": {"p50": 1.0, "mean": 1.1, "runs": 5}}, device="pi@a") == 1
    assert cache.merge(fp, {"int8|g|8x16": {"p50": 2.0, "mean": 2.1, "runs": 5}}, device="pi@b") == 2
    assert set(cache.entries(fp)) == {"fp32|g|8x8", "int8|g|8x16"}
    assert main(["tables"]) == 0
    out = capsys.readouterr().out
    assert f"latency tables in {tmp_path / 'c' / 'tables'}: 1" in out and fp.key() in out
    assert "2 probes (1 fp32, 1 int8); measured on pi@a, pi@b" in out
    assert main(["tables", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tables"]
    assert rows[0]["fingerprint"]["cpu"] == "Cortex-A76" and rows[0]["probes"] == 2
    monkeypatch.delenv("EDGESHIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edgeship" / "tables"


# ------------------------------------------------------------------ measured through the transports


def test_cache_is_shared_by_two_models_on_one_device(tmp_path: Path, probe_dir: Path) -> None:
    """Two different models with a layer geometry in common: the second deploy times only what is new."""
    cache, local = TableCache(tmp_path / "cache"), LocalTransport(python=sys.executable, workdir=str(tmp_path / "w"))
    la, ga = _layers_groups(_model_a())
    _, ta = _measure({"local": local}, cache, probe_dir, layers=la, groups=ga)
    assert ta["local"].complete and ta["local"].cached == 0 and ta["local"].measured == ta["local"].wanted == 8
    lb, gb = _layers_groups(_model_b())
    pb, tb = _measure({"local": local}, cache, probe_dir, layers=lb, groups=gb)
    b = tb["local"]
    assert b.complete and b.wanted == 8 and b.cached == 3 and b.measured == 5  # first conv + Linear(16->10) shared
    assert b.fingerprint == ta["local"].fingerprint
    table = latency_table(b, pb, "fp32", measured_full_ms=1.5)
    assert table.device == "local" and table.fingerprint == b.fingerprint.key() and table.measured_full_ms == 1.5
    assert table.calibrated(lb, gb, 99.0).scale == pytest.approx(1.5 / table.layer_sum(lb, gb))  # its own device
    assert len(cache.entries(b.fingerprint)) == 13 and not list((tmp_path / "w").iterdir())


def test_time_bound_stops_with_a_clear_error(tmp_path: Path, probe_dir: Path) -> None:
    local = LocalTransport(python=sys.executable, workdir=str(tmp_path / "w"))
    _, runs = _measure({"local": local}, TableCache(tmp_path / "c"), probe_dir, settings=TableSettings(
        threads=1, runs=3, budget_s=0.0))  # fmt: skip
    err = str(runs["local"].error)
    assert "did not finish within 0 s" in err and "0 of 4 probes measured" in err and not runs["local"].complete


def test_over_ssh_a_device_lost_mid_table_keeps_what_it_measured(sshd, tmp_path: Path, probe_dir: Path) -> None:
    """Real sshd on loopback: the device dies after the first batch; a rerun (the device back at another
    address: the fingerprint does not name it) measures only the rest."""
    from devices_fixtures import start_sshd

    cache, seen = TableCache(tmp_path / "cache"), []

    def kill_after_first_batch(device: str, done: int, wanted: int) -> None:
        seen.append((device, done, wanted))
        if done == 2:
            sshd.kill()

    t = sshd.transport(python=sys.executable)
    _, runs = _measure({"pi": t}, cache, probe_dir, on_progress=kill_after_first_batch)
    lost = runs["pi"]
    assert seen == [("pi", 2, 4)] and not lost.complete
    assert "2 of 4 probes measured; they are kept in the cache and a rerun continues from there" in str(lost.error)
    assert len(cache.entries(lost.fingerprint)) == 2  # written batch by batch, atomically
    back = start_sshd(tmp_path / "sshd-back")
    try:
        _, runs = _measure({"pi": back.transport(python=sys.executable)}, cache, probe_dir)
    finally:
        back.stop()
    again = runs["pi"]
    assert again.complete and (again.cached, again.measured) == (2, 2)
    assert again.fingerprint == lost.fingerprint and again.info["machine"] == os.uname().machine
    assert back.accepted_logins() >= 1


def test_several_devices_in_parallel_and_the_slowest_one(sshd, tmp_path: Path, probe_dir: Path) -> None:
    """DEVICE=a,b: every device measured at once (one cache file per fingerprint, merged under a lock); the
    allocation is made against the device whose unpruned model is slowest."""
    from pipeline.latency.device_table import slowest

    cache = TableCache(tmp_path / "cache")
    local = LocalTransport(python=sys.executable, workdir=str(tmp_path / "w"))
    _, runs = _measure({"local": local, "pi@b": sshd.transport(python=sys.executable)}, cache, probe_dir)
    assert all(r.complete for r in runs.values()) and runs["local"].fingerprint == runs["pi@b"].fingerprint
    assert len(cache.entries(runs["local"].fingerprint)) == 4 and len(cache.list_tables()) == 1
    assert slowest({"local": 1.2, "pi@b": 3.4, "pi@c": 2.0}) == "pi@b"


@needs_adb
def test_over_adb_the_same_table_and_the_same_fingerprint(tmp_path: Path, probe_dir: Path) -> None:
    """The adb test device runs its commands on this machine: same CPU and runtime, so the same fingerprint as the
    local transport (the serial is not part of it)."""
    from adb_device import AdbDevice
    from devices_fixtures import free_port

    from pipeline.devices.adb import AdbTransport

    dev, port = AdbDevice(), free_port()
    try:
        t = AdbTransport(dev.serial, server_port=port, python=sys.executable, workdir=str(tmp_path / "work"))
        cache = TableCache(tmp_path / "cache")
        probes, runs = _measure({f"adb:{dev.serial}": t}, cache, probe_dir)
        t.close()
    finally:
        dev.stop()
        subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=30, check=False)
    r = runs[f"adb:{dev.serial}"]
    assert r.complete and r.measured == 4 and r.info["machine"] == os.uname().machine
    assert any("--many" in c for c in dev.commands)  # timed by the device runner's batch mode, over adb
    local = LocalTransport(python=sys.executable, workdir=str(tmp_path / "w"))
    _, again = _measure({"local": local}, cache, probe_dir)
    assert again["local"].fingerprint == r.fingerprint and again["local"].measured == 0  # reused, not re-timed
    table = latency_table(r, probes, "fp32")
    assert table.entries[GEO.key()]["cin"] == [8, 16] and table.entries[GEO.key()]["cout"] == [16, 24]


# ------------------------------------------------------------------ the emulated Raspberry Pi


@pytest.mark.slow
def test_on_the_emulated_pi_over_ssh(arm64_sshd, tmp_path: Path, probe_dir: Path) -> None:
    """arm64 Debian + tflite-runtime 2.14 under qemu: probes built here (x86, TF 2.19) run there; its own key."""
    from qemu_rootfs import cache_dir

    cache = TableCache(tmp_path / "cache")
    settings = TableSettings(threads=1, warmup=1, runs=2, min_seconds=0.0, batch_size=3)
    pi = arm64_sshd.transport(python="python3", workdir="/tmp/edgeship")
    probes, runs = _measure({"pi": pi}, cache, probe_dir, settings=settings)
    r = runs["pi"]
    assert r.complete, r.error
    fp = r.fingerprint
    assert (fp.machine, fp.runtime, fp.runtime_version, fp.threads) == ("aarch64", "tflite-runtime", "2.14.0", 1)
    assert fp.key().startswith("aarch64-") and cache.path(fp).is_file() and r.measured == 4
    _, again = _measure({"pi": pi}, cache, probe_dir, settings=settings)
    assert again["pi"].complete and again["pi"].measured == 0 and again["pi"].cached == 4
    assert latency_table(again["pi"], probes, "fp32").machine == "aarch64"
    assert not any((cache_dir() / "tmp/edgeship").glob("table-*"))  # its folder removed on the device


# ------------------------------------------------------------------ per-op profile


def test_op_profile_from_the_interpreter_layout_with_start_column() -> None:
    ops = parse_op_profile((DATA / "op_profiling_interpreter.txt").read_text())
    assert len(ops) == 13 and [o.op_index for o in ops] == list(range(13))
    assert ops[5].type == "CONV_2D" and ops[5].avg_ms == 0.861 and ops[5].ms == 0.861
    assert ops[5].name == "[model/tf.math.add/Add;model/tf.nn.convolution_3/convolution]:5"
    assert sum(o.share for o in ops) == pytest.approx(1.0, abs=1e-3)
    assert max(ops, key=lambda o: o.ms).op_index == 5  # not the init section's ModifyGraphWithDelegate


def test_op_profile_with_xnnpack_ops_links_them_by_kind_order() -> None:
    ops = parse_op_profile((DATA / "op_profiling_xnnpack.txt").read_text())
    assert len(ops) == 13 and ops[0].op_index == 0 and ops[-1].op_index == 12
    assert [o.delegate_index for o in ops[1:-1]] == list(range(11)) and all(o.op_index is None for o in ops[1:-1])
    names = ["QUANTIZE", "CONV_2D", "CONV_2D", "MAX_POOL_2D", "CONV_2D", "CONV_2D", "CONV_2D", "ADD", "MAX_POOL_2D",
             "CONV_2D", "MEAN", "FULLY_CONNECTED", "DEQUANTIZE"]  # fmt: skip
    layers = {1: ("stem.0", "weight shape"), 2: ("stem.3", "weight shape"), 11: ("head.5", "weight shape")}
    rows = link_layers(ops, names, layers)
    assert [r["tflite_op"] for r in rows] == list(range(13))  # 6 convs, 2 pools, add, mean, fc paired in order
    assert rows[2]["layer"] == "stem.3" and rows[2]["link"] == "delegate op, paired by kind order"
    assert rows[11]["tflite_type"] == "FULLY_CONNECTED" and rows[11]["layer"] == "head.5"
    assert rows[0]["link"] == "op index" and rows[7]["layer"] is None  # ADD: no layer given for it
    # a count that disagrees is not guessed at
    rows = link_layers(ops, [n for n in names if n != "ADD"], {})
    assert next(r for r in rows if r["type"].startswith("Add"))["tflite_op"] is None


def test_op_profile_errors_name_what_is_missing() -> None:
    with pytest.raises(DeviceError, match=r"no op profile.*--enable_op_profiling=true"):
        parse_op_profile((DATA / "modern_xnnpack.txt").read_text())


@needs_adb
def test_op_profile_on_a_device_with_benchmark_model(tmp_path: Path, tiny_tflite_file: Path) -> None:
    """Over adb, with a stand-in benchmark_model in the device workdir that checks its flags and prints the
    documented op-profile output (logcat form) of tests/devices_fixtures.tiny_tflite's one CONV_2D."""
    from adb_device import AdbDevice
    from devices_fixtures import free_port

    from pipeline.devices.adb import AdbTransport

    work = tmp_path / "work"
    work.mkdir()
    stand_in = work / "benchmark_model"
    stand_in.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--graph=*model.tflite*--num_threads=1*--enable_op_profiling=true*) ;;\n'
        '  *) echo "ERROR: unexpected flags: $*" >&2; exit 2;; esac\n'
        'test -s "${1#--graph=}" || { echo "ERROR: no model" >&2; exit 3; }\n'
        f"cat {DATA / 'op_profiling_logcat_tiny.txt'}\n"
    )
    stand_in.chmod(0o755)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    dev, port = AdbDevice(), free_port()
    try:
        t = AdbTransport(dev.serial, server_port=port, python=sys.executable, workdir=str(work))
        prof = profile_ops(tiny_tflite_file, t, threads=1, torch_model=model, example=torch.zeros(1, 3, 8, 8))
        stand_in.unlink()
        missing = profile_ops(tiny_tflite_file, t, threads=1)
        t.close()
    finally:
        dev.stop()
        subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=30, check=False)
    assert prof["available"], prof
    (op,) = prof["ops"]
    assert (op["type"], op["tflite_op"], op["tflite_type"], op["layer"]) == (
        "Convolution (NHWC, F32) IGEMM", 0, "CONV_2D", "0")  # fmt: skip
    assert op["ms"] == 0.012 and op["share"] == 1.0 and prof["latency_ms"]["p50"] == 0.012
    assert sorted(os.listdir(work)) == []  # the model's folder was removed
    assert not missing["available"] and "no benchmark_model binary on adb:" in missing["why"]


# ------------------------------------------------------------------ a deploy that prunes against the device's table


@pytest.mark.slow
def test_deploy_over_ssh_prunes_against_the_devices_own_table(sshd, tmp_path: Path, monkeypatch) -> None:
    """The profile's transport names the device (loopback sshd to this machine, running this venv's Python):
    the latency_table stage measures there, the report says where, and the prediction error is that device's."""
    import yaml

    from pipeline.data.sources import DataPlan
    from pipeline.deploy import DeployRequest, deploy
    from pipeline.latency.table import LatencyTable
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.targets import TARGETS_DIR, load_target
    from tests.conftest import has_fashion_mnist, tiny_resnet
    from tests.test_deploy_e2e import SPEC

    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing")
    monkeypatch.setenv("EDGESHIP_CACHE", str(tmp_path / "cache"))
    save_checkpoint(tiny_resnet().eval(), tmp_path / "tiny.pt", meta={"model": "tiny_resnet"})
    data = yaml.safe_load((TARGETS_DIR / "host.yaml").read_text())
    data["budgets"] = {"max_accuracy_drop": 0.5, "latency_ms": 5.0}
    data["pruning"].update(target={"metric": "latency", "max_points": 2}, allocation="uniform")
    data["finetune"] = {"epochs": 1, "max_train_images": 128, "batch_size": 64, "min_steps": 2}
    data["quantize"].update(calibration_images=16, precisions=["int8"], ship="int8")  # one conversion each
    data["profiling"] = {"threads": 1, "warmup": 2, "runs": 10, "min_seconds": 0.0}
    data["transport"] = {
        "kind": "ssh",
        "host": "127.0.0.1",
        "port": sshd.port,
        "user": "root",
        "python": sys.executable,
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    req = DeployRequest(target=load_target(str(tmp_path / "p.yaml")), spec=SPEC, checkpoint=tmp_path / "tiny.pt",
                        data=DataPlan(SPEC, test_limit=100), runs_dir=tmp_path / "runs",
                        artifacts_dir=tmp_path / "art", allow_budget_miss=True, ssh_options=sshd.options())  # fmt: skip
    s = deploy(req).summary
    device = f"root@127.0.0.1:{sshd.port}"
    lm = s["latency_model"]
    assert lm["table"]["measured_on"] == device and lm["table"]["probes_cached"] == 0
    assert lm["measured_ms"] == lm["table"]["shipped_ms"]  # the error is against that device's own figure
    table = LatencyTable.load(tmp_path / "runs" / "host" / "latency_table" / "table.json")
    assert table.device == device and table.measured_full_ms == lm["table"]["baseline_ms"]
    assert TableCache(tmp_path / "cache" / "tables").path_for_key(table.fingerprint).is_file()
    report = (tmp_path / "art" / "host" / "report.md").read_text()
    assert f"The latency table measured on {device} (" in report
    assert not s["op_profile"]["available"] and "no benchmark_model binary on" in s["op_profile"]["why"]


def test_where_the_time_goes_plot_and_rows_by_pytorch_layer() -> None:
    from dataclasses import asdict

    from pipeline.report import html, op_figures

    ops = parse_op_profile((DATA / "op_profiling_interpreter.txt").read_text())
    names = [o.type for o in ops]
    convs = {1: "stem.0", 2: "stem.3", 4: "block.0", 5: "block.3", 6: "shortcut.0", 9: "head.1"}
    layers = {i: (name, "weight shape") for i, name in convs.items()}
    s = {"op_profile": {"available": True, "device": "pi@a", "tool": "benchmark_model --enable_op_profiling=true",
                        "ops": link_layers(ops, names, layers)}}  # fmt: skip
    per_layer = op_figures.by_layer(s)
    assert per_layer[0][0] == "block.3" and per_layer[0][1] == pytest.approx(0.861)
    assert sum(r[2] for r in per_layer) == pytest.approx(1.0, abs=1e-3) and "(QUANTIZE)" in [r[0] for r in per_layer]
    png = op_figures.where_the_time_goes(s)
    assert png is not None and png.startswith(b"\x89PNG")
    rows = op_figures.op_rows(s, top=3)
    assert [(r["op"], r["layer"]) for r in rows] == [(5, "block.3"), (2, "stem.3"), (4, "block.0")]
    section = html._op_profile(s)
    assert "Where the time goes" in section and "block.3" in section and "<img" in section
    missing = {"op_profile": {"available": False, "why": "no benchmark_model binary on pi@a"}}
    assert op_figures.where_the_time_goes(missing) is None
    assert "Per-op times not measured: no benchmark_model binary on pi@a" in html._op_profile(missing)
    assert asdict(ops[0])["share"] == ops[0].share
