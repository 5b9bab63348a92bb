"""The summary of a deploy: every figure the report, the bundle manifest and `make report` read.

Built once from the stages' typed results; written as `runs/<target>/summary.json`, from which the Markdown and
HTML reports are rendered (again by `make report`, without running any stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.quantize.budget import quant_budget_rows
from pipeline.runner import tool_versions
from pipeline.stages import BASELINE, CONVERT, EDGETPU, FINETUNE, PROFILE, PRUNE, SENSITIVITY, VERIFY, Context
from pipeline.stages.latency_table import table_summary
from pipeline.stages.verify import baseline_label


def _energy(prof: Mapping[str, Any], power: Any) -> dict[str, Any] | None:
    """Energy per inference: measured when the runner sampled a sensor, else estimated from the profile's
    power figures (labelled estimated), else None."""
    from pipeline.power.energy import energy_summary

    pw = prof.get("power") or {}
    lat = prof["latency_ms"]
    s = energy_summary(pw.get("idle"), pw.get("active"), latency_ms=lat.get("mean", lat["p50"]),
                       inferences=prof["runs"], profile_power=power, sampled="power" in prof)  # fmt: skip
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


def summarize(ctx: Context) -> dict[str, Any]:
    """Every figure of the finished chain, as plain JSON values."""
    t, req = ctx.target, ctx.req
    base, pruned, tuned = ctx.get(BASELINE), ctx.get(PRUNE), ctx.get(FINETUNE)
    ver, prof = ctx.get(VERIFY), ctx.get(PROFILE).files
    ver_pruned, ver_base = ver.by_precision("pruned"), ver.by_precision("baseline")
    variants = {p: _variant(prof[p], ver_pruned.get(p), t.power) for p in t.quantize.precisions}
    ship, choice = _shipped_precision(t, variants, base.accuracy)
    shipped = variants[ship]
    dev = prof[ship]["device"]
    on_device = dev["transport"] != "local" or (t.transport.kind == "local" and t.hardware.arch == dev["machine"])
    return {
        "target": t.name,
        "target_description": t.description,
        "profile": t.model_dump(mode="json"),
        "profile_sha256": t.digest(),
        "model": req.spec.name,
        "data": req.data.describe(),
        "test_images": base.test_images,
        "val_images": len(req.data.val),
        "shipped_precision": ship,
        "precision_choice": choice,
        "baseline": {
            "params": base.params, "macs": base.macs, "accuracy_torch": base.accuracy,
            "tflite": _variant(prof[baseline_label(ship, t.quantize.plan_precision)], ver_base.get(ship), t.power),
        },
        "pruned": {
            "enabled": pruned.enabled,
            "params": tuned.params, "macs": tuned.macs,
            "keep_target": pruned.figure("keep_target"), "keep_achieved": pruned.figure("keep_achieved"),
            "metric": pruned.figure("metric"),
            "accuracy_torch_before_finetune": pruned.accuracy_before_finetune,  # validation split
            "allocation": (pruned.allocation or {}).get("method"),
            "allocation_note": (pruned.allocation or {}).get("why_not_within"),
            "search": (pruned.allocation or {}).get("search"),  # metric: accuracy, every trial
            "iterative": (pruned.allocation or {}).get("iterative"),  # pruning.steps > 1, every step
            "recovery": (pruned.allocation or {}).get("recovery"),  # refit or BatchNorm, before fine-tuning
            "uniform_guard": (pruned.allocation or {}).get("uniform_guard"),  # sensitivity vs a uniform cut
            "finetune_best_step": tuned.best_step,
            "accuracy_torch": tuned.accuracy,
            "finetune_steps": tuned.steps, "finetune_images": tuned.images_seen,
            "finetune": _finetune_run(tuned),
            "layers": pruned.layers,
        },
        "variants": variants,
        "latency_model": _latency_model(pruned.latency, shipped, table_summary(ctx, ctx.get(PROFILE).devices)),
        "budgets": _budgets(t, base_acc=base.accuracy, shipped=shipped, on_device=on_device, edgetpu=_edgetpu(ctx))
        + quant_budget_rows(_quantization(ctx), ship),
        "quantization": _quantization(ctx),
        "devices": device_rows(ctx.get(PROFILE).devices),
        "op_profile": getattr(ctx.get(PROFILE), "op_profile", None),  # per op on the device (where the time goes)
        "edgetpu": _edgetpu(ctx),
        "sensitivity": ctx.get(SENSITIVITY).curves() if ctx.has(SENSITIVITY) else None,
        "stages": {n: {"seconds": r.seconds, "skipped": r.skipped} for n, r in ctx.records.items()},
        "tools": tool_versions(),
    }  # fmt: skip


def _finetune_run(tuned: Any) -> dict[str, Any]:
    """Where and how fast fine-tuning ran (issue 18), and what the training images needed."""
    return {"device": tuned.device, "world_size": tuned.world_size, "images_per_s": tuned.images_per_s,
            "seconds": tuned.train_seconds, "train_images": tuned.train_images, "resized": tuned.resized,
            "data_workers": tuned.data_workers, "batchnorm": "frozen" if tuned.bn_frozen else "training"}  # fmt: skip


def _shipped_precision(t: Any, variants: Mapping[str, Any], base_acc: float) -> tuple[str, dict[str, Any] | None]:
    if t.quantize.ship != "auto":
        return t.quantize.ship, None
    from pipeline.report.precision import choose_precision

    return choose_precision(variants, t.quantize.precisions, base_acc=base_acc, max_drop=t.budgets.max_accuracy_drop)


def device_rows(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Per device: p50/p99 per model file, or its error (several devices profiled in parallel). Entries of
    runs/<target>/profile-devices.json also say when they were measured and the device's last failure."""
    if not record:
        return None
    out = {}
    for name, run in record.items():
        last = run.get("last_failure") or {}
        out[name] = {
            "measured_at": run.get("measured_at"),
            "error": run.get("error") or (f"last run failed at {last['at']}: {last['error']}" if last else None),
            "failed": run.get("failed") or {},
            "machine": (run.get("info") or {}).get("machine"),
            "results": {m: {"p50": r["latency_ms"]["p50"], "p99": r["latency_ms"].get("p99"),
                            "runtime": f"{r.get('runtime')} {r.get('runtime_version')}"}
                        for m, r in (run.get("results") or {}).items()},
        }  # fmt: skip
    return out


def _quantization(ctx: Context) -> dict[str, Any] | None:
    """The int8 remedies' record (pipeline/quantize/remedies.py) of the convert stage, when int8 was built."""
    q = getattr(ctx.get(CONVERT), "quantization", None)
    return None if q is None else dict(q)


def _edgetpu(ctx: Context) -> dict[str, Any] | None:
    """The Edge TPU stage's figures plus its Markdown table, for the report and the bundle."""
    if not ctx.has(EDGETPU):
        return None
    et = ctx.get(EDGETPU)
    md = et.markdown_path
    return {**et.figures, "markdown": md.read_text(encoding="utf-8") if md.is_file() else None,
            "dir": str(et.folder)}  # fmt: skip


def _latency_model(fig: Mapping[str, Any] | None, shipped: Mapping[str, Any],
                   table: Mapping[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Prediction beside measurement for a model pruned against the latency table (measured on the table's
    own device where the profile stage timed it there)."""
    if not fig:
        return None
    measured = (table or {}).get("shipped_ms") or shipped["latency_ms"]["p50"]
    return {
        "budget_ms": fig["budget_ms"],
        "predicted_ms": fig["predicted_ms"],
        "measured_ms": measured,
        "error_pct": round(100 * (fig["predicted_ms"] - measured) / measured, 1),
        "unpruned_measured_ms": fig["unpruned_measured_ms"],
        "remainder_ms": fig["remainder_ms"],
        "plan": fig["plan"],
        "table": dict(table) if table else None,  # where the table was measured (latency_table stage)
    }


def _budget_row(name: str, limit: float, value: float, note: str, *, digits: int | None = None) -> dict[str, Any]:
    """One budget: met when the measured `value` is at most `limit` (shown rounded to `digits`)."""
    shown = value if digits is None else round(value, digits)
    return {"name": name, "limit": limit, "value": shown, "status": "met" if value <= limit else "missed",
            "note": note}  # fmt: skip


def _budgets(t: Any, *, base_acc: float, shipped: Mapping[str, Any], on_device: bool,
             edgetpu: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    from pipeline.edgetpu.budget import edgetpu_budget_rows

    b = t.budgets
    drop = base_acc - shipped["accuracy"]
    rows = [_budget_row("accuracy drop", b.max_accuracy_drop, drop, "vs unpruned PyTorch", digits=4)]
    if b.max_size_kb is not None:
        kb = shipped["size_bytes"] / 1024
        rows.append(_budget_row("size (KiB)", b.max_size_kb, kb, "shipped model.tflite", digits=1))
    if b.latency_ms is not None:
        p50 = shipped["latency_ms"]["p50"]
        if on_device:
            rows.append(_budget_row("latency p50 (ms)", b.latency_ms, p50, shipped["measured_on"]))
        else:
            note = f"measured on {shipped['measured_on']}, not on a {t.name} device"
            rows.append({**_budget_row("latency p50 (ms)", b.latency_ms, p50, note), "status": "not checked"})
    return rows + edgetpu_budget_rows(b, edgetpu)
