"""Fine-tuning under torch.distributed for real (issue 18): torchrun starts 2 processes on the gloo backend on
this CPU.

- Seeded DDP at world size 2 gives the single-process result: the DistributedSampler splits each global batch
  over the ranks, DDP averages the gradients, augmentation is drawn per image. Tolerance: 1e-5 on every
  weight for a model without BatchNorm (float summation order only; measured ~2e-8). With BatchNorm each
  rank normalises its half batch, so only the validation accuracy is compared (within 0.05).
- The deploy chain under torchrun (pipeline/train/ddp.py), started by the `--nproc` launcher
  (pipeline/train/launch.py): rank 1 is killed with SIGKILL while it fine-tunes; the error names rank 1 and
  the signal, the finished stages stay, no finetune output is left; the rerun skips them and finishes.

This module is also the program torchrun runs (`python -m tests.test_distributed <scenario> ...`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SEED = 3
# the deploy chain's settings for the kill test: tiny and quick, fine-tuning long enough to be killed in
CHAIN_OVERRIDES = ("pruning.allocation=uniform", "finetune.max_train_images=4000", "finetune.batch_size=64",
                   "finetune.min_steps=400", "finetune.evaluations=2", "finetune.workers=1",
                   "finetune.device=cpu")  # fmt: skip


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _setup(model: str):
    from pipeline.models.spec import ModelSpec
    from pipeline.targets import Finetune
    from tests.tiny_models import SPEC, TinyResidualCNN, read_fashion_mnist

    build = NoBatchNorm if model == "nobn" else TinyResidualCNN
    spec = ModelSpec(model, build, SPEC.input_shape, SPEC.mean, SPEC.std, SPEC.class_names)
    torch.manual_seed(0)
    teacher = build()
    torch.manual_seed(1)
    student = build()
    cfg = Finetune(epochs=1, batch_size=64, min_steps=24, early_stopping=False, device="cpu", workers=1, lr=3e-3)
    return spec, student, teacher, read_fashion_mnist("train", 1024), cfg


def finetune_once(model: str, world=None):
    from pipeline.train.distill import finetune_kd

    spec, student, teacher, data, cfg = _setup(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): a shared 2-core machine stays quick
    try:
        return finetune_kd(student, teacher, spec, data, cfg, seed=SEED, world=world)
    finally:
        torch.set_num_threads(threads)


def _val_accuracy(model: nn.Module) -> float:
    from pipeline.pruning.calibrate import evaluate
    from tests.tiny_models import SPEC, read_fashion_mnist

    return evaluate(model, SPEC.batches(read_fashion_mnist("test", 500)))[1]


def _main_match(out: str) -> None:
    """torchrun rank: fine-tune both models as one rank of the job; rank 0 saves the weights and figures."""
    import torch.distributed as dist

    from pipeline.train.world import world_from_env

    world = world_from_env()
    dist.init_process_group("gloo")
    try:
        results = {model: finetune_once(model, world) for model in ("nobn", "bn")}
    finally:
        dist.destroy_process_group()
    if world.is_main:
        for model, r in results.items():
            torch.save(r.model.state_dict(), f"{out}/{model}.pt")
        figures = {m: {"world": r.world_size, "seen": r.images_seen, "loss": r.final_loss} for m, r in results.items()}
        Path(out, "figures.json").write_text(json.dumps(figures))


def _main_chain(runs: str) -> int:
    """torchrun rank: baseline -> prune -> finetune of the real chain, as `edgeship deploy` runs it there."""
    from pipeline.api import build_request
    from pipeline.deploy import run_chain
    from pipeline.stages import CHAIN, Context
    from pipeline.train.ddp import distributed_deploy

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.train.ddp").setLevel(logging.INFO)
    if os.environ.get("RANK") == "1":
        (Path(runs) / "rank1.pid").write_text(str(os.getpid()))
    req = build_request("fmnist_cnn", "host", overrides=CHAIN_OVERRIDES, test_images=200, runs_dir=runs)
    stages = tuple(s for s in CHAIN if s.name in ("baseline", "prune", "finetune"))

    def run():
        ctx = Context(req, REPO / req.spec.default_checkpoint)
        run_chain(ctx, lambda name, rec: print(f"stage {name}: {'up to date' if rec.skipped else 'done'}",
                                               flush=True), stages)  # fmt: skip
        return ctx.get(stages[-1])

    out = distributed_deploy(req, run)
    if out is not None:
        print("RESULT", json.dumps(out.to_json()), flush=True)
    return 0


# the accuracy search under torchrun: sensitivity dealt out to both ranks, every trial distilled on both
SEARCH_OVERRIDES = ("pruning.allocation=sensitivity", "pruning.target.metric=accuracy", "pruning.target.keep=null",
                    "budgets.max_accuracy_drop=0.03", "pruning.search.trials=2", "pruning.search.finetune_steps=6",
                    "pruning.search.images=200", "pruning.sensitivity.images=100", "pruning.sensitivity.levels=[0.5]",
                    "finetune.batch_size=64", "finetune.max_train_images=2000", "finetune.workers=0",
                    "finetune.device=cpu")  # fmt: skip


def _search_request(runs: str | Path) -> Any:
    from pipeline.api import build_request

    return build_request("fmnist_cnn", "host", overrides=SEARCH_OVERRIDES, test_images=200, runs_dir=runs)


def _search_chain(req: Any, stage_names: tuple[str, ...]) -> Any:
    from pipeline.deploy import run_chain
    from pipeline.stages import CHAIN, Context

    ctx = Context(req, REPO / req.spec.default_checkpoint)
    run_chain(ctx, lambda name, rec: None, tuple(s for s in CHAIN if s.name in stage_names))
    return ctx


def _main_search(runs: str) -> int:
    """torchrun rank: baseline -> sensitivity -> prune (the accuracy search) of the real chain."""
    from pipeline.train.ddp import distributed_deploy

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.train.ddp").setLevel(logging.INFO)
    req = _search_request(runs)
    distributed_deploy(req, lambda: _search_chain(req, ("baseline", "sensitivity", "prune")))
    return 0


# ------------------------------------------------------------------------------------------------ the tests


def _torchrun(args: list[str], *, timeout: float = 300):
    from pipeline.proc import run_tool
    from pipeline.train.launch import torchrun_argv

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return run_tool(torchrun_argv(args, 2, module="tests.test_distributed"), timeout_s=timeout, env=env, cwd=REPO,
                    merge_stderr=True)  # fmt: skip


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    from tests.tiny_models import has_fashion_mnist

    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    run = _torchrun(["match", str(tmp_path)])
    assert run.rc == 0, run.stdout[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    for model in ("nobn", "bn"):
        single, fig = finetune_once(model), figures[model]
        assert fig["world"] == 2 and fig["seen"] == single.images_seen == 24 * 64  # all ranks' images counted
        ddp, ref = torch.load(tmp_path / f"{model}.pt"), single.model.state_dict()
        worst = max(float((ddp[k].float() - ref[k].float()).abs().max()) for k in ref)
        if model == "nobn":
            assert worst < 1e-5, f"max weight difference {worst}"
            assert abs(fig["loss"] - single.final_loss) < 1e-4
        else:
            twin = _setup(model)[1]
            twin.load_state_dict(ddp)
            a, b = _val_accuracy(twin.eval()), _val_accuracy(single.model)
            assert abs(a - b) <= 0.05, (a, b)
            assert worst > 0  # BatchNorm statistics of half batches: close, not bit-equal


@pytest.mark.slow
def test_sensitivity_and_search_trials_run_on_both_ranks(tmp_path: Path) -> None:
    """Under torchrun the sensitivity measurements are dealt out to both ranks and gathered (the same curves
    as one process measures), and every search trial's distillation is a job both ranks train."""
    from tests.tiny_models import has_fashion_mnist

    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    run = _torchrun(["search", str(tmp_path / "ddp")], timeout=900)
    assert run.rc == 0, run.stdout[-3000:]
    assert run.stdout.count("rank 1: sensitivity job received") == 1, run.stdout[-3000:]
    prune = json.loads((tmp_path / "ddp" / "host" / "prune" / "manifest.json").read_text())
    trials = prune["figures"]["allocation"]["search"]["trials"]
    distilled = run.stdout.count("rank 1: fine-tuning job received")
    assert len(trials) >= 1 and distilled == len(trials), (distilled, trials)
    ddp = json.loads((tmp_path / "ddp" / "host" / "sensitivity" / "sensitivity.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        ctx = _search_chain(_search_request(tmp_path / "one"), ("baseline", "sensitivity"))
    finally:
        torch.set_num_threads(threads)
    one = json.loads((ctx.results["sensitivity"].folder / "sensitivity.json").read_text())
    assert ddp["groups"].keys() == one["groups"].keys() and len(one["groups"]) >= 2
    for g, entry in one["groups"].items():
        mine = ddp["groups"][g]["levels"]
        assert [r["keep"] for r in mine] == [r["keep"] for r in entry["levels"]]
        for a, b in zip(mine, entry["levels"], strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["accuracy"] - b["accuracy"]) < 1e-9, (g, a, b)


def _launch(runs: Path, box: list) -> None:
    from pipeline.train.launch import launch_deploy

    lines: list[str] = []
    try:
        box.append(launch_deploy(["chain", str(runs)], 2, log_path=runs / "torchrun.log", echo=lines.append,
                                 module="tests.test_distributed"))  # fmt: skip
    except Exception as exc:  # the test looks at it
        box.append(exc)
    box.append(lines)


@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.train.ddp import DistributedError
    from tests.tiny_models import has_fashion_mnist

    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    runs.mkdir()
    box: list = []
    worker = threading.Thread(target=_launch, args=(runs, box))
    worker.start()
    log = runs / "torchrun.log"
    deadline = time.monotonic() + 400
    while "rank 1: fine-tuning job received" not in (log.read_text() if log.exists() else ""):
        assert worker.is_alive() and time.monotonic() < deadline, log.read_text() if log.exists() else box
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the 400 steps
    os.kill(int((runs / "rank1.pid").read_text()), signal.SIGKILL)
    worker.join(120)
    err = box[0]
    assert isinstance(err, DistributedError), box
    assert "rank 1 (localhost, local rank 1) killed by SIGKILL" in str(err) and "run the same command again" in str(err)
    host = runs / "host"
    assert (host / "prune" / "manifest.json").is_file() and not (host / "finetune").exists()
    # the rerun: baseline and prune are kept, finetune runs on both ranks and is written once
    box.clear()
    _launch(runs, box)
    assert box[0] == 0, box[1][-40:]
    text = "\n".join(box[1])
    assert "stage baseline: up to date" in text and "stage prune: up to date" in text, text[-3000:]
    assert "stage finetune: done" in text
    figures = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    # 4000 images a epoch = 63 global batches of 64 (the last of 32); 400 steps = 6 epochs and 22 batches
    assert figures["world_size"] == 2 and figures["steps"] == 400 and figures["images_seen"] == 6 * 4000 + 22 * 64
    assert figures["images_per_s"] > 0 and figures["device"].startswith("cpu")
    manifest = json.loads((host / "finetune" / "manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2 and manifest["config"]["fingerprints"]["train"]["images"] == 60000


TORCHRUN_SUMMARY = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
tests.test_distributed FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-02_18:39:34
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 19651)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 19651
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_18:39:34
  host      : node-b
  rank      : 5 (local_rank: 1)
  exitcode  : -9 (pid: 19652)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 19652
=======================================================
"""


def test_torchrun_failure_summary_names_the_root_cause_rank() -> None:
    from pipeline.train.launch import parse_failure

    failure = parse_failure("noise\n" + TORCHRUN_SUMMARY)
    assert failure is not None and (failure.rank, failure.local_rank, failure.host) == (5, 1, "node-b")
    assert failure.describe() == "rank 5 (node-b, local rank 1) killed by SIGKILL"
    exited = parse_failure(TORCHRUN_SUMMARY.replace("-9 (pid: 19652)  (SIGKILL)", "3 (pid: 19652)"))
    assert exited is not None and exited.describe() == "rank 5 (node-b, local rank 1) exit code 3"
    assert parse_failure("all fine") is None


def test_device_flags_name_where_to_train() -> None:
    from pipeline.cli import _train_device, build_parser

    def parsed(*extra: str):
        return _train_device(build_parser().parse_args(["deploy", "--target", "host", *extra]))

    assert parsed("--device", "cuda") == ("cuda", None)  # as training tools spell it
    assert parsed("--device", "cuda:1") == ("cuda:1", None) and parsed("--device", "cpu") == ("cpu", None)
    assert parsed("--device", "pi@raspberrypi.local") == (None, "pi@raspberrypi.local")  # where to profile
    assert parsed("--train-device", "cuda", "--device", "local") == ("cuda", "local")
    with pytest.raises(UsageError, match="give one of them"):
        parsed("--train-device", "cpu", "--device", "cuda")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["deploy", "--target", "host", "--nproc", "0"])
    # the words the launcher hands torchrun: --nproc (torchrun would read it as --nproc-per-node) left out
    from pipeline.cli import _without_nproc

    words = ["deploy", "--target", "host", "--nproc", "2", "--npr=3", "--device", "cpu", "--set", "a=--nproc"]
    assert _without_nproc(words) == ["deploy", "--target", "host", "--device", "cpu", "--set", "a=--nproc"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine --device cuda would deploy")
def test_a_missing_gpu_is_reported_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    for how in (["--device", "cuda"], ["--set", "finetune.device=cuda:0"], ["--device", "cuda", "--nproc", "2"]):
        assert main(["deploy", "--target", "host", "--runs-dir", str(tmp_path), *how]) == 2
        err = capsys.readouterr().err
        assert "finetune.device cuda" in err and "sees no CUDA GPU" in err and "--device cpu" in err, err
    assert not (tmp_path / "host").exists() or not any((tmp_path / "host").iterdir())
    with pytest.raises(Exception, match="not a training device; valid: auto, cpu, cuda, cuda:N"):
        from pipeline.targets import load_target

        load_target("host", overrides=["finetune.device=gpu"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_with_its_scaler(amp: str) -> None:
    """The GPU's AMP path (autocast, GradScaler for fp16), run on the CPU's autocast so that CI covers it."""
    from pipeline.train.device import resolve_device
    from pipeline.train.distill import finetune_kd

    spec, student, teacher, data, cfg = _setup("bn")
    dev = resolve_device("cpu", amp)
    assert dev.amp == (torch.bfloat16 if amp == "bf16" else torch.float16) and dev.needs_scaler == (amp == "fp16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        short = cfg.model_copy(update={"amp": amp, "epochs": 0.25, "min_steps": 4, "workers": 0})
        result = finetune_kd(student, teacher, spec, data, short, seed=SEED)
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 4 and f"{'bfloat16' if amp == 'bf16' else 'float16'} autocast" in result.device
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


if __name__ == "__main__":
    match sys.argv[1]:
        case "match":
            _main_match(sys.argv[2])
        case "chain":
            sys.exit(_main_chain(sys.argv[2]))
        case "search":
            sys.exit(_main_search(sys.argv[2]))
