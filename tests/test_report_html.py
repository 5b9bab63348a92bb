"""The HTML deploy report: rendered from a summary, opened in a real headless Chromium, every image loaded.

Chromium comes from Debian's `chromium` package (.ci/setup_report.sh); without it the browser tests skip and
say so. The summaries below have the shape `pipeline.report.summary.summarize` gives, Edge TPU analysis and
energy figures included.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import PipelineError
from pipeline.power.energy import energy_summary
from pipeline.report import compare_targets, rebuild_report, render_comparison, render_html, write_report
from pipeline.targets import Power

CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.documentElement.setAttribute("data-images", JSON.stringify(
    imgs.map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))));
});
</script>"""


def _lat(p50: float) -> dict[str, float]:
    return {
        "min": p50 * 0.6,
        "p50": p50,
        "p90": p50 * 1.5,
        "p99": p50 * 3,
        "max": p50 * 40,
        "mean": p50 * 1.2,
        "std": p50 * 0.5,
    }


def _quantiles(p50: float) -> list[float]:
    """21 quantiles (0%, 5%, ... 100%) the way the runner records them: a fast body and a slow tail."""
    return [round(p50 * (0.6 + 0.8 * i / 20 + (30 * (i - 18) if i > 18 else 0)), 4) for i in range(21)]


def _energy(active: Mapping[str, Any] | None, power: Power, latency_ms: float) -> dict[str, Any]:
    return energy_summary(None, active, latency_ms=latency_ms, inferences=5000, profile_power=power)


def _variant(acc: float, p50: float, size: int, **extra: Any) -> dict[str, Any]:
    return {
        "accuracy": acc,
        "agreement": 0.99,
        "max_abs_diff": 0.1,
        "mean_abs_diff": 0.01,
        "latency_ms": _lat(p50),
        "size_bytes": size,
        "peak_rss_kib": 50000,
        "model_rss_kib": 4800,
        "runtime": "ai-edge-litert 2.1.0",
        "xnnpack": True,
        "threads": 2,
        "runs": 5000,
        "measured_on": "vm (x86_64, local)",
        "latency_quantiles_ms": _quantiles(p50),
        **extra,
    }


PMIC = {"ok": True, "avg_w": 5.1, "source": "rpi5 PMIC", "samples": 200, "rate_hz": 100.0}


def full_summary(target: str = "coral") -> dict[str, Any]:
    ops = [
        {"index": i, "op": op, "placement": place, "reason": reason, "pytorch_layer": layer}
        for i, (op, place, reason, layer) in enumerate(
            [
                ("QUANTIZE", "cpu-edge", "model input", None),
                ("CONV_2D", "tpu", "", "stem.0"),
                ("CONV_2D", "tpu", "", "block.0"),
                ("ADD", "tpu", "", "block"),
                ("HARD_SWISH", "cpu", "not supported by the Edge TPU compiler <v16>", "head.1"),
                ("MEAN", "cpu-after-fallback", "after the first CPU op", "head.6"),
                ("FULLY_CONNECTED", "cpu-after-fallback", "after the first CPU op", "head.7"),
            ]
        )
    ]
    return {
        "target": target,
        "target_description": "Coral Dev Board <Edge TPU> & co",
        "profile": {
            "budgets": {"latency_ms": 0.5, "max_accuracy_drop": 0.02, "max_size_kb": 1024},
            "hardware": {"accelerator": "edgetpu"},
        },
        "profile_sha256": "ab" * 32,
        "model": "fmnist_cnn",
        "data": {"test": "fashion-mnist:test", "calibration": "calibration_data/fashion_mnist_train_500.npz"},
        "test_images": 10000,
        "shipped_precision": "int8",
        "baseline": {
            "params": 142634,
            "macs": 22605578,
            "accuracy_torch": 0.9019,
            "tflite": _variant(0.9023, 0.094, 158272),
        },
        "pruned": {
            "enabled": True,
            "params": 62482,
            "macs": 10702490,
            "keep_target": 0.5,
            "keep_achieved": 0.4734,
            "metric": "macs",
            "accuracy_torch_before_finetune": 0.5158,
            "accuracy_torch": 0.8943,
            "finetune_steps": 235,
            "finetune_images": 30000,
            "layers": [
                {"name": "stem.0", "kind": "conv", "before": 32, "after": 24},
                {"name": "block.0", "kind": "conv", "before": 64, "after": 40},
                {"name": "head.7", "kind": "linear", "before": 10, "after": 10},
            ],
        },
        "variants": {
            "fp32": _variant(0.8943, 0.277, 253212, energy=_energy(PMIC, Power(kind="rpi5_pmic", idle_w=2.7), 0.33)),
            "fp16": _variant(0.8943, 0.273, 130376),
            "int8": _variant(0.8946, 0.0927, 74480, energy=_energy(None, Power(active_w=4.4, idle_w=2.7), 0.0927)),
        },
        "latency_model": None,
        "devices": {
            "pi-desk": {
                "error": None,
                "failed": {},
                "machine": "aarch64",
                "results": {"model_int8.tflite": {"p50": 1.25, "p99": 2.5, "runtime": "tflite_runtime 2.14"}},
            },
            "pi-lab": {
                "error": "ssh: connect to host pi-lab port 22: No route to host",
                "failed": {},
                "machine": None,
                "results": {},
            },
        },
        "budgets": [
            {"name": "accuracy drop", "limit": 0.02, "value": 0.0073, "status": "met", "note": "vs unpruned"},
            {
                "name": "latency p50 (ms)",
                "limit": 0.5,
                "value": 0.0927,
                "status": "not checked",
                "note": "measured on vm, not on a coral device",
            },
        ],
        "edgetpu": {"status": "partial", "tpu_ops": 3, "cpu_ops": 4, "sram_mb": 8.0, "analysis": {"ops": ops}},
        "stages": {"baseline": {"seconds": 18.3, "skipped": True}, "convert": {"seconds": 14.7, "skipped": False}},
        "tools": {"edgeship": "0.1.0", "onnx2tf": "1.29.24"},
    }


def sparse_summary() -> dict[str, Any]:
    """A deploy that pruned nothing and measured no energy, on a CPU target."""
    s = full_summary("host")
    s["profile"] = {"budgets": {"latency_ms": None, "max_accuracy_drop": 0.02}, "hardware": {"accelerator": "none"}}
    s["pruned"] = {"enabled": False, "params": 142634, "macs": 22605578, "layers": []}
    for v in s["variants"].values():
        v.pop("energy", None)
        v.pop("latency_quantiles_ms")
    s["edgetpu"] = None
    return s


# ----------------------------------------------------------------------------------------- browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium not installed: run .ci/setup_report.sh (apt-get install chromium) for the browser checks")


def _browser(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    argv = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def loaded_images(html_text: str, tmp: Path) -> list[dict[str, Any]]:
    """Open the page in headless Chromium; the image states a script recorded after the load event."""
    page = tmp / "checked.html"
    page.write_text(html_text.replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    proc = _browser(["--dump-dom", page.as_uri()], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'data-images="([^"]*)"', proc.stdout)
    assert m, f"the check script did not run; DOM starts {proc.stdout[:300]!r}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot_ink(html_path: Path, tmp: Path) -> float:
    """The share of non-white pixels in a screenshot of the page (0 for a blank page)."""
    from PIL import Image

    shot = tmp / "shot.png"
    proc = _browser(["--hide-scrollbars", "--window-size=1000,3000", f"--screenshot={shot}", html_path.as_uri()], tmp)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    gray = Image.open(shot).convert("L")
    hist = gray.histogram()
    return 1 - sum(hist[245:]) / (gray.width * gray.height)


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_full_report_renders_in_chromium_with_every_image_loaded(tmp_path: Path) -> None:
    files = write_report(full_summary(), tmp_path / "out")
    text = files.html.read_text(encoding="utf-8")
    images = loaded_images(text, tmp_path)
    alts = [i["alt"] for i in images]
    assert alts == [
        "accuracy vs latency",
        "latency distribution",
        "channels per layer",
        "energy per inference",
        "Edge TPU op map",
    ]
    assert all(i["complete"] and i["w"] > 100 and i["h"] > 50 for i in images), images
    assert screenshot_ink(files.html, tmp_path) > 0.02
    assert files.markdown.read_text().startswith("# edgeship deploy report: `fmnist_cnn` for `coral`")


@pytest.mark.slow
def test_report_with_missing_data_says_not_measured_and_still_loads(tmp_path: Path) -> None:
    text = render_html(sparse_summary())
    assert "channels per layer: pruning disabled for this target." in text
    assert "energy per inference: not measured." in text
    assert "<h2>Edge TPU" not in text  # a CPU target has no Edge TPU section
    images = loaded_images(text, tmp_path)
    assert [i["alt"] for i in images] == ["accuracy vs latency", "latency distribution"]
    assert all(i["complete"] and i["w"] > 0 for i in images)


@pytest.mark.slow
def test_comparison_page_renders_with_links(tmp_path: Path) -> None:
    text = render_comparison([full_summary("coral"), sparse_summary()], links={"coral": "coral/report.html"})
    images = loaded_images(text, tmp_path)
    assert len(images) == 1 and images[0]["w"] > 100
    assert '<a href="coral/report.html">coral</a>' in text
    assert "0.408 mJ (estimated)" in text


def test_the_page_is_self_contained_and_escaped() -> None:
    text = render_html(full_summary())
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # every image inline, nothing fetched
    assert "Coral Dev Board &lt;Edge TPU&gt; &amp; co" in text and "<Edge TPU>" not in text
    assert "compiler &lt;v16&gt;" in text
    assert '<td>pi-desk</td><td>aarch64</td><td>model_int8.tflite</td><td class="n">1.25 ms</td>' in text
    assert "error: ssh: connect to host pi-lab port 22: No route to host" in text
    assert "0.4079 mJ" in text and "estimated from the profile" in text and "measured (rpi5 PMIC, 200 samples" in text
    assert "from the 5%-step quantiles the runner records" in text
    assert "recorded percentiles only" in render_html(sparse_summary())


def test_edgetpu_ops_are_read_from_the_stage_folder(tmp_path: Path) -> None:
    s = full_summary()
    ops = s["edgetpu"].pop("analysis")["ops"]
    (tmp_path / "edgetpu.json").write_text(json.dumps({"analysis": {"ops": ops}}))
    s["edgetpu"]["dir"] = str(tmp_path)
    text = render_html(s)
    assert 'alt="Edge TPU op map"' in text and "HARD_SWISH" in text
    s["edgetpu"]["dir"] = str(tmp_path / "gone")
    assert "Edge TPU op map: not measured." in render_html(s)


@pytest.mark.parametrize("key", list(full_summary()))
def test_any_missing_field_renders_rather_than_crashes(key: str) -> None:
    s = full_summary()
    del s[key]
    text = render_html(s)
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")


def test_empty_variants_read_not_measured() -> None:
    s = full_summary()
    s["variants"] = {"int8": {}}
    s["baseline"] = {}
    text = render_html(s)
    assert "accuracy vs latency: not measured." in text and "latency distribution: not measured." in text


def test_rebuild_from_a_finished_run_without_running_stages(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "coral").mkdir(parents=True)
    (runs / "coral" / "summary.json").write_text(json.dumps(full_summary()))
    files = rebuild_report("coral", runs_dir=runs)
    assert files.html == runs / "coral" / "report.html" and files.html.read_text().startswith("<!DOCTYPE html>")
    assert "| int8 | 74,480 B |" in files.markdown.read_text()
    (runs / "host").mkdir()
    (runs / "host" / "summary.json").write_text(json.dumps(sparse_summary()))
    page = compare_targets(["coral", "host"], runs_dir=runs, out=tmp_path / "artifacts" / "compare.html")
    assert '<a href="../runs/coral/report.html">coral</a>' in page.read_text()


def test_rebuild_without_a_finished_run_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "runs" / "android" / "prune").mkdir(parents=True)
    (tmp_path / "runs" / "android" / "prune" / "manifest.json").write_text("{}")
    with pytest.raises(PipelineError, match=r"summary\.json: missing .*`make deploy TARGET=android`"):
        rebuild_report("android", runs_dir=tmp_path / "runs")


def test_markdown_of_an_incomplete_summary_is_a_short_stand_in(tmp_path: Path) -> None:
    s = copy.deepcopy(sparse_summary())
    del s["baseline"]
    files = write_report(s, tmp_path)
    assert "lacks" in files.markdown.read_text() and files.html.is_file()


def test_a_search_trial_that_landed_on_a_tried_model_is_named_and_counted_once() -> None:
    """A keep that the channel multiples round onto a model already tried reuses that trial's score (`same_as`):
    the report says so in both formats and counts only the trials that were fine-tuned; the Pareto plot renders."""
    from pipeline.report.markdown import render_markdown
    from pipeline.report.search_figures import search_trials

    s = full_summary()
    row = {"keep_target": 0.575, "keep_achieved": 0.545, "macs": 12_000_000, "params": 70_000,
           "val_accuracy": 0.891, "passed": True, "seconds": 30.0}  # fmt: skip
    trials = [row, {**row, "keep_target": 0.36, "keep_achieved": 0.30, "macs": 6_000_000, "val_accuracy": 0.87,
                    "passed": False}, {**row, "keep_target": 0.55, "seconds": 0.5, "same_as": 0}]  # fmt: skip
    s["pruned"]["search"] = {"trials": trials, "chosen": 0, "trials_scored": 2, "base_val_accuracy": 0.903,
                             "edge_val_accuracy": 0.883, "max_accuracy_drop": 0.02,
                             "distance_to_edge": 0.008}  # fmt: skip
    md = render_markdown(s)
    assert "Accuracy search (`pruning.target: {metric: accuracy}`): 2 trials" in md
    assert "(the model of trial 1, not fine-tuned again)" in md
    assert "the model of trial 1, not fine-tuned again" in render_html(s)
    png = search_trials(s)
    assert png is not None and png.startswith(b"\x89PNG")
