"""One self-contained HTML page per deploy (plots inline as base64 PNG, CSS inline, no scripts, no links out),
and a comparison page for several targets. Every value is escaped; a missing figure reads "not measured"."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.report.format import NOT_MEASURED, count, ms, num, pct

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#212121}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.5em 0}.muted{color:#757575}
.met{color:#2e7d32;font-weight:600}.missed{color:#c62828;font-weight:600}.unchecked{color:#ef6c00;font-weight:600}
.nm{color:#757575;font-style:italic}details{margin:.5em 0}code{background:#f5f5f5;padding:0 3px}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def img(png: bytes | None, alt: str, *, missing: str = NOT_MEASURED) -> str:
    if not png:
        return f'<p class="nm">{esc(alt)}: {esc(missing)}.</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = ()) -> str:
    """Cells are escaped, except `Raw` ones (already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ' class="n"' if i in numeric else ""
            cells.append(f"<td{cls}>{c.html if isinstance(c, Raw) else esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw:
    """A table cell that is HTML already."""

    def __init__(self, text: str) -> None:
        self.html = text


def _status(status: Any) -> Raw:
    cls = {"met": "met", "missed": "missed"}.get(str(status), "unchecked")
    return Raw(f'<span class="{cls}">{esc(status)}</span>')


def page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------------------------- sections


def _before_after(s: Mapping[str, Any]) -> str:
    base, pr = s.get("baseline") or {}, s.get("pruned") or {}
    ship = s.get("shipped_precision") or "?"
    bt, st = base.get("tflite") or {}, (s.get("variants") or {}).get(ship) or {}
    rows = [
        ("parameters", count(base.get("params")), count(pr.get("params"))),
        ("MACs", count(base.get("macs")), count(pr.get("macs"))),
        ("PyTorch accuracy", pct(base.get("accuracy_torch")), pct(pr.get("accuracy_torch"))),
        (f"{ship} .tflite size", count(bt.get("size_bytes"), " B"), count(st.get("size_bytes"), " B")),
        (f"{ship} .tflite accuracy", pct(bt.get("accuracy")), pct(st.get("accuracy"))),
        (
            f"{ship} latency p50",
            ms((bt.get("latency_ms") or {}).get("p50")),
            ms((st.get("latency_ms") or {}).get("p50")),
        ),
        (f"{ship} model RSS", count(bt.get("model_rss_kib"), " KiB"), count(st.get("model_rss_kib"), " KiB")),
    ]
    out = ["<h2>Before / after</h2>", table(["", "unpruned", "pruned + fine-tuned"], rows, numeric=(1, 2))]
    if pr.get("enabled") and num(pr.get("keep_target")) is not None:
        out.append(
            f"<p>Pruning target: keep {100 * pr['keep_target']:.0f}% of {esc(pr.get('metric'))}; achieved "
            f"{pct(pr.get('keep_achieved'))}. Accuracy right after pruning "
            f"{pct(pr.get('accuracy_torch_before_finetune'))}"
            f", after {count(pr.get('finetune_steps'))} distillation steps {pct(pr.get('accuracy_torch'))}.</p>"
        )
    return "\n".join(out)


def _budgets(s: Mapping[str, Any]) -> str:
    rows = [(b.get("name"), b.get("limit"), b.get("value"), _status(b.get("status")), b.get("note"))
            for b in s.get("budgets") or []]  # fmt: skip
    if not rows:
        return f'<h2>Budgets</h2><p class="nm">{NOT_MEASURED}.</p>'
    return "<h2>Budgets</h2>" + table(["budget", "limit", "value", "status", "note"], rows, numeric=(1, 2))


def _variants(s: Mapping[str, Any]) -> str:
    from pipeline.report import figures

    points = figures.variant_points(s)
    rows = []
    for p in points:
        lat = p["latency"]
        rows.append((p["name"] + (" (shipped)" if p["shipped"] else ""), count(p["size_bytes"], " B"),
                     pct(p["accuracy"]), ms(lat.get("p50")), ms(lat.get("p90")), ms(lat.get("p99"))))  # fmt: skip
    v = (s.get("variants") or {}).get(s.get("shipped_precision")) or {}
    where = f"{v.get('runs', '?')} timed runs, measured on {v.get('measured_on', 'an unknown machine')}"
    return "\n".join([
        "<h2>Accuracy vs latency</h2>",
        img(figures.accuracy_vs_latency(s), "accuracy vs latency"),
        table(["variant", "size", "accuracy", "p50", "p90", "p99"], rows, numeric=(1, 2, 3, 4, 5)) if rows else "",
        f'<p class="muted">Latency: {esc(where)}.</p>' if v else "",
    ])  # fmt: skip


def _latency(s: Mapping[str, Any]) -> str:
    from pipeline.report import figures

    png, source = figures.latency_distribution(s)
    note = {
        "samples": "Drawn from every timed run.",
        "quantiles": "Cumulative distribution of the timed runs, from the 5%-step quantiles the runner records.",
        "percentiles": "The runner recorded percentiles only, not each run: the plot shows min-max, p50-p90, p99 "
        "and the mean per variant.",
    }.get(source, "")
    return (
        "<h2>Latency distribution</h2>"
        + img(png, "latency distribution")
        + (f'<p class="muted">{esc(note)}</p>' if png else "")
    )


def _devices(s: Mapping[str, Any]) -> str:
    """Latency of each model file on each device profiled (when several were)."""
    devs = s.get("devices")
    if not devs:
        return ""
    rows = []
    for name, d in devs.items():
        for model, r in (d.get("results") or {}).items():
            rows.append((name, d.get("machine"), model, ms(r.get("p50")), ms(r.get("p99")), r.get("runtime"), "ok"))
        for model, why in (d.get("failed") or {}).items():
            rows.append((name, d.get("machine"), model, "", "", "", f"failed: {why}"))
        if d.get("error"):
            rows.append((name, d.get("machine"), "", "", "", "", f"error: {d['error']}"))
    header = ["device", "machine", "model file", "p50", "p99", "runtime", "status"]
    return "<h2>Devices</h2>" + table(header, rows, numeric=(3, 4))


def _channels(s: Mapping[str, Any]) -> str:
    from pipeline.report import figures

    pr = s.get("pruned") or {}
    layers = pr.get("layers") or []
    missing = "pruning disabled for this target" if pr.get("enabled") is False else NOT_MEASURED
    out = ["<h2>Channels per layer</h2>", img(figures.channels_per_layer(s), "channels per layer", missing=missing)]
    if layers:
        rows = [(r.get("name"), r.get("kind"), r.get("before"), r.get("after")) for r in layers]
        out.append("<details><summary>table</summary>" + table(["layer", "kind", "before", "after"], rows,
                                                               numeric=(2, 3)) + "</details>")  # fmt: skip
    return "\n".join(out)


def _sensitivity(s: Mapping[str, Any]) -> str:
    from pipeline.report import figures

    pr = s.get("pruned") or {}
    if not s.get("sensitivity"):
        return ""
    note = (f"<p>Channels allocated: {esc(pr.get('allocation'))}. Each curve is one group pruned alone; the "
            "allocation tries the cheapest groups a step smaller on the whole model and keeps the step that "
            "raises the validation loss least per MAC saved.</p>")  # fmt: skip
    return "\n".join(["<h2>Sensitivity per layer</h2>", note, img(figures.sensitivity(s), "sensitivity per layer")])


def _trial_note(t: Mapping[str, Any]) -> str:
    if t.get("same_as") is not None:
        return f"the model of trial {t['same_as'] + 1}, not fine-tuned again"
    return str(t.get("error") or "")


def _search(s: Mapping[str, Any]) -> str:
    from pipeline.report.search_figures import search_trials

    search = (s.get("pruned") or {}).get("search")
    if not search:
        return ""
    rows = [(i + 1, t.get("keep_target"), t.get("keep_achieved"), t.get("val_accuracy"), t.get("passed"),
             t.get("seconds"), _trial_note(t)) for i, t in enumerate(search.get("trials") or [])]  # fmt: skip
    note = (f"<p>Pruned as far as the accuracy budget allows: each trial pruned to a share of the MACs, briefly "
            f"fine-tuned and scored on the validation split; chosen: trial "
            f"{esc('none' if search.get('chosen') is None else search['chosen'] + 1)}.</p>")  # fmt: skip
    tab = table(["trial", "keep asked", "MACs kept", "val accuracy", "within budget", "s", "note"], rows,
                numeric=(1, 2, 3, 5))  # fmt: skip
    return "\n".join(["<h2>Accuracy search</h2>", note, img(search_trials(s), "accuracy search trials"), tab])


def _energy(s: Mapping[str, Any]) -> str:
    from pipeline.report import figures

    rows = figures.energy_rows(s)
    out = ["<h2>Energy per inference</h2>", img(figures.energy(s), "energy per inference")]
    if rows:
        trows = []
        for r in rows:
            above = num(r.get("energy_per_inference_above_idle_mj"))
            trows.append((
                r["name"],
                f"{r['energy_per_inference_mj']:.4g} mJ",
                "estimated" if figures.energy_estimated(r) else "measured",
                NOT_MEASURED if above is None else f"{above:.4g} mJ" + (" (estimated)" if r.get("estimated") else ""),
                r.get("method", ""),
            ))  # fmt: skip
        out.append(table(["variant", "energy / inference", "", "above idle", "how"], trows, numeric=(1, 3)))
    return "\n".join(out)


def edgetpu_ops(et: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The analysed ops: in the summary (`analysis.ops` or `ops`) or in the Edge TPU stage's edgetpu.json."""
    ops = (et.get("analysis") or {}).get("ops") or et.get("ops")
    if ops:
        return list(ops)
    folder = et.get("dir")
    path = Path(folder) / "edgetpu.json" if folder else None
    if path is not None and path.is_file():
        try:
            return list((json.loads(path.read_text(encoding="utf-8")).get("analysis") or {}).get("ops") or [])
        except (OSError, ValueError):
            return []
    return []


def _edgetpu(s: Mapping[str, Any]) -> str:
    from pipeline.report import figures

    et = s.get("edgetpu")
    accel = ((s.get("profile") or {}).get("hardware") or {}).get("accelerator")
    if not et:
        return f'<h2>Edge TPU</h2><p class="nm">Edge TPU op map: {NOT_MEASURED}.</p>' if accel == "edgetpu" else ""
    ops = edgetpu_ops(et)
    head = (
        f"<p>Status: <b>{esc(et.get('status'))}</b>: {esc(et.get('tpu_ops'))} ops on the Edge TPU, "
        f"{esc(et.get('cpu_ops'))} on the CPU; checked from the .tflite against the published rules.</p>"
    )
    rows = [
        (o.get("index"), o.get("op"), figures.PLACEMENT_LABELS.get(str(o.get("placement")), o.get("placement")),
         o.get("pytorch_layer") or "-", o.get("reason") or "")
        for o in ops
    ]  # fmt: skip
    rw = et.get("rewrites") or {}
    items = [f"<li>Rewritten before export: <code>{esc(r.get('layer'))}</code> {esc(r.get('before'))} &rarr; "
             f"{esc(r.get('after'))}</li>" for r in rw.get("applied") or []]  # fmt: skip
    items += [f"<li>Suggestion (not applied, it changes the numbers): <code>{esc(x.get('layer'))}</code>: "
              f"{esc(x.get('what_to_change'))}</li>" for x in rw.get("suggestions") or []]  # fmt: skip
    return "\n".join(
        [
            "<h2>Edge TPU</h2>",
            head,
            f"<ul>{''.join(items)}</ul>" if items else "",
            img(figures.edgetpu_op_map(ops), "Edge TPU op map"),
            "<details><summary>ops</summary>"
            + table(["#", "op", "runs on", "PyTorch layer", "reason"], rows)
            + "</details>"
            if rows
            else "",
        ]
    )


def _latency_model(s: Mapping[str, Any]) -> str:
    lm = s.get("latency_model")
    if not lm:
        return ""
    row = (ms(lm.get("budget_ms")), ms(lm.get("predicted_ms")), ms(lm.get("measured_ms")),
           f"{lm['error_pct']:+.1f}%" if num(lm.get("error_pct")) is not None else NOT_MEASURED)  # fmt: skip
    where = (lm.get("table") or {}).get("where")
    return (
        "<h2>Latency-aware pruning</h2>"
        + table(["budget", "predicted", "measured", "prediction error"], [row], numeric=(0, 1, 2, 3))
        + (f'<p class="muted">The {esc(where)}.</p>' if where else "")
    )


def _op_profile(s: Mapping[str, Any]) -> str:
    """Where the time goes: the shipped model per op on the device (pipeline/report/op_figures.py)."""
    from pipeline.report import op_figures

    prof = s.get("op_profile")
    if not prof:
        return ""
    if not prof.get("available"):
        return f'<h2>Where the time goes</h2><p class="nm">Per-op times not measured: {esc(prof.get("why"))}</p>'
    rows = [(r["op"] if r["op"] is not None else "", r["type"], r["layer"] or "", ms(r["ms"]), pct(r["share"]))
            for r in op_figures.op_rows(s)]  # fmt: skip
    return ("<h2>Where the time goes</h2>" + img(op_figures.where_the_time_goes(s), "where the time goes")
            + f'<p class="muted">{esc(prof.get("tool"))} on {esc(prof.get("device"))}; slowest ops:</p>'
            + table(["op", "type", "PyTorch layer", "ms", "share"], rows, numeric=(3, 4)))  # fmt: skip


def _quantization(s: Mapping[str, Any]) -> str:
    """int8 remedies and the worst ops (pipeline/report/quant_figures.py)."""
    from pipeline.quantize.flips import flips_text
    from pipeline.report import quant_figures as qf

    q = s.get("quantization")
    if not q:
        return ""
    f = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    rows = [(r["remedy"], f(r["agreement"], ".4f"), f(r["accuracy"], ".4f"), f(r["size_bytes"], ","),
             ms(r["p50_ms"]), "" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x", r["status"])
            for r in qf.remedy_rows(s)]  # fmt: skip
    ops = [(f"#{o['op_index']} {o['op']}", o.get("layer") or "", f"{o['error_steps']:.2f}", f"{o['cosine']:.4f}",
            f"{o['rel_error']:.3f}", qf.levels_text(o), pct(o["share"])) for o in qf.worst_ops(s)]  # fmt: skip
    verdict = "met" if q["met"] else "missed"
    why = q.get("advice") or flips_text(q.get("disagreements") or {}, q["val_images"])
    return "\n".join([
        "<h2>Quantization</h2>",
        f"<p>int8 top-1 agreement with PyTorch <b>{q['agreement']:.4f}</b> on {q['val_images']} validation images: "
        f"{esc(qf.goal_text(q))} <b>{verdict}</b> after {esc(q['shipped'])}.</p>",
        table(["remedy", "agreement", "accuracy", "bytes", "p50 (host)", "vs plain int8", "result"], rows,
              numeric=(1, 2, 3, 4, 5)),
        img(qf.op_error_plot(s), "worst int8 ops"),
        table(["op", "PyTorch layer", "error / scale", "cosine", "rel. error", "int8 levels used", "share (est.)"],
              ops, numeric=(2, 3, 4, 5, 6)),
        f"<p>{esc(why)}</p>" if why else "",
    ])  # fmt: skip


def _stages(s: Mapping[str, Any]) -> str:
    rows = [(n, f"{st.get('seconds', 0):.1f}", "cached" if st.get("skipped") else "ran")
            for n, st in (s.get("stages") or {}).items()]  # fmt: skip
    tools = ", ".join(f"{k} {v}" for k, v in (s.get("tools") or {}).items())
    return "\n".join(
        [
            "<h2>Stages</h2>",
            table(["stage", "seconds", ""], rows, numeric=(1,)) if rows else f'<p class="nm">{NOT_MEASURED}.</p>',
            f'<p class="muted">Tools: {esc(tools)}</p>' if tools else "",
        ]
    )


def render_html(summary: Mapping[str, Any]) -> str:
    """The deploy report as one HTML page that opens offline (plots are inline PNG)."""

    s = summary
    data = s.get("data") or {}
    title = f"edgeship: {s.get('model', '?')} for {s.get('target', '?')}"
    head = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">{esc(s.get("target_description", ""))}</p>',
        f"<p>Shipped: <code>model.tflite</code> = <b>{esc(s.get('shipped_precision', '?'))}</b>. Test set: "
        f"{esc(data.get('test', NOT_MEASURED))} ({esc(s.get('test_images', '?'))} images). Calibration: "
        f"{esc(data.get('calibration', NOT_MEASURED))}.</p>",
    ]
    sections = (_before_after, _budgets, _variants, _latency, _devices, _channels, _sensitivity, _search, _energy,
                _latency_model, _op_profile, _edgetpu, _quantization, _stages)  # fmt: skip
    body = [*head, *(section(s) for section in sections)]
    return page(title, [b for b in body if b])


def render_comparison(summaries: Sequence[Mapping[str, Any]], *, links: Mapping[str, str] | None = None) -> str:
    """One page comparing the shipped model of several targets; `links` maps a target to its report's URL."""
    from pipeline.report import figures

    rows = []
    for s in summaries:
        ship = s.get("shipped_precision")
        v = (s.get("variants") or {}).get(ship) or {}
        target = str(s.get("target", "?"))
        name = Raw(f'<a href="{esc(links[target])}">{esc(target)}</a>') if links and target in links else target
        budgets = ", ".join(f"{b.get('name')}: {b.get('status')}" for b in s.get("budgets") or []) or NOT_MEASURED
        energy = next((r for r in figures.energy_rows(s) if r["name"] == f"pruned {ship}"), None)
        estimated = energy is not None and figures.energy_estimated(energy)
        rows.append(
            (
                name,
                ship,
                count(v.get("size_bytes"), " B"),
                pct(v.get("accuracy")),
                ms((v.get("latency_ms") or {}).get("p50")),
                v.get("measured_on", NOT_MEASURED),
                f"{energy['energy_per_inference_mj']:.3g} mJ{' (estimated)' if estimated else ''}"
                if energy
                else NOT_MEASURED,
                budgets,
            )
        )
    header = ["target", "shipped", "size", "accuracy", "latency p50", "measured on", "energy / inference", "budgets"]
    body = [
        "<h1>edgeship: targets compared</h1>",
        f'<p class="muted">{len(summaries)} deploys of '
        f"{esc(', '.join(sorted({str(s.get('model', '?')) for s in summaries})))}.</p>",
        table(header, rows, numeric=(2, 3, 4)),
        img(figures.comparison(summaries), "accuracy vs latency per target"),
    ]
    return page("edgeship: targets compared", body)
