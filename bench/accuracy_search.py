"""Benchmark: does `pruning.target: {metric: accuracy}` end near the budget's edge, and in how many trials?

    python -m bench.accuracy_search [--models fmnist_cnn] [--budgets 0.01 0.02] [--trials 8]

For each model and accuracy budget, the real chain (baseline -> sensitivity -> prune) runs on the host profile
with `metric: accuracy` and the default search settings but `search.trials` (8 by default, the goal's bound).
The search reads only the validation split; the table gives its trials, the validation accuracy of the one
chosen against the edge (unpruned validation accuracy minus the budget), and its share of the MACs.
Writes the "Accuracy search" section of BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sections import write_section
from pipeline.deploy import REPO

SECTION = "## Accuracy search"
GOAL_POINTS = 0.5


def search_once(model: str, budget: float, trials: int, runs: Path) -> dict[str, Any]:
    from pipeline.api import build_request
    from pipeline.deploy import run_chain
    from pipeline.stages import CHAIN, Context

    overrides = ("pruning.target.metric=accuracy", "pruning.target.keep=null", f"budgets.max_accuracy_drop={budget}",
                 f"pruning.search.trials={trials}")  # fmt: skip
    req = build_request(model, "host", overrides=overrides, test_images=2000, runs_dir=runs)
    ctx = Context(req, REPO / (req.spec.default_checkpoint or ""))
    start = time.perf_counter()
    run_chain(ctx, lambda name, rec: None, tuple(s for s in CHAIN if s.name in ("baseline", "sensitivity", "prune")))
    search = ctx.results["prune"].allocation["search"]
    return {"model": model, "budget": budget, "trials": search["trials_scored"], "asked": len(search["trials"]),
            "chosen": search["chosen"],
            "edge": search["edge_val_accuracy"], "base": search["base_val_accuracy"],
            "distance": search["distance_to_edge"], "keep": search["chosen_keep"],
            "seconds": round(time.perf_counter() - start)}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | budget (points) | trials (keeps asked) | unpruned val % | edge val % | chosen val % "
           "| above the edge (points) | MACs kept | within 0.5 points in <= 8 trials |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["distance"] is None:
            out.append(f"| {r['model']} | {100 * r['budget']:g} | {r['trials']} ({r['asked']}) | "
                       f"{100 * r['base']:.2f} | {100 * r['edge']:.2f} | none passed | - | - | no |")  # fmt: skip
            continue
        ok = "yes" if r["distance"] * 100 <= GOAL_POINTS and r["trials"] <= 8 else "no"
        out.append(f"| {r['model']} | {100 * r['budget']:g} | {r['trials']} ({r['asked']}) | "
                   f"{100 * r['base']:.2f} | {100 * r['edge']:.2f} | {100 * (r['edge'] + r['distance']):.2f} | "
                   f"{100 * r['distance']:.2f} | "
                   f"{r['keep']:.3f} | {ok} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist_cnn"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeship-search-") as tmp:
        rows = [search_once(m, b, args.trials, Path(tmp) / f"{m}-{b:g}") for m in args.models for b in args.budgets]
    lines = table(rows)
    print("\n".join(lines))
    if args.no_write:
        return 0
    cmd = ("python -m bench.accuracy_search " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    body = [SECTION, "", f"Command: `{cmd}` ({round(time.perf_counter() - start)} s, this host, 2 cores). The real "
            "chain (baseline, sensitivity, prune) on the host profile with `pruning.target: {metric: accuracy}`, "
            "default search settings (150 distillation steps a trial, 1,000 validation images), at most "
            f"{args.trials} trials. A trial = one pruned model fine-tuned and scored; a keep asked for that prunes "
            "to a model already tried reuses its score (keeps asked, in brackets). Validation split only; 'above "
            "the edge' = chosen trial's validation accuracy "
            "minus (unpruned validation accuracy - budget).", "", *lines, ""]  # fmt: skip
    write_section(args.out, SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
