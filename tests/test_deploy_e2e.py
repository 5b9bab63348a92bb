"""The whole chain on a tiny seeded model and real Fashion-MNIST, through the real tools (onnx2tf included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.artifacts import sha256_file
from pipeline.data.sources import DataPlan
from pipeline.deploy import DeployRequest, deploy
from pipeline.errors import BudgetError
from pipeline.models.spec import ModelSpec
from pipeline.targets import TARGETS_DIR, load_target
from tests.conftest import needs_fmnist, tiny_resnet

pytestmark = [pytest.mark.slow, needs_fmnist]

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPEC = ModelSpec(
    name="tiny_resnet", build=tiny_resnet, input_shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,), class_names=CLASSES
)
STAGES = [
    "baseline",
    "export_baseline",
    "convert_baseline",
    "sensitivity",
    "prune",
    "finetune",
    "export",
    "convert",
    "verify",
    "profile",
]


# The unpruned model of this fixture loses ~0.04 of accuracy on its way to the shipped int8 file (pruning to half
# its MACs, one epoch of distillation, int8); a broken fine-tune (~0.45) or quantization would miss 0.08.
MAX_ACCURACY_DROP = 0.08
# The tight budgets come from the first deploy's own measurements of the unpruned model: the shipped model must
# be no bigger than SIZE_FACTOR x the unpruned int8 file (an unpruned or a float model misses it; the pruned int8
# file is ~0.5x) and no slower than LATENCY_FACTOR x its p50 (the pruned int8 model is ~1x on this tiny net,
# whose latency is call overhead; 2x leaves room for a noisy 2-core machine and still catches a runtime that
# lost XNNPACK or a runner that times more than invoke()).
SIZE_FACTOR = 0.75
LATENCY_FACTOR = 2.0


def _profile(tmp: Path, **budgets: float | None) -> Path:
    data = yaml.safe_load((TARGETS_DIR / "host.yaml").read_text())
    data["name"] = "tinyhost"
    data["budgets"] = {"max_accuracy_drop": MAX_ACCURACY_DROP, "max_size_kb": None, "latency_ms": None, **budgets}
    data["budgets"] = {k: v for k, v in data["budgets"].items() if v is not None}
    data["pruning"]["target"] = {"metric": "macs", "keep": 0.5}
    data["pruning"]["channel_multiple"] = 4
    data["pruning"]["compare_uniform"] = True  # the uniform guard (off by default) runs in the chain
    data["finetune"] = {"epochs": 1, "max_train_images": 2048, "batch_size": 64, "lr": 0.003}
    data["quantize"]["calibration_images"] = 64
    # this tiny net's int8 file agrees ~0.987 with PyTorch even after the remedies (tests/test_quantize.py
    # covers them); the chain is what is tested here, so plain PTQ is enough
    data["quantize"]["min_agreement"] = 0.95
    data["profiling"] = {"threads": 1, "warmup": 3, "runs": 30, "min_seconds": 0.2}  # ~4000 runs: a steady p50
    path = tmp / "tinyhost.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train_tiny(path: Path) -> None:
    from pipeline.data.fashion_mnist import load_fashion_mnist
    from pipeline.models.checkpoint import save_checkpoint

    train = load_fashion_mnist("train").subset(6000, seed=3)
    model = tiny_resnet().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = np.random.default_rng(0)
    for _ in range(150):
        idx = gen.integers(0, len(train), 64)
        loss = F.cross_entropy(model(SPEC.to_tensor(train.images[idx])), torch.from_numpy(train.labels[idx]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(model.eval(), path, meta={"model": "tiny_resnet"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = tmp / "tiny.pt"
    _train_tiny(ckpt)
    (tmp / "first").mkdir()
    profile = tmp / "tinyhost.yaml"  # written below, from the first deploy's measurements

    def request(profile_path: Path = profile, **kw) -> DeployRequest:
        plan = DataPlan(SPEC, test_limit=600)
        return DeployRequest(
            target=load_target(str(profile_path)),
            spec=SPEC,
            checkpoint=ckpt,
            data=plan,
            runs_dir=tmp / "runs",
            artifacts_dir=tmp / "artifacts",
            **kw,
        )

    # 1. accuracy budget only: every stage runs once and measures the unpruned model
    seen: list[tuple[str, bool]] = []
    first = deploy(request(_profile(tmp / "first")), lambda name, rec: seen.append((name, rec.skipped)))
    # 2. size and latency budgets derived from what the first deploy measured of the unpruned model (the latency
    #    budget is part of the prune stage's config, so prune and everything after it run again: a second,
    #    independent latency measurement is checked against it)
    base = first.summary["baseline"]["tflite"]
    budgets = {
        "max_size_kb": round(SIZE_FACTOR * base["size_bytes"] / 1024, 2),
        "latency_ms": round(LATENCY_FACTOR * base["latency_ms"]["p50"], 5),
    }
    _profile(tmp, **budgets)
    result = deploy(request())
    return {"tmp": tmp, "ckpt": ckpt, "request": request, "result": result, "seen": seen, "budgets": budgets,
            "first": first}  # fmt: skip


def test_every_stage_ran_once_in_order(workspace: dict) -> None:
    assert workspace["seen"] == [(s, False) for s in STAGES]


def test_bundle_is_whole_and_checksummed(workspace: dict) -> None:
    bundle = workspace["result"].bundle
    names = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert names == [
        "labels.txt",
        "manifest.json",
        "metadata.json",
        "model.tflite",
        "report.html",
        "report.md",
        "variants/model_fp16.tflite",
        "variants/model_fp32.tflite",
        "variants/model_int8.tflite",
    ]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        assert sha256_file(bundle / rel) == entry["sha256"]
        assert (bundle / rel).stat().st_size == entry["bytes"]
    assert manifest["summary"]["tools"]["onnx2tf"] == "1.29.24"
    assert manifest["summary"]["profile"]["name"] == "tinyhost"
    assert (bundle / "labels.txt").read_text().splitlines() == list(CLASSES)
    assert sha256_file(bundle / "model.tflite") == sha256_file(bundle / "variants/model_int8.tflite")
    assert not list(bundle.parent.glob(".*tmp"))
    html = (bundle / "report.html").read_text()
    assert html.count("<img") >= 3 and "data:image/png;base64," in html and "report.html" in manifest["files"]


def test_metadata_describes_the_shipped_model(workspace: dict) -> None:
    from pipeline.tflite import tflite_io_details

    bundle = workspace["result"].bundle
    meta = json.loads((bundle / "metadata.json").read_text())
    io = tflite_io_details(bundle / "model.tflite")
    assert meta["precision"] == "int8" and meta["layout"] == "NHWC"
    assert meta["input"]["shape"] == [1, 28, 28, 1] == io["inputs"][0]["shape"]
    assert meta["input"]["dtype"] == "int8"
    q = meta["input"]["quantization"]
    assert q["scale"] > 0 and -128 <= q["zero_point"] <= 127
    assert meta["format"] == "edgeship-metadata/2" and meta["schema_version"] == 2
    norm = meta["normalization"]
    assert norm["mean"] == [0.2860] and norm["std"] == [0.3530] and meta["class_names"] == list(CLASSES)


def test_figures_are_measured(workspace: dict) -> None:
    s = workspace["result"].summary
    base, pruned = s["baseline"], s["pruned"]
    assert pruned["macs"] <= 0.5 * base["macs"] and pruned["params"] < base["params"]
    assert base["accuracy_torch"] > 0.6  # a model that learned something from real data
    assert pruned["accuracy_torch"] >= pruned["accuracy_torch_before_finetune"] - 0.02
    rec = pruned["recovery"]  # the default: the layers reading pruned channels refitted before fine-tuning
    assert rec["recovery"] == "least-squares refit" and rec["refitted_layers"] >= 1, rec
    assert 0 <= rec["median_relative_error"] < 1
    text = (workspace["result"].bundle / "report.md").read_text()
    assert f"{rec['refitted_layers']} layers refitted by least squares" in text
    guard = pruned["uniform_guard"]  # the measured allocation checked against a uniform cut of its size
    assert guard["chosen"] in ("sensitivity", "uniform") and guard["uniform"]["keep"] <= guard["sensitivity"]["keep"]
    kept = guard[guard["chosen"]]["val_accuracy"]
    assert kept >= max(guard["sensitivity"]["val_accuracy"], guard["uniform"]["val_accuracy"])
    assert kept == pytest.approx(pruned["accuracy_torch_before_finetune"], abs=1e-6)  # the one kept is the one scored
    assert "a uniform cut of the same size" in text
    v = s["variants"]
    assert v["fp32"]["agreement"] == 1.0 and v["fp32"]["max_abs_diff"] < 1e-3
    assert v["fp16"]["agreement"] >= 0.98
    assert v["int8"]["agreement"] >= 0.9
    assert abs(v["int8"]["accuracy"] - pruned["accuracy_torch"]) < 0.05
    assert v["int8"]["size_bytes"] < v["fp32"]["size_bytes"] / 2.5
    for variant in (*v.values(), base["tflite"]):
        lat = variant["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    budgets = {b["name"]: b for b in s["budgets"]}
    assert budgets["accuracy drop"]["limit"] == MAX_ACCURACY_DROP and budgets["accuracy drop"]["status"] == "met"
    assert budgets["size (KiB)"]["limit"] == workspace["budgets"]["max_size_kb"]
    assert budgets["size (KiB)"]["status"] == "met", budgets["size (KiB)"]
    latency = budgets["latency p50 (ms)"]
    assert latency["limit"] == workspace["budgets"]["latency_ms"] and latency["status"] == "met", latency
    assert latency["value"] == v["int8"]["latency_ms"]["p50"]  # the shipped model's own measurement


def test_the_real_report_renders_in_chromium_with_its_figures(workspace: dict, tmp_path: Path) -> None:
    """The bundle's report.html of this real deploy (not a hand-built summary) in headless Chromium."""
    from tests.test_report_html import loaded_images, screenshot_ink

    s = workspace["result"].summary
    page = workspace["result"].bundle / "report.html"
    text = page.read_text(encoding="utf-8")
    images = loaded_images(text, tmp_path)
    assert [i["alt"] for i in images] == [
        "accuracy vs latency",
        "latency distribution",
        "channels per layer",
        "sensitivity per layer",
        "worst int8 ops",
    ]
    assert all(i["complete"] and i["w"] > 100 and i["h"] > 50 for i in images), images
    assert "energy per inference: not measured." in text  # host.yaml: power.kind none, no idle_w/active_w
    assert "<h2>Edge TPU" not in text
    assert f"{s['baseline']['params']:,}" in text and f"{s['pruned']['params']:,}" in text
    assert screenshot_ink(page, tmp_path) > 0.02


def test_report_compares_before_and_after(workspace: dict) -> None:
    s = workspace["result"].summary
    text = (workspace["result"].bundle / "report.md").read_text()
    assert f"| parameters | {s['baseline']['params']:,} | {s['pruned']['params']:,} |" in text
    assert "| int8 latency p50 |" in text and "top-1 agreement" in text
    assert "## Budgets" in text and "## Channels per layer" in text


def test_rerun_skips_everything_and_ships_the_same_model(workspace: dict) -> None:
    bundle = workspace["result"].bundle
    before = sha256_file(bundle / "model.tflite")
    seen: list[tuple[str, bool]] = []
    deploy(workspace["request"](), lambda name, rec: seen.append((name, rec.skipped)))
    assert seen == [(s, True) for s in STAGES]
    assert sha256_file(bundle / "model.tflite") == before


def test_missed_budget_publishes_nothing(workspace: dict) -> None:
    bundle = workspace["result"].bundle
    manifest_before = (bundle / "manifest.json").read_bytes()
    strict_dir = workspace["tmp"] / "strict"
    strict_dir.mkdir(exist_ok=True)
    strict = _profile(strict_dir, **{**workspace["budgets"], "max_size_kb": 1})  # the same stages: none reruns
    with pytest.raises(
        BudgetError, match=r"misses its budget \(size \(KiB\): .* vs limit 1\.0\).*Nothing was published"
    ):
        deploy(workspace["request"](strict))
    assert (bundle / "manifest.json").read_bytes() == manifest_before
    report = workspace["tmp"] / "runs" / "tinyhost" / "report.md"
    assert "**missed**" in report.read_text()


def test_cli_reports_a_broken_checkpoint(workspace: dict, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(workspace["ckpt"].read_bytes()[:1000])
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "deploy", "--target", "host", "--checkpoint", str(bad),
         "--runs-dir", str(tmp_path / "runs"), "--artifacts-dir", str(tmp_path / "art")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "edgeship: error:" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "art").exists()


pytest_plugins = ("devices_fixtures",)


def test_deploy_profiles_on_a_device_over_real_ssh(workspace: dict, sshd) -> None:
    """DEVICE=root@127.0.0.1:PORT: the profile stage (only) reruns, on the 'device' behind a real sshd; the
    figures say where they were measured and the latency budget is checked there."""
    from dataclasses import replace

    tmp = workspace["tmp"] / "device"
    tmp.mkdir(exist_ok=True)
    data = yaml.safe_load(_profile(tmp, **workspace["budgets"]).read_text())
    data["transport"] = {"kind": "ssh", "user": "root", "python": sys.executable, "workdir": str(tmp / "remote")}
    (tmp / "tinyhost.yaml").write_text(yaml.safe_dump(data))
    req = replace(
        workspace["request"](tmp / "tinyhost.yaml"),
        artifacts_dir=tmp / "artifacts",
        devices=f"root@127.0.0.1:{sshd.port}",
        ssh_options=sshd.options(),
    )
    seen: list[tuple[str, bool]] = []
    result = deploy(req, lambda name, rec: seen.append((name, rec.skipped)))
    assert [n for n, skipped in seen if not skipped] == ["profile"]
    s = result.summary
    device = f"root@127.0.0.1:{sshd.port}"
    assert s["variants"]["int8"]["measured_on"].endswith("ssh)")
    assert s["devices"][device]["error"] is None and set(s["devices"][device]["results"]) >= {"int8", "baseline"}
    lat = {b["name"]: b for b in s["budgets"]}["latency p50 (ms)"]
    assert lat["status"] == "met", lat  # checked: the figures came from the device, not a stand-in
    assert lat["limit"] == workspace["budgets"]["latency_ms"]  # 2x the unpruned model's p50 measured here
    assert lat["value"] == s["variants"]["int8"]["latency_ms"]["p50"]  # the device's figure
    assert sshd.accepted_logins() >= 1
    text = (result.bundle / "report.md").read_text()
    assert "## Devices" in text and device in text


def test_the_accuracy_search_ships_only_within_its_budget_and_auto_picks_the_fastest(workspace: dict) -> None:
    """`pruning.target: {metric: accuracy}` with `quantize.ship: auto`: every trial is recorded, the chosen one
    passed on validation, and what ships (if anything) is within the accuracy budget on the test split, in the
    fastest precision measured within it; otherwise the deploy stops and publishes nothing."""
    from dataclasses import replace

    tmp = workspace["tmp"] / "search"
    tmp.mkdir(exist_ok=True)
    data = yaml.safe_load(_profile(tmp).read_text())
    data["budgets"]["max_accuracy_drop"] = 0.05
    data["pruning"]["target"] = {"metric": "accuracy"}
    data["pruning"]["search"] = {"trials": 4, "finetune_steps": 40, "images": 400}
    data["quantize"]["ship"] = "auto"
    (tmp / "tinyhost.yaml").write_text(yaml.safe_dump(data))
    req = replace(workspace["request"](tmp / "tinyhost.yaml"), artifacts_dir=tmp / "artifacts")
    try:
        result = deploy(req)
    except BudgetError as exc:
        assert "accuracy drop" in str(exc) and not (tmp / "artifacts" / "tinyhost").exists()
        summary = json.loads((workspace["tmp"] / "runs" / "tinyhost" / "summary.json").read_text())
    else:
        summary = result.summary
        drop = {b["name"]: b for b in summary["budgets"]}["accuracy drop"]
        assert drop["status"] == "met" and drop["value"] <= 0.05
        assert "Accuracy search" in (result.bundle / "report.html").read_text()
    search = summary["pruned"]["search"]
    assert 1 <= search["trials_scored"] <= 4 and len(search["trials"]) <= 12  # repeats of a tried model are free
    assert all(t["same_as"] < i for i, t in enumerate(search["trials"]) if "same_as" in t)
    if search["chosen"] is not None:
        chosen = search["trials"][search["chosen"]]
        assert chosen["passed"] and chosen["val_accuracy"] >= search["edge_val_accuracy"]
        assert summary["pruned"]["macs"] < summary["baseline"]["macs"]
    choice = summary["precision_choice"]
    assert choice["chosen"] == summary["shipped_precision"]
    within = [c for c in choice["candidates"] if c["within_budget"]]
    if within:
        assert summary["variants"][choice["chosen"]]["latency_ms"]["p50"] == min(c["p50_ms"] for c in within)
    # the unpruned model was converted and timed in every precision: the before/after compares like with like
    assert summary["baseline"]["tflite"]["size_bytes"] > 0
