"""Write report.html + report.md for a deploy, rebuild them from a finished run, write the targets comparison."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json_atomic, write_text_atomic
from pipeline.errors import PipelineError
from pipeline.report.html import render_comparison, render_html
from pipeline.report.markdown import render_markdown

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path


def load_summary(run_dir: Path) -> dict[str, Any]:
    """The summary a finished deploy recorded in `run_dir/summary.json`."""
    path = run_dir / SUMMARY
    if not path.is_file():
        stages = sorted(p.name for p in run_dir.glob("*/manifest.json")) if run_dir.is_dir() else []
        hint = "its stages never got to the summary" if stages else "no run there"
        raise PipelineError(
            f"{path}: missing ({hint}); run `make deploy TARGET={run_dir.name}` to finish the run first"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot read it ({exc}); run the deploy again") from None
    et = summary.get("edgetpu")
    if isinstance(et, dict) and not Path(str(et.get("dir", ""))).is_dir() and (run_dir / "edgetpu").is_dir():
        summary["edgetpu"] = {**et, "dir": str(run_dir / "edgetpu")}  # the run folder was moved
    return summary


def write_report(source: Path | Mapping[str, Any], out_dir: Path, *, save_summary: bool = False) -> ReportFiles:
    """`out_dir/report.html` and `out_dir/report.md` from a summary dict or a run folder's summary.json;
    with `save_summary`, the summary itself as `out_dir/summary.json` first (what `make report` reads)."""
    summary = load_summary(source) if isinstance(source, Path) else source
    if save_summary:
        write_json_atomic(out_dir / SUMMARY, summary)
    files = ReportFiles(out_dir / "report.html", out_dir / "report.md")
    write_text_atomic(files.html, render_html(summary))
    write_text_atomic(files.markdown, render_markdown(summary))
    return files


def _run_dir(target: str, runs_dir: Path) -> Path:
    if (runs_dir / target / SUMMARY).is_file():
        return runs_dir / target
    try:  # an alias (rpi -> rpi5) or a profile path: the run folder carries the profile's name
        from pipeline.targets import load_target

        return runs_dir / load_target(target).name
    except PipelineError:
        return runs_dir / target


def rebuild_report(
    target: str,
    *,
    runs_dir: Path = Path("runs"),
    out_dir: Path | None = None,
    artifacts_dir: Path = Path("artifacts"),
) -> ReportFiles:
    """Render the report of a finished run again from what it recorded; no stage runs.

    Device figures recorded since (`edgeship profile`, in runs/<target>/profile-devices.json) for the files of
    the current bundle (`artifacts_dir/<target>/`, matched by sha256) are shown beside the deploy's own.
    Writes into the run folder (`runs/<target>/`) unless `out_dir` is given; the published bundle is left
    alone, since its manifest lists the sha256 of its report."""
    run_dir = _run_dir(target, runs_dir)
    summary = with_device_figures(load_summary(run_dir), run_dir, artifacts_dir / run_dir.name)
    return write_report(summary, out_dir or run_dir)


def with_device_figures(summary: Mapping[str, Any], run_dir: Path, bundle_dir: Path) -> dict[str, Any]:
    """The summary with every device's recorded figures for the bundle's model files added under "devices"."""
    from pipeline.devices.record import FILE_NAME, current_figures
    from pipeline.report.summary import device_rows

    files = {"model.tflite": bundle_dir / "model.tflite"}
    files |= {f"variants/{p.name}": p for p in sorted((bundle_dir / "variants").glob("*.tflite"))}
    recorded = current_figures(run_dir / FILE_NAME, files) if bundle_dir.is_dir() else {}
    if not recorded:
        return dict(summary)
    return {**summary, "devices": {**(summary.get("devices") or {}), **device_rows(recorded)}}


def write_comparison(
    summaries: Sequence[Mapping[str, Any]], out: Path, *, links: Mapping[str, str] | None = None
) -> Path:
    """The targets comparison page at `out` (an .html file)."""
    if not summaries:
        raise PipelineError("no finished deploys to compare; run `make deploy TARGET=...` for some targets first")
    write_text_atomic(out, render_comparison(summaries, links=links))
    return out


def compare_targets(
    targets: Sequence[str], *, runs_dir: Path = Path("runs"), out: Path = Path("artifacts/compare.html")
) -> Path:
    """Rebuild each target's report in its run folder and write the comparison page linking to them."""
    summaries, links = [], {}
    for t in targets:
        run_dir = _run_dir(t, runs_dir)
        summary = load_summary(run_dir)
        files = write_report(summary, run_dir)
        summaries.append(summary)
        links[str(summary.get("target", t))] = _relative(files.html, out.parent)
    return write_comparison(summaries, out, links=links)


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
