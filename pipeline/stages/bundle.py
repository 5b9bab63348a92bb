"""The summary of a deploy, its budgets, the readable report, and the published bundle.

The bundle folder `artifacts/<target>/` is built beside itself and renamed into place when whole: a
failed run leaves the previous bundle untouched.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.artifacts import (
    fresh_temp_dir,
    replace_dir,
    sha256_file,
    wait_lock,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.runner import StageRecord, tool_versions

if TYPE_CHECKING:
    from pipeline.deploy import DeployRequest


def _energy(prof: Mapping[str, Any], power: Any) -> dict[str, Any] | None:
    """Energy per inference: measured when the runner sampled a sensor, else estimated from the profile's
    power figures (labelled estimated), else None."""
    from pipeline.power.energy import energy_summary

    pw = prof.get("power") or {}
    lat = prof["latency_ms"]
    s = energy_summary(pw.get("idle"), pw.get("active"), latency_ms=lat.get("mean", lat["p50"]),
                       inferences=prof["runs"], profile_power=power)  # fmt: skip
    return s if s.get("available") else None


def _variant(prof: Mapping[str, Any], ver: Mapping[str, Any] | None, power: Any = None) -> dict[str, Any]:
    lat = prof["latency_ms"]
    out = {
        "size_bytes": prof["size_bytes"],
        "latency_ms": lat,
        "peak_rss_kib": prof["peak_rss_kib"],
        "model_rss_kib": prof["model_rss_kib"],
        "runtime": f"{prof['runtime']} {prof['runtime_version']}",
        "xnnpack": prof["xnnpack"],
        "threads": prof["threads"],
        "runs": prof["runs"],
        "measured_on": f"{prof['device']['name']} ({prof['device']['machine']}, {prof['device']['transport']})",
        "latency_quantiles_ms": prof.get("quantiles_ms"),
        "energy": _energy(prof, power) if power is not None else None,
    }
    if ver is not None:
        out.update({k: ver.get(k) for k in ("accuracy", "agreement", "max_abs_diff", "mean_abs_diff")})
    return out


def _verify_by_precision(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {r["precision"]: r for r in report["precisions"]}


def summarize(req: DeployRequest, *, records: Mapping[str, StageRecord]) -> dict[str, Any]:
    t = req.target
    base, pruned, tuned = records["baseline"].figures, records["prune"].figures, records["finetune"].figures
    ver, prof = records["verify"].figures, records["profile"].figures
    ship = t.quantize.ship
    ver_pruned = _verify_by_precision(ver["pruned"])
    ver_base = _verify_by_precision(ver["baseline"])
    variants = {p: _variant(prof[p], ver_pruned.get(p), t.power) for p in t.quantize.precisions}
    baseline_tflite = _variant(prof["baseline"], ver_base.get(ship), t.power)
    shipped = variants[ship]
    dev = prof[ship]["device"]
    on_device = dev["transport"] != "local" or (t.transport.kind == "local" and t.hardware.arch == dev["machine"])
    budgets = _budgets(t, base_acc=base["accuracy"], shipped=shipped, on_device=on_device)
    return {
        "target": t.name,
        "target_description": t.description,
        "profile": t.model_dump(mode="json"),
        "profile_sha256": t.digest(),
        "model": req.spec.name,
        "data": req.data.describe(),
        "test_images": base["test_images"],
        "shipped_precision": ship,
        "baseline": {
            "params": base["params"], "macs": base["macs"], "accuracy_torch": base["accuracy"],
            "tflite": baseline_tflite,
        },
        "pruned": {
            "enabled": pruned.get("enabled", False),
            "params": tuned["params"], "macs": tuned["macs"],
            "keep_target": pruned.get("keep_target"), "keep_achieved": pruned.get("keep_achieved"),
            "metric": pruned.get("metric"),
            "accuracy_torch_before_finetune": pruned.get("accuracy_before_finetune"),
            "accuracy_torch": tuned["accuracy"],
            "finetune_steps": tuned["steps"], "finetune_images": tuned["images_seen"],
            "layers": pruned.get("layers", []),
        },
        "variants": variants,
        "latency_model": _latency_model(pruned.get("latency"), shipped),
        "budgets": budgets,
        "devices": _devices(prof.get("devices")),
        "edgetpu": _edgetpu(records),
        "stages": {n: {"seconds": r.seconds, "skipped": r.skipped} for n, r in records.items()},
        "tools": tool_versions(),
    }  # fmt: skip


def _devices(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Per device: p50/p99 per model file, or its error (several devices profiled in parallel)."""
    if not record:
        return None
    out = {}
    for name, run in record.items():
        out[name] = {
            "error": run.get("error"),
            "failed": run.get("failed") or {},
            "machine": (run.get("info") or {}).get("machine"),
            "results": {m: {"p50": r["latency_ms"]["p50"], "p99": r["latency_ms"].get("p99"),
                            "runtime": f"{r.get('runtime')} {r.get('runtime_version')}"}
                        for m, r in (run.get("results") or {}).items()},
        }  # fmt: skip
    return out


def _edgetpu(records: Mapping[str, StageRecord]) -> dict[str, Any] | None:
    """The Edge TPU stage's figures plus its Markdown table, for the report and the bundle."""
    rec = records.get("edgetpu")
    if rec is None:
        return None
    md = rec.path("edgetpu.md")
    return {**rec.figures, "markdown": md.read_text(encoding="utf-8") if md.is_file() else None,
            "dir": str(rec.folder)}  # fmt: skip


def _latency_model(fig: Mapping[str, Any] | None, shipped: Mapping[str, Any]) -> dict[str, Any] | None:
    """Prediction beside measurement for a model pruned against the latency table."""
    if not fig:
        return None
    measured = shipped["latency_ms"]["p50"]
    return {
        "budget_ms": fig["budget_ms"],
        "predicted_ms": fig["predicted_ms"],
        "measured_ms": measured,
        "error_pct": round(100 * (fig["predicted_ms"] - measured) / measured, 1),
        "unpruned_measured_ms": fig["unpruned_measured_ms"],
        "remainder_ms": fig["remainder_ms"],
        "plan": fig["plan"],
    }


def _budgets(t: Any, *, base_acc: float, shipped: Mapping[str, Any], on_device: bool) -> list[dict[str, Any]]:
    b = t.budgets
    rows = []
    drop = base_acc - shipped["accuracy"]
    rows.append(
        {
            "name": "accuracy drop",
            "limit": b.max_accuracy_drop,
            "value": round(drop, 4),
            "status": "met" if drop <= b.max_accuracy_drop else "missed",
            "note": "vs unpruned PyTorch",
        }
    )
    if b.max_size_kb is not None:
        kb = shipped["size_bytes"] / 1024
        rows.append(
            {
                "name": "size (KiB)",
                "limit": b.max_size_kb,
                "value": round(kb, 1),
                "status": "met" if kb <= b.max_size_kb else "missed",
                "note": "shipped model.tflite",
            }
        )
    if b.latency_ms is not None:
        p50 = shipped["latency_ms"]["p50"]
        if on_device:
            rows.append(
                {
                    "name": "latency p50 (ms)",
                    "limit": b.latency_ms,
                    "value": p50,
                    "status": "met" if p50 <= b.latency_ms else "missed",
                    "note": shipped["measured_on"],
                }
            )
        else:
            rows.append(
                {
                    "name": "latency p50 (ms)",
                    "limit": b.latency_ms,
                    "value": p50,
                    "status": "not checked",
                    "note": f"measured on {shipped['measured_on']}, not on a {t.name} device",
                }
            )
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def render_report(s: Mapping[str, Any]) -> str:
    base, pr, ship = s["baseline"], s["pruned"], s["shipped_precision"]
    bt, st = base["tflite"], s["variants"][ship]
    lines = [
        f"# edgeship deploy report: `{s['model']}` for `{s['target']}`",
        "",
        f"{s['target_description']}  ",
        f"Test set: {s['data']['test']} ({s['test_images']} images). Calibration: {s['data']['calibration']}.  ",
        f"Shipped: `model.tflite` = {ship}. Profile sha256 `{s['profile_sha256'][:12]}`.",
        "",
        "## Before / after",
        "",
        "| | unpruned | pruned + fine-tuned | after / before |",
        "|---|---|---|---|",
        f"| parameters | {base['params']:,} | {pr['params']:,} | {_ratio(pr['params'], base['params'])} |",
        f"| MACs | {base['macs']:,} | {pr['macs']:,} | {_ratio(pr['macs'], base['macs'])} |",
        f"| PyTorch accuracy | {_pct(base['accuracy_torch'])} | {_pct(pr['accuracy_torch'])} | |",
        f"| {ship} .tflite size | {bt['size_bytes']:,} B | {st['size_bytes']:,} B "
        f"| {_ratio(st['size_bytes'], bt['size_bytes'])} |",
        f"| {ship} .tflite accuracy | {_pct(bt['accuracy'])} | {_pct(st['accuracy'])} | |",
        f"| {ship} latency p50 | {bt['latency_ms']['p50']:.3f} ms | {st['latency_ms']['p50']:.3f} ms "
        f"| {_ratio(st['latency_ms']['p50'], bt['latency_ms']['p50'])} |",
        f"| {ship} peak RSS (model) | {bt['model_rss_kib']:,} KiB | {st['model_rss_kib']:,} KiB | |",
        "",
    ]
    if pr["enabled"]:
        lines += [
            f"Pruning target: keep {pr['keep_target']:.0%} of {pr['metric']}; achieved {pr['keep_achieved']:.1%}. "
            f"Accuracy right after pruning {_pct(pr['accuracy_torch_before_finetune'])}, after "
            f"{pr['finetune_steps']} distillation steps ({pr['finetune_images']:,} images) "
            f"{_pct(pr['accuracy_torch'])}.",
            "",
        ]
    lines += [
        "## Every variant",
        "",
        "| precision | size | accuracy | top-1 agreement vs PyTorch | max abs logit diff | p50 ms | p90 ms "
        "| p99 ms | peak RSS KiB | runtime |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, v in s["variants"].items():
        lat = v["latency_ms"]
        lines.append(
            f"| {p} | {v['size_bytes']:,} B | {_pct(v['accuracy'])} | {_pct(v['agreement'])} "
            f"| {v['max_abs_diff']:.4g} | {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} "
            f"| {v['peak_rss_kib']:,} | {v['runtime']}{' +XNNPACK' if v['xnnpack'] else ''}, {v['threads']} thr |"
        )
    lines += ["", f"Latency: {st['runs']} timed runs after warm-up, measured on {st['measured_on']}.", ""]
    energies = {p: v["energy"] for p, v in s["variants"].items() if v.get("energy")}
    if energies:
        lines += ["## Energy per inference", "", "| precision | energy / inference | above idle | active W "
                  "| idle W | how |", "|---|---|---|---|---|---|"]  # fmt: skip
        for p, e in energies.items():
            tag = " (estimated)" if e["estimated"] else ""
            lines.append(
                f"| {p} | {e['energy_per_inference_mj']:.4g} mJ{tag} | {e['energy_per_inference_above_idle_mj']:.4g} mJ"
                f"{tag} | {e['active_w']:.3g}{tag} | {e['idle_w']:.3g}{tag} | {e['method']} |"
            )
        lines += ["", f"Energy per inference = average power x mean latency (latency measured on {st['measured_on']}).",
                  ""]  # fmt: skip
    if devs := s.get("devices"):
        lines += ["## Devices", "", "| device | machine | model file | p50 ms | p99 ms | runtime | status |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, d in devs.items():
            for m, r in d["results"].items():
                lines.append(
                    f"| {name} | {d['machine']} | {m} | {r['p50']:.4g} | {r['p99'] or 'n/a'} | {r['runtime']} | ok |"
                )
            for m, why in d["failed"].items():
                lines.append(f"| {name} | {d['machine']} | {m} | | | | failed: {why} |")
            if d["error"]:
                lines.append(f"| {name} | {d['machine']} | | | | | error: {d['error']} |")
        lines.append("")
    if lm := s.get("latency_model"):
        miss = lm["measured_ms"] - lm["budget_ms"]
        verdict = "meets it" if miss <= 0 else f"misses it by {miss:.4g} ms ({100 * miss / lm['budget_ms']:.1f}%)"
        lines += [
            "## Latency-aware pruning",
            "",
            "| budget ms | predicted ms | measured ms | prediction error | unpruned measured ms |",
            "|---|---|---|---|---|",
            f"| {lm['budget_ms']} | {lm['predicted_ms']:.4g} | {lm['measured_ms']:.4g} | {lm['error_pct']:+.1f}% "
            f"| {lm['unpruned_measured_ms']:.4g} |",
            "",
            f"Channels chosen against the measured per-layer table; the measured latency {verdict}.",
            "",
        ]
    if et := s.get("edgetpu"):
        lines += [
            "## Edge TPU",
            "",
            f"Status: **{et['status']}** ({et['tpu_ops']} ops on the Edge TPU, {et['cpu_ops']} on the CPU), "
            f"checked from the .tflite itself against the published rules; on-chip memory {et['sram_mb']:g} MiB.",
            "",
            et.get("markdown") or "",
            "",
        ]
    lines += ["## Budgets", "", "| budget | limit | value | status | note |", "|---|---|---|---|---|"]
    for b in s["budgets"]:
        lines.append(f"| {b['name']} | {b['limit']} | {b['value']} | **{b['status']}** | {b['note']} |")
    if pr["layers"]:
        lines += ["", "## Channels per layer", "", "| layer | kind | before | after |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['kind']} | {r['before']} | {r['after']} |" for r in pr["layers"]]
    lines += ["", "## Stages", "", "| stage | seconds | |", "|---|---|---|"]
    for name, st_ in s["stages"].items():
        lines.append(f"| {name} | {st_['seconds']:.1f} | {'cached' if st_['skipped'] else 'ran'} |")
    lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in s["tools"].items()), ""]
    return "\n".join(lines)


def write_report(summary: Mapping[str, Any], path: Path) -> None:
    write_json_atomic(path.with_name("summary.json"), summary)
    write_text_atomic(path, render_report(summary))


def _metadata(summary: Mapping[str, Any], req_spec: Mapping[str, Any], io: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": "edgeship-metadata/1",
        "target": summary["target"],
        "model": summary["model"],
        "precision": summary["shipped_precision"],
        "edgeship_version": __version__,
        **req_spec,
        **io,
    }


def publish(
    summary: Mapping[str, Any],
    conv: StageRecord,
    dest: Path,
    *,
    report_path: Path,
    spec_meta: Mapping[str, Any],
    io: Mapping[str, Any],
) -> Path:
    """Write the bundle into a temporary folder beside `dest`, then rename it into place. Two publishers of
    the same bundle (deploys with different --runs-dir) take turns: the lock covers the temporary folder too."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with wait_lock(dest.parent / f".{dest.name}.publish.lock"):
        tmp = fresh_temp_dir(dest.parent, dest.name)
        ship = summary["shipped_precision"]
        shutil.copyfile(conv.path(f"model_{ship}.tflite"), tmp / "model.tflite")
        (tmp / "variants").mkdir()
        for p in summary["variants"]:
            shutil.copyfile(conv.path(f"model_{p}.tflite"), tmp / "variants" / f"model_{p}.tflite")
        et = summary.get("edgetpu")
        if et and et.get("edgetpu_model"):
            shutil.copyfile(Path(et["dir"]) / et["edgetpu_model"], tmp / "model_edgetpu.tflite")
        if et:
            shutil.copyfile(Path(et["dir"]) / "edgetpu.json", tmp / "edgetpu.json")
        (tmp / "labels.txt").write_text("\n".join(spec_meta["class_names"]) + "\n", encoding="utf-8")
        write_json_atomic(tmp / "metadata.json", _metadata(summary, spec_meta, io))
        shutil.copyfile(report_path, tmp / "report.md")
        if (html := report_path.with_suffix(".html")).is_file():
            shutil.copyfile(html, tmp / "report.html")
        files = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        created = datetime.now(UTC).isoformat(timespec="seconds")
        manifest = {"format": "edgeship-bundle/1", "created": created, "files": files, "summary": summary}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        replace_dir(tmp, dest)
        return dest
