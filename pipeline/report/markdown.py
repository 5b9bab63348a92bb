"""The Markdown report (`report.md`), rendered from a deploy's summary."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.report import quant_figures
from pipeline.report.format import pct, ratio

log = logging.getLogger(__name__)


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The deploy's Markdown report; a summary missing a field the Markdown needs gets a short stand-in."""
    try:
        return _render(summary)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("Markdown report incomplete (%s missing or malformed); wrote a short one", exc)
        return (
            f"# edgeship deploy report: `{summary.get('model', '?')}` for `{summary.get('target', '?')}`\n\n"
            f"The run's summary lacks {exc}; the HTML report beside this file shows what was measured.\n"
        )


def _render(s: Mapping[str, Any]) -> str:
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
        f"| parameters | {base['params']:,} | {pr['params']:,} | {ratio(pr['params'], base['params'])} |",
        f"| MACs | {base['macs']:,} | {pr['macs']:,} | {ratio(pr['macs'], base['macs'])} |",
        f"| PyTorch accuracy | {pct(base['accuracy_torch'])} | {pct(pr['accuracy_torch'])} | |",
        f"| {ship} .tflite size | {bt['size_bytes']:,} B | {st['size_bytes']:,} B "
        f"| {ratio(st['size_bytes'], bt['size_bytes'])} |",
        f"| {ship} .tflite accuracy | {pct(bt['accuracy'])} | {pct(st['accuracy'])} | |",
        f"| {ship} latency p50 | {bt['latency_ms']['p50']:.3f} ms | {st['latency_ms']['p50']:.3f} ms "
        f"| {ratio(st['latency_ms']['p50'], bt['latency_ms']['p50'])} |",
        f"| {ship} peak RSS (model) | {bt['model_rss_kib']:,} KiB | {st['model_rss_kib']:,} KiB | |",
        "",
    ]
    lines += _pruning(pr)
    lines += _variants(s)
    lines += _energy(s)
    lines += _devices(s)
    lines += _latency_model(s)
    lines += _edgetpu(s)
    lines += quant_figures.markdown_lines(s)
    lines += _tail(s)
    return "\n".join(lines)


def _pruning(pr: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if pr["enabled"]:
        lines += [
            f"Pruning target: keep {pr['keep_target']:.0%} of {pr['metric']}; achieved {pr['keep_achieved']:.1%}"
            f"{_allocation(pr)}. Validation accuracy right after pruning ({_recovery(pr.get('recovery'))}) "
            f"{pct(pr['accuracy_torch_before_finetune'])}; after {pr['finetune_steps']} distillation steps "
            f"({pr['finetune_images']:,} images{_best(pr)}) test accuracy {pct(pr['accuracy_torch'])}.",
            "",
        ]
        lines += _finetune_run(pr.get("finetune"))
        if pr.get("allocation_note"):
            lines += [f"Target not met within 2%: {pr['allocation_note']}.", ""]
        lines += _search(pr.get("search")) + _iterative(pr.get("iterative"))
    return lines


def _recovery(rec: Mapping[str, Any] | None) -> str:
    """How the pruned model was recovered before fine-tuning."""
    if not rec:
        return "BatchNorm re-estimated"  # a run cached before pruning.reconstruct existed
    if "refitted_layers" in rec:
        return (f"{rec['refitted_layers']} layers refitted by least squares on {rec['images']} training images, "
                f"median relative output error {rec['median_relative_error']:.3f}")  # fmt: skip
    return str(rec.get("recovery"))


def _finetune_run(ft: Mapping[str, Any] | None) -> list[str]:
    """Where fine-tuning ran and how fast; training images resized to the model's input, counted."""
    if not ft or not ft.get("device"):
        return []
    ranks = f" x {ft['world_size']} processes (DDP)" if (ft.get("world_size") or 1) > 1 else ""
    rate = f"{ft['images_per_s']:,.0f} images/s" if ft.get("images_per_s") else "throughput not measured"
    line = f"Fine-tuning ran on {ft['device']}{ranks}: {rate}"
    if ft.get("seconds") is not None:
        line += f" over {ft['seconds']:.1f} s of training"
    if ft.get("resized"):
        line += f"; {ft['resized']:,} of the training images read were resized to the model's input"
    return [line + ".", ""]


def _search(search: Mapping[str, Any] | None) -> list[str]:
    if not search:
        return []
    trials, chosen = search["trials"], search.get("chosen")
    n = search.get("trials_scored", len(trials))
    head = (f"Accuracy search (`pruning.target: {{metric: accuracy}}`): {n} trials, each pruned, "
            f"fine-tuned briefly and scored on the validation split against the edge "
            f"{pct(search['edge_val_accuracy'])} (unpruned {pct(search['base_val_accuracy'])} minus the "
            f"{100 * search['max_accuracy_drop']:.1f}-point budget); ")  # fmt: skip
    head += ("no pruned trial stayed within it, so the model is not pruned." if chosen is None else
             f"chosen: trial {chosen + 1}, {pct(trials[chosen]['keep_achieved'])} of the MACs, "
             f"{100 * search['distance_to_edge']:.2f} points above the edge.")  # fmt: skip
    lines = [head, "", "| trial | keep asked | MACs kept | val accuracy | within budget | seconds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for i, t in enumerate(trials):
        kept = "n/a" if t["keep_achieved"] is None else pct(t["keep_achieved"])
        acc = t.get("error") or pct(t["val_accuracy"])
        if t.get("same_as") is not None:
            acc += f" (the model of trial {t['same_as'] + 1}, not fine-tuned again)"
        lines.append(f"| {i + 1}{' (chosen)' if i == chosen else ''} | {pct(t['keep_target'])} | {kept} | {acc} "
                     f"| {'yes' if t['passed'] else 'no'} | {t['seconds']} |")  # fmt: skip
    return [*lines, ""]


def _iterative(rows: Sequence[Mapping[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    steps = ", ".join(f"{pct(r['keep_achieved'])}" for r in rows)
    return [f"Iterative pruning: {len(rows)} steps (MACs kept after each: {steps}), BatchNorm re-estimated after "
            f"each and {rows[0]['distilled_steps']} distillation steps between them.", ""]  # fmt: skip


def _allocation(pr: Mapping[str, Any]) -> str:
    method, guard = pr.get("allocation"), pr.get("uniform_guard")
    if method == "sensitivity" and guard and guard.get("uniform") is None:
        return ", channels allocated from the measured sensitivity (uniform guard: no uniform cut is that small)"
    if method == "sensitivity" and guard:
        s, u = guard["sensitivity"], guard["uniform"]
        scores = (f"validation accuracy {pct(s['val_accuracy'])} for the measured allocation, {pct(u['val_accuracy'])}"
                  f" for a uniform cut of the same size")  # fmt: skip
        if guard["chosen"] == "uniform":
            return f", the same share of every layer (uniform guard: {scores})"
        return f", channels allocated from the measured sensitivity (uniform guard: {scores})"
    return {"sensitivity": ", channels allocated from the measured sensitivity", "uniform": ", the same share of "
            "every layer", "global": ", channels ranked across layers (global)"}.get(method, "")  # fmt: skip


def _best(pr: Mapping[str, Any]) -> str:
    step = pr.get("finetune_best_step")
    return f", best validation checkpoint at step {step}" if step is not None else ""


def _variants(s: Mapping[str, Any]) -> list[str]:
    st = s["variants"][s["shipped_precision"]]
    lines = [
        "## Every variant",
        "",
        "| precision | size | accuracy | top-1 agreement vs PyTorch | max abs logit diff | p50 ms | p90 ms "
        "| p99 ms | peak RSS KiB | runtime |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, v in s["variants"].items():
        lat = v["latency_ms"]
        lines.append(
            f"| {p} | {v['size_bytes']:,} B | {pct(v['accuracy'])} | {pct(v['agreement'])} "
            f"| {v['max_abs_diff']:.4g} | {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} "
            f"| {v['peak_rss_kib']:,} | {v['runtime']}{' +XNNPACK' if v['xnnpack'] else ''}, {v['threads']} thr |"
        )
    lines += ["", f"Latency: {st['runs']} timed runs after warm-up, measured on {st['measured_on']}.", ""]
    choice = s.get("precision_choice")
    if choice:
        drops = ", ".join(f"{r['precision']} {_points(r['accuracy_drop'])}" for r in choice["candidates"])
        lines += [f"Shipped precision chosen by `quantize.ship: auto`: **{choice['chosen']}**, {choice['why']} "
                  f"(p50 above; accuracy drop from unpruned PyTorch: {drops}).", ""]  # fmt: skip
    return lines


def _points(drop: float | None) -> str:
    return "n/a" if drop is None else f"{100 * drop:.2f} points"


def _energy(s: Mapping[str, Any]) -> list[str]:
    st = s["variants"][s["shipped_precision"]]
    lines: list[str] = []
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
    return lines


def _devices(s: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
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
    return lines


def _latency_model(s: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
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
        if (lm.get("table") or {}).get("where"):
            lines += [f"The {lm['table']['where']}.", ""]
    return lines


def _edgetpu(s: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if et := s.get("edgetpu"):
        lines += [
            "## Edge TPU",
            "",
            f"Status: **{et['status']}** ({et['tpu_ops']} ops on the Edge TPU, {et['cpu_ops']} on the CPU), "
            f"checked from the .tflite itself against the published rules; on-chip memory {et['sram_mb']:g} MiB.",
            "",
            *_rewrites(et.get("rewrites")),
            et.get("markdown") or "",
            "",
        ]
    return lines


def _rewrites(rw: Mapping[str, Any] | None) -> list[str]:
    """The exact rewrites applied before export (with the layer each touched) and the suggestions left."""
    if not rw:
        return []
    lines = [f"- Rewritten before export: `{r['layer']}` {r['before']} -> {r['after']} (max abs diff "
             f"{r['max_abs_diff']:.2g})." for r in rw.get("applied") or []]  # fmt: skip
    lines += [f"- Suggestion (not applied, it changes the numbers): `{s['layer']}` ({s['layer_type']}): "
              f"{s['what_to_change']}." for s in rw.get("suggestions") or []]  # fmt: skip
    return [*lines, ""] if lines else []


def _tail(s: Mapping[str, Any]) -> list[str]:
    pr = s["pruned"]
    lines = ["## Budgets", "", "| budget | limit | value | status | note |", "|---|---|---|---|---|"]
    for b in s["budgets"]:
        lines.append(f"| {b['name']} | {b['limit']} | {b['value']} | **{b['status']}** | {b['note']} |")
    if pr["layers"]:
        lines += ["", "## Channels per layer", "", "| layer | kind | before | after |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['kind']} | {r['before']} | {r['after']} |" for r in pr["layers"]]
    lines += ["", "## Stages", "", "| stage | seconds | |", "|---|---|---|"]
    for name, st_ in s["stages"].items():
        lines.append(f"| {name} | {st_['seconds']:.1f} | {'cached' if st_['skipped'] else 'ran'} |")
    lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in s["tools"].items()), ""]
    return lines
