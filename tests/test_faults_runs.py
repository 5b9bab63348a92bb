"""Fault suite, runs: kill -9 during each stage of a real deploy and resume, a full disk during writes, two
deploys of the same target at once, and a deploy in a folder whose name is full of shell metacharacters.

Rows of docs/FAULTS.md ("Faults"). The slow part runs the real CLI (`python -m pipeline deploy`) as a
subprocess on the tiny seeded TinyResidualCNN (tests/tiny_models.py) with a tiny host profile, real onnx2tf,
real ai-edge-litert; it is killed with SIGKILL when a stage starts and run again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devices_fixtures import descendants

from pipeline.artifacts import fresh_temp_dir, run_lock, sha256_file, write_json_atomic
from pipeline.errors import LockError, StorageError
from pipeline.runner import run_stage
from pipeline.targets import TARGETS_DIR
from tests.tiny_models import has_fashion_mnist

REPO = Path(__file__).resolve().parent.parent
TARGET = "tinyfault"
STAGES = ["baseline", "export_baseline", "convert_baseline", "sensitivity", "prune", "finetune", "export",
          "convert", "verify", "profile"]  # fmt: skip
# A folder name that runs commands if any part of the pipeline ever hands a path to a shell as code, unquoted
# (pwned1-4), in double quotes (pwned2, 3, 5) or in single quotes (pwned6); its quotes balance in each of these,
# so the shell runs the payloads rather than stopping at a syntax error (test_the_hostile_name_runs_in_a_shell).
HOSTILE = (
    "dir with spaces; touch pwned1 && $(touch pwned2) `touch pwned3` | touch pwned4 > x & "
    "\"; touch pwned5; \" '; touch pwned6; ' *"
)


# ====================================================================== disk full (fast)


def _limited(code: str, *, fsize: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Python whose files may not grow past `fsize` bytes (RLIMIT_FSIZE: writes fail EFBIG)."""
    prelude = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock")


def test_atomic_write_hitting_the_file_size_limit_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"old": True})
    before = target.read_bytes()
    proc = _limited(
        f"""
        from pathlib import Path
        from pipeline.artifacts import write_bytes_atomic
        from pipeline.errors import StorageError
        try:
            write_bytes_atomic(Path({str(target)!r}), b"x" * 1_000_000)
        except StorageError as exc:
            print("StorageError:", exc)
        """,
        fsize=64 * 1024,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "StorageError:" in proc.stdout and "File too large" in proc.stdout and "free some space" in proc.stdout
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []  # the temporary file is gone: no half file beside the whole one


def test_atomic_writes_get_the_usual_permissions(tmp_path: Path) -> None:
    """Guard for the atomic writer: a file written through a temporary has the mode a plain write gives
    (mkstemp alone would make bundle metadata and checkpoints 0600, unreadable to an app build as another user)."""
    from pipeline.models.checkpoint import save_checkpoint
    from tests.tiny_models import TinyResidualCNN

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "metadata.json", {"a": 1})
        save_checkpoint(TinyResidualCNN(width=4), tmp_path / "model.pt", meta={})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"metadata.json": 0o644, "model.pt": 0o644, "plain.txt": 0o644}


def test_temporaries_of_killed_writers_are_cleaned_up(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-write leaves `.name.<pid>.*.tmp`; the next write of that file removes it."""
    target = tmp_path / "report.md"
    code = (
        "import os, sys, tempfile\n"
        "fd, tmp = tempfile.mkstemp(prefix=f'.report.md.{os.getpid()}.', suffix='.tmp', dir=sys.argv[1])\n"
        "os.write(fd, b'half'); os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert len(list(tmp_path.glob(".report.md.*.tmp"))) == 1
    write_json_atomic(target, {"whole": True})
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


# Writes files by relative names in its working directory, as fast as it can, until killed.
_BUSY_WRITER = """
import itertools, time
for i in itertools.count():
    try:
        with open(f"f{i}", "w") as f:
            f.write("x" * 4096)
    except OSError:
        time.sleep(0.001)
"""


def test_a_writer_left_in_the_old_temp_folder_never_reaches_the_new_one(tmp_path: Path) -> None:
    """A process still writing in a stage's `.s.tmp` from inside it (its working directory, as onnx2tf's is in
    the convert stage) when the next run starts: the old folder is renamed aside before it is deleted, so the
    new `.s.tmp` is empty and stays empty while that process writes on, and nothing raises."""
    old = tmp_path / ".s.tmp"
    old.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", _BUSY_WRITER], cwd=old)
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(old)) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(os.listdir(old)) >= 50, "the writer did not start"
        new = fresh_temp_dir(tmp_path, "s")
        assert new == old and os.listdir(new) == []
        time.sleep(0.5)
        assert writer.poll() is None  # still running, its working directory renamed aside and deleted
        assert os.listdir(new) == []
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != ".s.tmp"]
        assert all(name.startswith(".s.stale-") for name in leftovers), leftovers  # dot-named, never "finished"
    finally:
        writer.kill()
        writer.wait()
    fresh_temp_dir(tmp_path, "s")  # the next run removes whatever the writer added while the old one was deleted
    assert [p.name for p in tmp_path.iterdir()] == [".s.tmp"] and os.listdir(tmp_path / ".s.tmp") == []


def test_checkpoint_write_hitting_the_limit_leaves_no_half_file(tmp_path: Path) -> None:
    """Before the fix save_checkpoint raised a bare OSError and left `.model.pt.tmp` (a partial checkpoint)."""
    ckpt = tmp_path / "model.pt"
    proc = _limited(
        f"""
        from pathlib import Path
        import torch
        from pipeline.models.checkpoint import save_checkpoint
        from pipeline.errors import StorageError
        from tests.tiny_models import TinyResidualCNN
        torch.manual_seed(0)
        save_checkpoint(TinyResidualCNN(width=4), Path({str(ckpt)!r}), meta={{"v": 1}})  # ~10 KB: fits
        try:
            save_checkpoint(TinyResidualCNN(width=32), Path({str(ckpt)!r}), meta={{"v": 2}})  # ~170 KB
        except StorageError as exc:
            print("StorageError:", exc)
        """,
        fsize=64 * 1024,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "StorageError:" in proc.stdout and "File too large" in proc.stdout
    from pipeline.models.checkpoint import load_checkpoint
    from tests.tiny_models import TinyResidualCNN

    _, meta = load_checkpoint(ckpt, TinyResidualCNN(width=4))
    assert meta == {"v": 1}  # the previous checkpoint, whole
    assert _leftovers(tmp_path) == []


def test_stage_hitting_the_limit_keeps_the_previous_result(tmp_path: Path) -> None:
    run = tmp_path / "run"
    src = tmp_path / "in.txt"
    src.write_text("in")

    def small(out: Path) -> dict:
        (out / "result.bin").write_bytes(b"v1" * 100)
        return {"v": 1}

    run_stage(run, "s", small, inputs={"src": src}, config={"v": 1})
    before = (run / "s" / "result.bin").read_bytes()
    proc = _limited(
        f"""
        from pathlib import Path
        from pipeline.runner import run_stage
        from pipeline.errors import StorageError
        def big(out):
            (out / "result.bin").write_bytes(b"v2" * 500_000)
            return {{"v": 2}}
        try:
            run_stage(Path({str(run)!r}), "s", big, inputs={{"src": Path({str(src)!r})}}, config={{"v": 2}})
        except StorageError as exc:
            print("StorageError:", exc)
        """,
        fsize=64 * 1024,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "StorageError: stage s: cannot write" in proc.stdout and "File too large" in proc.stdout
    assert (run / "s" / "result.bin").read_bytes() == before
    assert json.loads((run / "s" / "manifest.json").read_text())["figures"] == {"v": 1}
    assert _leftovers(run) == []  # the half-written `.s.tmp` was removed (its space given back)


def _can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and sys.platform == "linux"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 640 KiB tmpfs (root only): writes past it fail with ENOSPC, the real disk-full error."""
    if not _can_mount_tmpfs():
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE tests cover the same paths)")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill `disk` until about `leave` bytes are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk: Path) -> None:
    target = small_disk / "metadata.json"
    write_json_atomic(target, {"old": list(range(10))})
    before = target.read_bytes()
    _fill(small_disk, leave=8 * 1024)
    with pytest.raises(StorageError, match=r"metadata\.json: cannot write: No space left on device; free some space"):
        write_json_atomic(target, {"new": "x" * 100_000})
    assert target.read_bytes() == before
    assert _leftovers(small_disk) == []


def test_stage_on_a_full_disk_gives_the_space_back(small_disk: Path, tmp_path: Path) -> None:
    run = small_disk / "run"
    src = tmp_path / "in.txt"
    src.write_text("in")

    def work(size: int) -> Callable[[Path], dict]:
        def write(out: Path) -> dict:
            (out / "model.bin").write_bytes(b"\1" * size)
            return {"size": size}

        return write

    run_stage(run, "s", work(1000), inputs={"src": src}, config={"v": 1})
    _fill(small_disk, leave=40 * 1024)
    free = shutil.disk_usage(small_disk).free
    with pytest.raises(StorageError, match=r"stage s: cannot write .*: No space left on device; free some space"):
        run_stage(run, "s", work(200_000), inputs={"src": src}, config={"v": 2})
    assert (run / "s" / "model.bin").read_bytes() == b"\1" * 1000  # the previous result, whole
    assert _leftovers(run) == [] and shutil.disk_usage(small_disk).free >= free - 4096
    run_stage(run, "s", work(2000), inputs={"src": src}, config={"v": 3})  # and the next run works
    assert (run / "s" / "model.bin").stat().st_size == 2000


# ====================================================================== two deploys at once (fast)


def test_second_deploy_of_the_same_target_refuses_naming_the_first(tmp_path: Path) -> None:
    """A deploy holds runs/<target>/.lock; a second deploy of that target exits 1 naming the holder's pid and
    touches nothing (no stage folder, no artifacts)."""
    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
         "from pipeline.artifacts import run_lock\nwith run_lock(Path(sys.argv[2])):\n print('locked', flush=True); "
         "time.sleep(120)", str(REPO), str(runs / "host")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "deploy", "--target", "host", "--runs-dir", str(runs),
             "--artifacts-dir", str(tmp_path / "art")],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    assert f"edgeship: error: another edgeship run is using {runs / 'host'} (pid {holder.pid})" in proc.stderr
    assert "wait for it to finish" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (runs / "host").iterdir()) == [".lock"]
    assert not (tmp_path / "art").exists()
    with run_lock(runs / "host"):  # released with the holder's death
        pass


def test_lock_is_per_target(tmp_path: Path) -> None:
    with run_lock(tmp_path / "a"), run_lock(tmp_path / "b"):  # two targets at once: fine
        assert (tmp_path / "a" / ".lock").read_text() == str(os.getpid())
        with pytest.raises(LockError, match=r"another edgeship run is using .*/a \(pid"):  # noqa: SIM117
            with run_lock(tmp_path / "a"):  # the same one again: refused
                pass


# ====================================================================== kill -9 during each stage (slow)


def _write_dataset(root: Path) -> Path:
    """train/test/calibration image folders (PNG) from real Fashion-MNIST, classes c0..c9."""
    from tests.tiny_models import write_fmnist_folder

    return write_fmnist_folder(root / "data", pool=1000, train=300, test=300)


def _write_checkpoint(root: Path) -> Path:
    from pipeline.models.checkpoint import save_checkpoint
    from tests.tiny_models import read_fashion_mnist, train_tiny

    path = root / "tiny.pt"
    save_checkpoint(train_tiny(read_fashion_mnist("train", 1000), steps=60), path, meta={"model": "tiny"})
    return path


def _write_profile(root: Path) -> Path:
    data = yaml.safe_load((TARGETS_DIR / "host.yaml").read_text())
    data.update(
        name=TARGET,
        budgets={"max_accuracy_drop": 1.0},
        finetune={"epochs": 1, "max_train_images": 256, "batch_size": 64, "lr": 0.003},
        quantize={"precisions": ["fp32", "int8"], "ship": "int8", "int8_io": "int8", "calibration_images": 32},
        profiling={"threads": 1, "warmup": 2, "runs": 10, "min_seconds": 0.2},  # profile lasts ~2 s: room to kill
    )
    data["pruning"].update(target={"metric": "macs", "keep": 0.5}, channel_multiple=4)
    path = root / f"{TARGET}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Deploy:
    """One `python -m pipeline deploy` of the tiny model, output to a log file."""

    def __init__(self, ws: dict[str, Path], log: Path, *extra: str, prefix: list[str] | None = None) -> None:
        argv = [sys.executable, "-m", "pipeline", "deploy", "--target", str(ws["profile"]),
                "--model", "tests.tiny_models:TinyResidualCNN", "--checkpoint", str(ws["ckpt"]),
                "--data", str(ws["data"]), "--input-shape", "1x28x28", "--mean", "0.286", "--std", "0.353",
                "--runs-dir", str(ws["runs"]), "--artifacts-dir", str(ws["art"]), *extra]  # fmt: skip
        self.log = log
        self.fh = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            (prefix or []) + argv, cwd=REPO, stdout=self.fh, stderr=subprocess.STDOUT, env=_env()
        )
        self.pid = self.proc.pid

    def wait(self, timeout: float = 400) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.fh.close()
        return rc

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def progress(self) -> dict[str, str]:
        """{stage: "up to date" | "done"} from the progress lines printed so far."""
        return {
            m.group(1): "up to date" if m.group(2) == "up to date" else "done"
            for m in re.finditer(r"^\s+\[(\w+)\s*\] (up to date|done in)", self.output, re.M)
        }


def _bundle_whole(bundle: Path) -> bool | None:
    """None when there is no bundle, else whether every file its manifest lists has the listed sha256."""
    if not bundle.exists():
        return None
    try:
        files = json.loads((bundle / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((bundle / rel).is_file() and sha256_file(bundle / rel) == e["sha256"] for rel, e in files.items())


def _snapshot(run: Path) -> dict[Path, str]:
    """sha256 of every file of a run folder (the lock and what a surviving orphan may still write excluded)."""
    return {
        p: sha256_file(p)
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock" and ".stale-" not in str(p.relative_to(run))
    }


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def _wait_for(deploy: Deploy, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if deploy.proc.poll() is not None:
            raise AssertionError(f"deploy exited ({deploy.proc.returncode}) before {what}:\n{deploy.output[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{deploy.output[-3000:]}")
        time.sleep(0.002)


KILL_AT = ["sensitivity", "prune", "finetune", "convert", "verify", "profile", "bundle"]


def _trigger(run: Path, stage: str) -> tuple[Callable[[], bool], float]:
    """(condition meaning `stage` has started, seconds to wait after it before the kill)."""
    if stage == "bundle":  # the summary is written just before the bundle is assembled
        return (lambda: (run / "summary.json").exists()), 0.0
    if stage == "convert":  # onnx2tf is running: its log has started
        return (lambda: any(p.stat().st_size > 0 for p in run.glob(".convert.tmp/.onnx2tf-*/onnx2tf.log"))), 1.0
    delay = {"finetune": 0.3}.get(stage, 0.0)
    return (lambda: (run / f".{stage}.tmp").is_dir()), delay


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An uninterrupted reference deploy (with a second deploy started against it), then the same deploy
    SIGKILLed once at each of KILL_AT and rerun until it finishes. All in a folder named HOSTILE."""
    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    base = tmp_path_factory.mktemp("faults") / HOSTILE
    base.mkdir()
    ws = {"base": base, "data": _write_dataset(base), "ckpt": _write_checkpoint(base), "profile": _write_profile(base),
          "runs": base / "runs", "art": base / "art"}  # fmt: skip
    run = ws["runs"] / TARGET
    obs: dict[str, Any] = {"ws": ws, "kills": [], "orphans": {}}
    stray: list[int] = []
    try:
        # 1. reference run, and a second deploy of the same target while it holds the lock
        ref = Deploy(ws, base / "ref.log")
        _wait_for(ref, lambda: (run / ".lock").is_file() and (run / ".lock").read_text() == str(ref.pid), "the lock")
        second = Deploy(ws, base / "second.log")
        obs["second"] = {"rc": second.wait(), "output": second.output, "holder": ref.pid}
        obs["second"]["ref_still_running"] = ref.proc.poll() is None
        obs["ref"] = {"rc": ref.wait(), "output": ref.output, "progress": ref.progress()}
        assert obs["ref"]["rc"] == 0, ref.output[-3000:]
        os.replace(ws["runs"], base / "ref_runs")
        os.replace(ws["art"], base / "ref_art")

        # 2. the same deploy, killed once at each stage of KILL_AT, each time started again
        for stage in KILL_AT:
            d = Deploy(ws, base / f"kill-{stage}.log")
            ready, delay = _trigger(run, stage)
            _wait_for(d, ready, f"stage {stage}")
            time.sleep(delay)
            kids = descendants(d.pid)
            os.kill(d.pid, signal.SIGKILL)
            rc = d.wait()
            time.sleep(0.2)
            survivors = [k for k in kids if _alive(k)]
            stray += survivors
            obs["orphans"][stage] = survivors
            obs["kills"].append(
                {
                    "stage": stage,
                    "rc": rc,
                    "progress": d.progress(),
                    "finished_folder": (run / stage / "manifest.json").exists() if stage != "bundle" else None,
                    "bundle_whole": _bundle_whole(ws["art"] / TARGET),
                }
            )
        final = Deploy(ws, base / "final.log")
        obs["final"] = {"rc": final.wait(), "output": final.output, "progress": final.progress()}
        yield obs
    finally:
        for pid in stray:  # children of our killed deploys that outlived them (see the orphan test)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_second_deploy_of_a_running_target_refuses(killed_runs: dict[str, Any]) -> None:
    second = killed_runs["second"]
    run_dir = killed_runs["ws"]["runs"] / TARGET
    assert second["ref_still_running"], "the first deploy finished before the second tried: the test proved nothing"
    assert second["rc"] == 1
    assert f"edgeship: error: another edgeship run is using {run_dir} (pid {second['holder']})" in second["output"]
    assert "Traceback" not in second["output"]
    assert killed_runs["ref"]["rc"] == 0  # the first was not disturbed ...
    assert all(v == "done" for v in killed_runs["ref"]["progress"].values())  # ... and ran every stage itself


@pytest.mark.slow
def test_each_kill_hit_its_stage_and_left_nothing_that_looks_finished(killed_runs: dict[str, Any]) -> None:
    for kill in killed_runs["kills"]:
        stage = kill["stage"]
        assert kill["rc"] == -signal.SIGKILL, kill
        if stage == "bundle":
            assert kill["progress"].get("profile") == "done"  # killed after the last cached stage ...
            # ... and before, during or after publishing: no bundle, or a whole one - never a half one
            assert kill["bundle_whole"] in (None, True), kill
        else:
            assert stage not in kill["progress"], f"{stage} finished before the kill: {kill}"
            assert kill["finished_folder"] is False, f"runs/{TARGET}/{stage}/ looks finished after the kill"


@pytest.mark.slow
def test_each_rerun_resumed_after_the_killed_stage(killed_runs: dict[str, Any]) -> None:
    runs = [*killed_runs["kills"], killed_runs["final"]]
    for before, after in itertools.pairwise(runs):
        killed = before["stage"]
        progress = after["progress"]
        if killed == "bundle":
            assert progress == dict.fromkeys(STAGES, "up to date")
            continue
        assert all(progress[s] == "up to date" for s in STAGES[: STAGES.index(killed)]), (killed, progress)
        assert progress[killed] == "done", (killed, progress)
    assert killed_runs["final"]["rc"] == 0, killed_runs["final"]["output"][-3000:]


# files whose bytes depend on time (timings, timestamps, pids): compared by the model files they describe
NONDETERMINISTIC = {"onnx2tf.log", "profile.json", "manifest.json", "report.md", "report.html", "summary.json"}


@pytest.mark.slow
def test_resumed_artifacts_equal_an_uninterrupted_run(killed_runs: dict[str, Any]) -> None:
    ws = killed_runs["ws"]
    ref_runs, runs = ws["base"] / "ref_runs" / TARGET, ws["runs"] / TARGET
    compared = []
    for stage in STAGES:
        ref_m = json.loads((ref_runs / stage / "manifest.json").read_text())
        new_m = json.loads((runs / stage / "manifest.json").read_text())
        assert new_m["key"] == ref_m["key"], stage  # same inputs, config and tools
        assert set(new_m["outputs"]) == set(ref_m["outputs"]), stage
        for rel, digest in ref_m["outputs"].items():
            if Path(rel).name in NONDETERMINISTIC:
                continue
            assert new_m["outputs"][rel] == digest, f"{stage}/{rel} differs from the uninterrupted run"
            assert sha256_file(runs / stage / rel) == digest
            compared.append(f"{stage}/{rel}")
    assert {"prune/model.pt", "finetune/model.pt", "convert/model_int8.tflite", "verify/verify.json"} <= set(compared)
    # the bundle: every model file, labels and metadata byte-identical; report.md and manifest.json hold timings
    ref_b, new_b = ws["base"] / "ref_art" / TARGET, ws["art"] / TARGET
    ref_files = json.loads((ref_b / "manifest.json").read_text())["files"]
    new_files = json.loads((new_b / "manifest.json").read_text())["files"]
    assert set(ref_files) == set(new_files)
    for rel in ref_files:
        assert sha256_file(new_b / rel) == new_files[rel]["sha256"]  # the bundle is whole
        if rel == "metadata.json":  # the same, but for `version`: the bundle's build time
            ref_meta, new_meta = (json.loads((b / rel).read_text()) for b in (ref_b, new_b))
            assert {**ref_meta, "version": None} == {**new_meta, "version": None}
        elif Path(rel).name not in NONDETERMINISTIC:
            assert new_files[rel]["sha256"] == ref_files[rel]["sha256"], rel
    assert {"model.tflite", "variants/model_int8.tflite", "metadata.json", "labels.txt"} <= set(ref_files)
    # what the kills left (a stage's .tmp folder, an atomic write's .tmp file) is gone after the last run
    assert not list(runs.glob(".*.tmp")) and not list(new_b.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_no_shell_ran_the_hostile_folder_name(killed_runs: dict[str, Any]) -> None:
    """The whole chain (onnx2tf, the benchmark runner, the bundle) ran under a folder named HOSTILE."""
    base = killed_runs["ws"]["base"]
    assert killed_runs["final"]["rc"] == 0
    for where in (base, base.parent, REPO, Path.cwd()):
        found = [p for p in where.rglob("pwned*")] if where != REPO else list(where.glob("pwned*"))
        assert found == [], found
    assert (killed_runs["ws"]["art"] / TARGET / "model.tflite").is_file()


@pytest.mark.slow
def test_kill_during_conversion_leaves_no_orphan_converter(killed_runs: dict[str, Any]) -> None:
    assert killed_runs["orphans"]["convert"] == []


@pytest.mark.slow
def test_full_disk_in_a_stage_is_a_clean_error_and_keeps_the_previous_result(killed_runs: dict[str, Any]) -> None:
    """--force under a 40 KB file-size limit: the baseline stage cannot write its 48 KB model.pt."""
    ws = killed_runs["ws"]
    run = ws["runs"] / TARGET
    before = _snapshot(run)
    bundle_before = {p: sha256_file(p) for p in sorted((ws["art"] / TARGET).rglob("*")) if p.is_file()}
    limit = ["/bin/sh", "-c", 'ulimit -f 40 && exec "$@"', "limited"]  # 40 blocks of 1 KiB
    d = Deploy(ws, ws["base"] / "full.log", "--force", prefix=limit)
    rc = d.wait()
    out = d.output
    assert rc == 1, out[-3000:]
    assert re.search(r"edgeship: error: .*baseline.*model\.pt.*: File too large; free some space", out), out[-2000:]
    assert "Traceback" not in out
    after = _snapshot(run)
    assert after == before  # every stage folder as it was: nothing half-written replaced anything
    assert {p: sha256_file(p) for p in sorted((ws["art"] / TARGET).rglob("*")) if p.is_file()} == bundle_before


@pytest.fixture
def full_artifacts(killed_runs: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A 640 KiB tmpfs holding a copy of the last bundle (with room for it), filled to the brim; then a deploy
    publishing there."""
    if not _can_mount_tmpfs():
        pytest.skip("mounting a tmpfs needs root")
    ws = dict(killed_runs["ws"])
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(ws["art"] / TARGET, disk / TARGET)
        before = {str(p.relative_to(disk)): sha256_file(p) for p in sorted(disk.rglob("*")) if p.is_file()}
        _fill(disk, leave=4096)
        ws["art"] = disk
        d = Deploy(ws, tmp_path / "publish.log")
        rc = d.wait()
        yield {"rc": rc, "output": d.output, "disk": disk, "before": before}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_full_disk_while_publishing_keeps_the_previous_bundle(full_artifacts: dict[str, Any]) -> None:
    disk = full_artifacts["disk"]
    assert full_artifacts["rc"] == 1, full_artifacts["output"][-3000:]
    assert "No space left on device" in full_artifacts["output"]
    now = {str(p.relative_to(disk)): sha256_file(p) for p in sorted(disk.rglob("*")) if p.is_file()}
    assert {k: v for k, v in now.items() if k.startswith(f"{TARGET}/")} == full_artifacts["before"]
    manifest = json.loads((disk / TARGET / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():  # the previous bundle is whole by its own checksums
        assert sha256_file(disk / TARGET / rel) == entry["sha256"]
    assert sorted(p.name for p in disk.iterdir() if not p.name.startswith(".")) == ["filler", TARGET]


@pytest.mark.slow
def test_full_disk_while_publishing_is_a_clean_error(full_artifacts: dict[str, Any]) -> None:
    out = full_artifacts["output"]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("edgeship: error:")]
    assert len(errors) == 1 and out.rstrip().splitlines()[-1] == errors[0], out[-3000:]  # one line, the last
    assert re.fullmatch(
        r"edgeship: error: /\S.*: No space left on device; free some space and run again: finished stages are "
        r"kept, the previous bundle is untouched",
        errors[0],
    ), errors[0]


@pytest.mark.parametrize(
    ("quoting", "ran"),
    [
        ("cd {path} && pwd", ["pwned1", "pwned2", "pwned3", "pwned4"]),
        ('cd "{path}" && pwd', ["pwned2", "pwned3", "pwned5"]),
        ("cd '{path}' && pwd", ["pwned6"]),
        ("cd {quoted} && pwd", []),
    ],
    ids=["unquoted", "double-quotes", "single-quotes", "shlex.quote"],
)
def test_the_hostile_name_runs_in_a_shell(tmp_path: Path, quoting: str, ran: list[str]) -> None:
    """Guard: a real /bin/sh handed a path with HOSTILE in it as code runs its payloads, however the path was
    quoted by hand, so test_no_shell_ran_the_hostile_folder_name would see pwned* files; shlex.quote runs none."""
    import shlex

    folder = tmp_path / HOSTILE
    folder.mkdir()
    code = quoting.format(path=folder, quoted=shlex.quote(str(folder)))
    proc = subprocess.run(["/bin/sh", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert sorted(p.name for p in tmp_path.glob("pwned*")) == ran, proc.stderr
    assert (proc.returncode == 0 and proc.stdout.strip() == str(folder)) == (not ran)
