"""The command line: the only place that parses argv, renders progress and tables, and exits."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import __version__
from pipeline.errors import PipelineError, UsageError

log = logging.getLogger("pipeline")


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW like 3x32x32, got {text!r}") from None
    if min(c, h, w) < 1 or c > 4 or max(h, w) > 8192:
        raise argparse.ArgumentTypeError(
            f"expected CxHxW with 1-4 channels and sides of 1-8192 pixels, like 3x32x32; got {text!r}"
        )
    return c, h, w


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"expected a number of processes from 1 to 1024, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeship", description="Put a PyTorch model on edge hardware.")
    p.add_argument("--version", action="version", version=f"edgeship {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("deploy", help="prune, fine-tune, convert, verify, profile and bundle for a target")
    d.add_argument("--target", required=True, help=f"target name ({_target_names()}) or a YAML path")
    d.add_argument(
        "--model",
        default="fmnist_cnn",
        help="built-in model (fmnist_cnn, efficientnet_lite0) or package.module:factory",
    )
    d.add_argument("--checkpoint", type=Path, help="weights for the model (default: the model's own)")
    d.add_argument("--data", type=Path, help="image folder with train/<class>/ and test/<class>/ (own models)")
    d.add_argument("--classes", type=Path, help="class names in the model's output order, one per line (own models)")
    d.add_argument("--calibration", type=Path, help="calibration images (.npz or folder) for int8")
    d.add_argument("--input-shape", type=_parse_shape, help="CxHxW of a user model's input, e.g. 3x32x32")
    d.add_argument("--mean", type=_parse_floats, help="per-channel mean in 0-1 pixel units (user model)")
    d.add_argument("--std", type=_parse_floats, help="per-channel std in 0-1 pixel units (user model)")
    d.add_argument("--test-images", type=int, help="evaluate on the first N test images only (faster)")
    d.add_argument("--runs-dir", type=Path, default=Path("runs"), help="stage outputs and reports (default: runs)")
    d.add_argument("--artifacts-dir", type=Path, default=Path("artifacts"),
                   help="where the bundle is published, as <dir>/<target>/ (default: artifacts)")  # fmt: skip
    d.add_argument("--force", action="store_true", help="re-run every stage even when up to date")
    d.add_argument("--allow-budget-miss", action="store_true", help="publish the bundle even if a budget is missed")
    d.add_argument("--train-device", help="where to fine-tune: auto, cpu, cuda, cuda:N (also --device cuda, or "
                   "--set finetune.device=...)")  # fmt: skip
    d.add_argument("--nproc", type=_positive, default=1, help="fine-tune on N processes (DDP under torchrun "
                   "here: one per GPU, or CPU processes); several nodes: start it with torchrun")  # fmt: skip
    _device_args(d)

    pr = sub.add_parser("profile", help="profile a deployed bundle (or any .tflite) on attached devices")
    pr.add_argument(
        "--target", required=True, help=f"target ({_target_names()}) or YAML path (profiling settings, transport)"
    )
    pr.add_argument("--model-file", type=Path, action="append", help="a .tflite to profile (default: the bundle's)")
    pr.add_argument(
        "--artifacts-dir", type=Path, default=Path("artifacts"), help="where the bundle is (default: artifacts)"
    )
    pr.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the figures are written")
    _device_args(pr)

    sh = sub.add_parser("ship", help="copy a target's bundle into an Android (Gradle) or iOS (Xcode) app")
    sh.add_argument("--target", required=True, help=f"the deployed target whose bundle to ship ({_target_names()})")
    sh.add_argument("--app", type=Path, required=True, help="the app project's root folder")
    sh.add_argument("--name", help="model folder name in the app (default: from the bundle)")
    sh.add_argument("--resources", type=Path, help="iOS: the resources folder inside the app (default: found)")
    sh.add_argument("--version", dest="model_version", help="version to ship as (default: the bundle's time)")
    sh.add_argument("--force", action="store_true", help="replace a newer model in the app")
    sh.add_argument(
        "--artifacts-dir", type=Path, default=Path("artifacts"), help="where the bundle is (default: artifacts)"
    )

    rp = sub.add_parser("report", help="rebuild a finished run's report (no stage runs), or compare targets")
    rp.add_argument("--target", action="append", required=True, help="repeat for several targets")
    rp.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the finished runs are (default: runs)")
    rp.add_argument("--artifacts-dir", type=Path, default=Path("artifacts"),
                    help="the bundles: device figures recorded for them are shown (default: artifacts)")  # fmt: skip
    rp.add_argument("--compare", type=Path, help="write one comparison page here (e.g. artifacts/compare.html)")

    t = sub.add_parser("targets", help="list the target profiles, or validate one")
    t.add_argument("name", nargs="?", help="validate and print this target (name or YAML path)")

    tb = sub.add_parser("tables", help="list the cached latency tables (one per device fingerprint)")
    tb.add_argument("--json", action="store_true", help="print them as JSON")
    return p


def _target_names() -> str:
    from pipeline.targets import available_targets

    return ", ".join(available_targets())


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a profile field, e.g. --set pruning.target.keep=0.8 (repeatable)")  # fmt: skip
    p.add_argument("--device", help="where to profile: user@host[:port], adb:SERIAL, local; several: a,b,c")
    p.add_argument("--identity", type=Path, help="ssh private key to use (default: your ssh config)")
    p.add_argument("--known-hosts", type=Path, help="known_hosts file to check host keys against")


def _ssh_options(args: argparse.Namespace):
    if not (args.identity or args.known_hosts):
        return None
    from pipeline.devices import SshOptions

    for path in (args.identity, args.known_hosts):
        if path is not None and not path.is_file():
            raise UsageError(f"{path}: no such file")
    return SshOptions(known_hosts=args.known_hosts, identity=args.identity)


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipeline.api import CLI, build_request, printing_progress
    from pipeline.deploy import deploy
    from pipeline.train.ddp import distributed_deploy
    from pipeline.train.world import world_from_env

    train_device, devices = _train_device(args)
    overrides = (*args.overrides, f"finetune.device={train_device}") if train_device else tuple(args.overrides)
    req = build_request(args.model, args.target, data=args.data, checkpoint=args.checkpoint, classes=args.classes,
                        calibration=args.calibration, input_shape=args.input_shape, mean=args.mean, std=args.std,
                        test_images=args.test_images, overrides=overrides, device=devices,
                        ssh_options=_ssh_options(args), runs_dir=args.runs_dir, artifacts_dir=args.artifacts_dir,
                        force=args.force, allow_budget_miss=args.allow_budget_miss, spelling=CLI)  # fmt: skip
    world = world_from_env()
    if args.nproc > 1 and not world.distributed:
        return _launch(args, req)
    if world.is_main:
        print(f"edgeship: deploying {req.spec.name} for {req.target.name} ({req.target.description})", file=sys.stderr)
    start = time.perf_counter()
    result = distributed_deploy(req, lambda: deploy(req, printing_progress()))
    if result is None:  # a rank other than 0 under torchrun: it fine-tuned, rank 0 reports
        return 0
    print(result.table(), file=sys.stderr)
    print(f"bundle: {result.bundle}  report: {result.report}  ({time.perf_counter() - start:.0f} s)")
    return 0


_TRAIN_DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]{1,2}")


def _train_device(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(fine-tuning device, profiling DEVICE): `--device cuda` (auto, cpu, cuda:N) names where to train, as
    users of training tools expect; anything else is where to profile (user@host, adb:SERIAL, local)."""
    if args.device is not None and _TRAIN_DEVICE.fullmatch(args.device):
        if args.train_device is not None and args.train_device != args.device:
            raise UsageError(f"--device {args.device} and --train-device {args.train_device}: give one of them")
        return args.device, None
    return args.train_device, args.device


def _launch(args: argparse.Namespace, req) -> int:
    """`--nproc N` on this machine: the same command under torchrun (pipeline/train/launch.py), echoed."""
    from pipeline.train.device import resolve_device
    from pipeline.train.launch import launch_deploy

    resolve_device(req.target.finetune.device, req.target.finetune.amp)  # no GPU where one is asked for: say so now
    log = req.run_dir / "torchrun.log"
    print(f"edgeship: deploying {req.spec.name} for {req.target.name}, fine-tuning on {args.nproc} processes "
          f"(torchrun, DDP; log: {log})", file=sys.stderr)  # fmt: skip

    def echo(line: str) -> None:
        print(line, file=sys.stdout if line.startswith("bundle: ") else sys.stderr, flush=True)

    return launch_deploy(_without_nproc(args.argv), args.nproc, log_path=log, echo=echo)


def _without_nproc(argv: list[str]) -> list[str]:
    """argv less --nproc N (or an abbreviation of it): under torchrun it means nothing, and torchrun's own
    parser would take `--nproc` for an ambiguous `--nproc-per-node`."""
    out, skip = [], False
    for word in argv:
        name = word.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 3 and name.startswith("--n") and "--nproc".startswith(name):
            skip = "=" not in word
        else:
            out.append(word)
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile the bundle's model (or --model-file) on the devices; one table row per device and file."""
    from pipeline.api import profile_files, record_path
    from pipeline.errors import DevicesFailed
    from pipeline.targets import load_target

    t = load_target(args.target, overrides=tuple(args.overrides))
    files = args.model_file or [args.artifacts_dir / t.name / "model.tflite"]
    dest = record_path(t, args.runs_dir)  # beside the run, not inside the checksummed bundle
    failure: DevicesFailed | None = None
    try:
        runs = profile_files(t, files, args.device, runs_dir=args.runs_dir, ssh_options=_ssh_options(args))
    except DevicesFailed as exc:
        failure, runs = exc, exc.runs
    for name, run in runs.items():
        for model, r in run.results.items():
            lat = r["latency_ms"]
            print(f"{name:<24} {model:<24} p50 {lat['p50']:.4f} ms  p99 {lat.get('p99', float('nan')):.4f} ms  "
                  f"{r.get('runtime')} {r.get('runtime_version')}  ({r.get('measured')})")  # fmt: skip
        for model, why in run.failed.items():
            print(f"{name:<24} {model:<24} failed: {why}")
        if run.error:
            print(f"{name:<24} error: {run.error}")
    print(f"figures: {dest}")
    if failure is not None:
        raise failure
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from pipeline.ship import ship_target

    res = ship_target(args.target, args.app, artifacts_dir=args.artifacts_dir, model_name=args.name,
                      force=args.force, resources=args.resources, version=args.model_version)  # fmt: skip
    replaced = f", replacing {res.replaced_version}" if res.replaced_version else ""
    print(f"shipped version {res.version} to {res.destination} ({res.app_kind}{replaced})")
    if res.note:
        print(f"edgeship: note: {res.note}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import compare_targets, rebuild_report

    if args.compare:
        print(f"comparison: {compare_targets(args.target, runs_dir=args.runs_dir, out=args.compare)}")
        return 0
    for t in args.target:
        files = rebuild_report(t, runs_dir=args.runs_dir, artifacts_dir=args.artifacts_dir)
        print(f"report: {files.html}  ({files.markdown})")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from pipeline.targets import available_targets, load_target, resolve_target_path

    if args.name:
        profile = load_target(args.name)
        print(f"{resolve_target_path(args.name)}: valid")
        import json

        print(json.dumps(profile.model_dump(mode="json"), indent=2))
        return 0
    for name in available_targets():
        print(f"{name:<10} {resolve_target_path(name)}")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    import json

    from pipeline.latency.cache import TableCache

    cache = TableCache()
    rows = cache.list_tables()
    if args.json:
        print(json.dumps({"root": str(cache.root), "tables": rows}, indent=2))
        return 0
    print(f"latency tables in {cache.root}: {len(rows)}")
    for r in rows:
        if "error" in r:
            print(f"  {r['key']}: {r['error']} ({r['path']})")
            continue
        fp = r["fingerprint"]
        counts = ", ".join(f"{n} {k}" for k, n in sorted(r["by_precision"].items()))
        print(f"  {r['key']}  {fp['cpu']} x{fp['cores']}, {fp['system']} {fp['machine']}, {fp['runtime']} "
              f"{fp['runtime_version']}, {fp['threads']} thread(s), delegate {fp['delegate']}")  # fmt: skip
        print(f"      {r['probes']} probes ({counts}); measured on {', '.join(r['devices'])}; updated {r['updated']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # deploy --nproc runs the same words under torchrun
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        match args.command:
            case "deploy":
                return cmd_deploy(args)
            case "targets":
                return cmd_targets(args)
            case "profile":
                return cmd_profile(args)
            case "ship":
                return cmd_ship(args)
            case "report":
                return cmd_report(args)
            case "tables":
                return cmd_tables(args)
    except PipelineError as exc:
        print(f"edgeship: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `edgeship targets | head -1`: the reader has gone, nothing to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # a write refused for space outside a stage (copying the bundle), a vanished folder
        from pipeline.artifacts import is_out_of_space

        where = f"{exc.filename}: " if exc.filename else ""
        hint = (
            "; free some space and run again: finished stages are kept, the previous bundle is untouched"
            if is_out_of_space(exc)
            else ""
        )
        print(f"edgeship: error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgeship: interrupted; finished stages are kept, the next run resumes after them", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
